"""Small model classes for the serialization and command-line tests.

They live in an importable module (``tests.models``) because a pickled model names its class,
and convfuse's safe loader imports that class to check it is an ``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class TinyNet(nn.Module):
    """conv-BN-ReLU-conv-BN: two pairs to fold; input (N, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class ReflectNet(nn.Module):
    """Convs with ``padding_mode='reflect'`` and a ConvTranspose2d, each followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn_up = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_up(self.up(self.act(self.bn(self.conv(x)))))


class TwoInputNet(nn.Module):
    """``forward(x, y)``: a conv-BN branch for each input, summed; inputs (N, 3, H, W) and (N, 2, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_x = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_x = nn.BatchNorm2d(4)
        self.conv_y = nn.Conv2d(2, 4, 1)
        self.bn_y = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn_x(self.conv_x(x)) + self.bn_y(self.conv_y(y))


class NoNormNet(nn.Module):
    """No BatchNorm at all: nothing to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class NormAfterActNet(nn.Module):
    """conv-BN-ReLU-conv-ReLU-BN: the first BN folds, the last (after a ReLU, before nothing) cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.relu(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class Settings:
    """A plain (non-module) object a model may carry: the safe loader refuses to build it."""

    def __init__(self, name: str = "tiny") -> None:
        self.name = name


class TinyNetWithSettings(TinyNet):
    """TinyNet holding a plain Python object: loads only with ``trust=True``."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings()


def build_tiny() -> TinyNet:
    """Factory for ``--arch tests.models:build_tiny``."""
    return TinyNet()


def build_not_a_model() -> dict[str, int]:
    """A factory that returns something other than a module (for the error path of --arch)."""
    return {"layers": 2}


class Recorder(nn.Module):
    """A module whose constructor leaves a marker file: proof that a file made it run."""

    def __init__(self, marker: str = "", *rest: object) -> None:
        super().__init__()
        if marker:
            with open(marker, "w") as f:
                f.write("constructor ran")


def double_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that changes what its module returns."""
    return output * 2


MARKER_ENV = "CONVFUSE_TEST_MARKER"


def leave_marker(*args: object, **kwargs: object) -> None:
    """Write the file named by $CONVFUSE_TEST_MARKER: proof that something called this."""
    import os

    path = os.environ.get(MARKER_ENV)
    if path:
        with open(path, "w") as f:
            f.write("called")


class Marker(nn.Module):
    """A module class that leaves the marker whenever it is constructed or called: what a crafted
    file puts where torch (or convfuse) would call it, with arguments the file does not choose."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()
        leave_marker()

    def forward(self, *args: object, **kwargs: object) -> None:
        leave_marker()


class LayerFactoryNet(TinyNet):
    """TinyNet keeping a layer factory, as torchvision's VisionTransformer keeps its norm_layer."""

    def __init__(self) -> None:
        super().__init__()
        import functools

        self.norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)


class ExitsNet(TinyNet):
    """A model whose forward calls sys.exit(0), as a stray command-line entry point might."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import sys

        sys.exit(0)


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
