"""One table of checks for every graph kind: the same pair gets the same Reason from the fx,
TorchScript and ATen front-ends, and what the nn.Module path folds is folded in the graph formats
too (FrozenBatchNorm2d, norm first, sum, channel concat, Linear+BatchNorm1d)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import convfuse
from convfuse.checks import CHECKS, Candidate, check
from convfuse.patterns import Reason
from tests.conftest import norm_names, randomize_bn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::DeprecationWarning")

KINDS = ("module", "exported", "torchscript")


class ParityNet(nn.Module):
    """BN before a 1x1 conv, BN after a sum of convs, after a channel concat, a FrozenBatchNorm2d
    after a bias-free conv, and BatchNorm1d after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_first = nn.BatchNorm2d(3)
        self.pointwise = nn.Conv2d(3, 4, 1)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.bn_sum = nn.BatchNorm2d(4)
        self.part_a = nn.Conv2d(4, 2, 1)
        self.part_b = nn.Conv2d(4, 3, 1, bias=False)
        self.bn_cat = nn.BatchNorm2d(5)
        self.plain = nn.Conv2d(5, 5, 3, padding=1, bias=False)
        self.frozen = FrozenBatchNorm2d(5)
        self.fc = nn.Linear(5, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.bn_first(x))
        x = torch.relu(self.bn_sum(self.left(x) + self.right(x)))
        x = torch.relu(self.bn_cat(torch.cat([self.part_a(x), self.part_b(x)], 1)))
        x = torch.relu(self.frozen(self.plain(x)))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def randomize_frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """randomize_bn, and random statistics for every FrozenBatchNorm2d (its buffers)."""
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.weight.numel()
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator))
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return randomize_bn(model, seed)


def as_kind(model: nn.Module, kind: str, x: torch.Tensor):
    if kind == "exported":
        return torch.export.export(model, (x,))
    if kind == "torchscript":
        return torch.jit.script(model)
    return model


def run(result: convfuse.FuseResult, kind: str, x: torch.Tensor) -> torch.Tensor:
    model = result.model.module() if kind == "exported" else result.model
    with torch.no_grad():
        return model(x)
