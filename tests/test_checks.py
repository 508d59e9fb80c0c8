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
from convfuse.fold.checks import CHECKS, Candidate, check
from convfuse.fold.reasons import Reason
from tests.conftest import norm_names, randomize_bn
from tests.models import ParityNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::DeprecationWarning")

KINDS = ("module", "exported", "torchscript")


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


def fuse_as(model: nn.Module, kind: str, x: torch.Tensor) -> convfuse.FuseResult:
    return convfuse.fuse(as_kind(model, kind, x), x)


# -- the table itself -------------------------------------------------------------------


def test_a_candidate_with_nothing_known_against_it_passes() -> None:
    assert check(Candidate(producer_channels=(4,), producer_ranks=(4,), norm_channels=4, input_ranks=(4,))) is None


_FAILING = {  # a field value that makes each flag row of the table fail
    "global_hooks": True, "shared_names": True, "held_elsewhere": True, "tensors_held_elsewhere": True,
    "called_twice": True, "hooks": True, "hooks_between": True, "parametrized": True, "shared_parameter": True,
    "norm_outputs_read": True, "extra_arguments": True, "unobserved": True, "outside_part": True,
    "direct_access": True, "training": True, "running_stats": False, "stored": False,
    "hyperparameters_known": False, "lazy": True, "floating": False, "devices": 2, "not_called": True,
    "transposed_after": True,
}


@pytest.mark.parametrize("field", sorted(_FAILING))
def test_each_row_gives_its_reason(field: str) -> None:
    base = {"producer_channels": (4,), "producer_ranks": (4,), "norm_channels": 4, "input_ranks": (4,)}
    why = check(Candidate(**base, **{field: _FAILING[field]}))
    assert why is not None
    rows = [row.reason for row in CHECKS if row.fails(Candidate(**base, **{field: _FAILING[field]}))]
    assert why[0] == (Reason.GLOBAL_HOOKS if field == "global_hooks" else rows[0])


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"input_ranks": (3,)}, Reason.NOT_CHANNELS),
        ({"input_ranks": (3,), "linear": True, "producer_ranks": (2,)}, Reason.LINEAR_NOT_2D),
        ({"input_ranks": None}, Reason.SHAPE_UNKNOWN),
        ({"norm_channels": 5}, Reason.NOT_CHANNELS),
        ({"combine": "cat", "cat_axes": (2,), "cat_dim": 2}, Reason.CAT_AXIS),
        ({"combine": "cat", "cat_dim": -3}, Reason.SHAPE_UNKNOWN),
        ({"combine": "sum", "producer_channels": (4, 2), "producer_ranks": (4, 4)}, Reason.NOT_CHANNELS),
        ({"combine": "reshape"}, Reason.SHAPE_UNKNOWN),
        ({"combine": "reshape", "reshape_keeps_channels": False}, Reason.RESHAPE_AXIS),
        ({"norm_first": True, "zero_padded": True}, Reason.ZERO_PADDING),
        ({"users": 2}, Reason.OTHER_USERS),
        ({"users": 2, "norm_first": True}, Reason.NORM_OUTPUT_USERS),
        ({"reached": (Reason.REACHED, "detail")}, Reason.REACHED),
    ],
)
def test_shape_and_user_checks(fields: dict, reason: str) -> None:
    base = {"producer_channels": (4,), "producer_ranks": (4,), "norm_channels": 4, "input_ranks": (4,)}
    why = check(Candidate(**{**base, **fields}))
    assert why is not None and why[0] == reason


# -- the same reason from every IR --------------------------------------------------------


class OtherUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class PaddedAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class TransposedAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.up = nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.bn(x))


class SumWithInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + x)


class CatOnWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], 3))


class LinearOnSequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class NoStatistics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


UNSAFE = [
    (OtherUsers, (2, 3, 8, 8), Reason.OTHER_USERS),
    (PaddedAfter, (2, 3, 8, 8), Reason.ZERO_PADDING),
    (TransposedAfter, (2, 3, 8, 8), Reason.TRANSPOSED_AFTER),
    (SumWithInput, (2, 3, 8, 8), Reason.SUM_TERMS),
    (CatOnWidth, (2, 3, 8, 8), Reason.CAT_AXIS),
    (LinearOnSequence, (2, 4, 4), Reason.LINEAR_NOT_2D),
    (NoStatistics, (2, 3, 8, 8), Reason.NO_RUNNING_STATS),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cls", "shape", "reason"), UNSAFE, ids=[c.__name__ for c, _, _ in UNSAFE])
def test_the_same_reason_from_every_ir(cls: type[nn.Module], shape: tuple[int, ...], reason: str, kind: str) -> None:
    model = randomize_bn(cls(), 3).eval()
    x = torch.randn(shape)

    result = fuse_as(model, kind, x)

    assert result.report.fused == []
    assert [s.reason for s in result.report.skipped] == [reason]
    assert result.report.verification.passed
    torch.testing.assert_close(run(result, kind, x), model(x))


# -- parity: what the module path folds, every IR folds -------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_parity_cases_fold_in_every_ir(kind: str) -> None:
    model = randomize_bn(ParityNet(), 4).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)

    result = fuse_as(model, kind, x)

    kinds = {pair.norm: pair.kind for pair in result.report.fused}
    assert kinds == {
        "bn_first": "BatchNorm2d+Conv2d",
        "bn_sum": "(Conv2d + Conv2d)+BatchNorm2d",
        "bn_cat": "cat(Conv2d, Conv2d)+BatchNorm2d",
        "frozen": "Conv2d+FrozenBatchNorm2d",
        "bn_fc": "Linear+BatchNorm1d",
    }
    assert result.report.skipped == []
    assert (result.report.norm_layers.before, result.report.norm_layers.after) == (5, 0)
    assert result.report.verification.passed
    torch.testing.assert_close(run(result, kind, x), expected, rtol=1e-5, atol=1e-5)
    if kind == "exported":
        ops = {str(n.target) for n in result.model.graph.nodes}
        assert not any("batch_norm" in op or "rsqrt" in op for op in ops)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_resnet18_folds_every_norm(kind: str) -> None:
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    model = randomize_bn(model, 5).eval()
    x = torch.randn(1, 3, 64, 64)

    result = fuse_as(model, kind, x)

    assert len(result.report.fused) == 20
    assert result.report.norm_layers.after == 0
    torch.testing.assert_close(run(result, kind, x), model(x), rtol=1e-4, atol=1e-4)


def test_regnet_bias_input_is_an_identifier() -> None:
    """regnet_x_400mf's blocks are named ``block1-0``: the new bias input of a bias-free conv must
    still be a valid graph name (the rewrite used to raise a SyntaxError in the generated code)."""
    model = randomize_bn(torchvision.models.regnet_x_400mf(weights=None), 6).eval()
    x = torch.randn(1, 3, 64, 64)

    result = fuse_as(model, "exported", x)

    norms = len(norm_names(model))
    assert len(result.report.fused) == norms and result.report.norm_layers.after == 0
    assert "trunk_output.block1.block1-0.proj.0.bias" in result.model.state_dict
    torch.testing.assert_close(run(result, "exported", x), model(x), rtol=1e-4, atol=1e-4)
