"""Folds beyond adjacent pairs: a BatchNorm after a sum or a channel concat of convs, and after
reshapes that keep the channel axis; near misses are skipped with their reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convfuse
from convfuse import Reason
from tests.conftest import norm_names, randomize_bn


def _fuse(model: nn.Module, *inputs: torch.Tensor) -> convfuse.FuseResult:
    model = randomize_bn(model).eval()
    result = convfuse.fuse(model, inputs if len(inputs) > 1 else inputs[0])
    with torch.no_grad():
        torch.testing.assert_close(result.model(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    return result


def _skip(result: convfuse.FuseResult, norm: str) -> str:
    return {s.norm: s.reason for s in result.report.skipped}[norm]


class SumOfBranches(nn.Module):
    """bn(conv_b(y) + conv_a(x) + conv_c(x)): three producers, registered in another order than summed."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(3, 8, 1, bias=False)
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(5, 8, 3, padding=2, dilation=2, bias=False)

    def forward(self, x, y):
        return torch.relu(self.bn(self.conv_b(y) + self.conv_a(x) + self.conv_c(x)))


def test_norm_after_a_sum_of_convs_is_folded_into_every_term() -> None:
    result = _fuse(SumOfBranches(), torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8))
    (pair,) = result.report.fused
    assert pair.norm == "bn"
    assert set(pair.producer.split(" + ")) == {"conv_a", "conv_b", "conv_c"}
    assert pair.kind == "(Conv2d + Conv2d + Conv2d)+BatchNorm2d"
    assert norm_names(result.model) == set()


class SumWithResidual(nn.Module):
    """bn(conv(x) + x): the residual term is not scaled by a fold, so this cannot be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) + x)


def test_sum_with_a_non_producer_term_is_skipped() -> None:
    result = _fuse(SumWithResidual(), torch.randn(2, 4, 8, 8))
    assert result.report.fused == []
    assert _skip(result, "bn") == Reason.SUM_TERMS


class SumOfOneConvTwice(nn.Module):
    """bn(y + y) with y = conv(x): scaling y would double the shift."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y + y)


def test_sum_of_the_same_output_twice_is_skipped() -> None:
    result = _fuse(SumOfOneConvTwice(), torch.randn(2, 3, 8, 8))
    assert result.report.fused == []
    assert _skip(result, "bn") == Reason.SUM_TERMS


class SumTermUsedElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.a(x)
        return self.bn(a + self.b(x)), a


def test_sum_term_used_elsewhere_is_skipped() -> None:
    result = _fuse(SumTermUsedElsewhere(), torch.randn(2, 3, 8, 8))
    assert _skip(result, "bn") == Reason.OTHER_USERS


class ConcatOfBranches(nn.Module):
    """bn(cat([conv_b(x), conv_a(x), linear-ish 1x1 transposed], dim=1)): each slice to its producer."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.conv_a = nn.Conv2d(3, 5, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 2, 1, bias=False)
        self.up = nn.ConvTranspose2d(3, 4, 3, padding=1, groups=1)
        self.bn = nn.BatchNorm2d(11)

    def forward(self, x):
        return self.bn(torch.cat([self.conv_b(x), self.conv_a(x), self.up(x)], dim=self.dim))


@pytest.mark.parametrize("dim", [1, -3])
def test_norm_after_a_channel_concat_is_folded_slice_by_slice(dim: int) -> None:
    result = _fuse(ConcatOfBranches(dim), torch.randn(2, 3, 6, 6))
    (pair,) = result.report.fused
    assert pair.producer == "conv_b, conv_a, up"
    assert pair.kind == "cat(Conv2d, Conv2d, ConvTranspose2d)+BatchNorm2d"
    assert norm_names(result.model) == set()


class ConcatAlongWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=3))


def test_concat_along_another_axis_is_skipped() -> None:
    result = _fuse(ConcatAlongWidth(), torch.randn(2, 3, 4, 4))
    assert _skip(result, "bn") == Reason.CAT_AXIS


class TokenLinearBN(nn.Module):
    """A Linear over (B, N, C) tokens, flattened to (B*N, C) for BatchNorm1d(C), reshaped back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape(y.shape)


def test_linear_through_reshape_keeping_features_is_folded() -> None:
    result = _fuse(TokenLinearBN(), torch.randn(2, 7, 6))
    (pair,) = result.report.fused
    assert pair.kind == "Linear+reshape+BatchNorm1d"


class TokenLinearBNWrongAxis(nn.Module):
    """(B, N, C) viewed as (B*C, N): BatchNorm1d(N) then normalises tokens, not features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 7), nn.BatchNorm1d(7)

    def forward(self, x):
        y = self.fc(x)
        return self.bn(y.reshape(-1, 7))


def test_reshape_that_moves_the_features_is_skipped() -> None:
    """(2, 7, 7) reshaped to (14, 7): same last size, so the features stay last: folded. With the
    token count differing from the features, a view that mixes them must be refused."""
    result = _fuse(TokenLinearBNWrongAxis(), torch.randn(2, 7, 6))
    assert len(result.report.fused) == 1  # (2, 7, 7) -> (14, 7) keeps the last axis

    class Mixing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 4), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.fc(x).reshape(-1, 8))  # (2, 6, 4) -> (6, 8): features mixed

    result = _fuse(Mixing(), torch.randn(2, 6, 6))
    assert result.report.fused == []
    assert _skip(result, "bn") in (Reason.RESHAPE_AXIS, Reason.LINEAR_NOT_2D)


class ConvFlattenBN1d(nn.Module):
    """Conv2d output (N, C, H, W) viewed as (N, C, H*W) for BatchNorm1d(C): channels kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y.flatten(2))


def test_conv_through_flatten_keeping_channels_is_folded() -> None:
    result = _fuse(ConvFlattenBN1d(), torch.randn(2, 3, 6, 6))
    assert [p.kind for p in result.report.fused] == ["Conv2d+reshape+BatchNorm1d"]


def test_linear_on_3d_input_stays_safe() -> None:
    """The plain 3-D Linear -> BatchNorm1d trap: BatchNorm1d normalises axis 1 (tokens)."""

    class Trap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    result = _fuse(Trap(), torch.randn(2, 5, 6))
    assert result.report.fused == []
    assert _skip(result, "bn") == Reason.LINEAR_NOT_2D


class RepVGGBlock(nn.Module):
    """RepVGG: 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, then ReLU."""

    def __init__(self, channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=False),
                                   nn.BatchNorm2d(channels))
        self.one = nn.Sequential(nn.Conv2d(channels, channels, 1, stride, 0, groups=groups, bias=False),
                                 nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels) if stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class MobileOneBlock(nn.Module):
    """MobileOne: several 3x3 conv-BN branches, a 1x1 'scale' branch, a skip BN; no activation."""

    def __init__(self, channels: int, branches: int = 3) -> None:
        super().__init__()
        self.skip = nn.BatchNorm2d(channels)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels))
            for _ in range(branches)
        )
        self.scale = nn.Sequential(nn.Conv2d(channels, channels, 1, groups=channels, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.skip(x) + self.scale(x)
        for conv in self.convs:
            out = out + conv(x)
        return out


class RepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(4, stride=1)
        self.down = RepVGGBlock(4, stride=2, groups=2)
        self.mobile = MobileOneBlock(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.mobile(self.down(self.stem(x))).mean(dim=(2, 3)))


def test_reparam_merges_branch_blocks_into_one_conv() -> None:
    model = randomize_bn(RepNet()).eval()
    x = torch.randn(2, 4, 12, 12)
    plain = convfuse.fuse(model, x)
    assert {s.norm for s in plain.report.skipped} == {"stem.identity", "mobile.skip"}
    result = convfuse.fuse(model, x, reparam=True)
    assert result.report.verification.passed
    assert norm_names(result.model) == set()
    assert type(result.model) is RepNet
    merged = {m.module: m for m in result.report.reparam}
    assert set(merged) == {"stem", "down", "mobile"}
    assert (merged["stem"].branches, merged["down"].branches, merged["mobile"].branches) == (3, 2, 5)
    assert isinstance(result.model.mobile, nn.Conv2d) and result.model.mobile.groups == 4
    assert isinstance(result.model.stem, nn.Sequential)
    assert isinstance(result.model.stem.conv, nn.Conv2d) and isinstance(result.model.stem.act, nn.ReLU)
    assert result.model.down.conv.stride == (2, 2)
    assert result.report.skipped == []
    assert result.report.to_dict()["reparam"][0]["kernel"] == [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


class NearMiss(nn.Module):
    """Branches that cannot merge: a dilated conv and a zero-padding mismatch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.a(x) + self.b(x), self.c(x) + x


def test_reparam_leaves_blocks_whose_branches_do_not_line_up() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = NearMiss()

        def forward(self, x):
            return self.block(x)

    model = Holder().eval()
    result = convfuse.fuse(model, torch.randn(2, 4, 8, 8), reparam=True)
    assert result.report.reparam == []
    assert isinstance(result.model.block, NearMiss)


def test_identity_and_eval_dropout_between_conv_and_norm_are_passed_through() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Identity(), nn.Dropout(0.2), nn.BatchNorm2d(4))
    result = _fuse(model, torch.randn(2, 4, 8, 8))
    assert [(p.producer, p.norm) for p in result.report.fused] == [("0", "3")]
    assert isinstance(result.model[2], nn.Dropout)  # still there: it is what the model calls


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: the linear's output is also read, but only for its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_uses_that_only_read_the_shape_do_not_block_the_fold() -> None:
    result = _fuse(LinearNorm(), torch.randn(2, 7, 6))
    assert [p.kind for p in result.report.fused] == ["Linear+reshape+BatchNorm1d"]


# -- issue 14: hooks on a no-op module inside a sum or a concatenation ----------------------------


def _doubling_hook(module, args, output):
    return output * 2 + 1


class NoOpInside(nn.Module):
    """bn(mid(conv_a(x)) + conv_b(x)), or bn(cat([mid(conv_a(x)), conv_b(x)], 1)) where ``concat``,
    with ``mid`` a no-op module."""

    def __init__(self, mid: nn.Module, concat: bool = False) -> None:
        super().__init__()
        out = 4 if concat else 8
        self.conv_a, self.conv_b = nn.Conv2d(3, out, 3, padding=1), nn.Conv2d(3, out, 1)
        self.mid, self.bn, self.concat = mid, nn.BatchNorm2d(8), concat

    def forward(self, x):
        a, b = self.mid(self.conv_a(x)), self.conv_b(x)
        return self.bn(torch.cat([a, b], 1) if self.concat else a + b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mid", [nn.Identity, lambda: nn.Dropout(0.5)], ids=["identity", "dropout"])
@pytest.mark.parametrize("concat", [False, True], ids=["sum", "concat"])
def test_hooked_no_op_inside_a_sum_or_concat_is_skipped(concat: bool, mid, dtype: torch.dtype) -> None:
    model = randomize_bn(NoOpInside(mid(), concat)).eval().to(dtype)
    model.mid.register_forward_hook(_doubling_hook)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    result = convfuse.fuse(model, x)
    skip = {s.norm: s for s in result.report.skipped}["bn"]
    assert skip.reason == Reason.HOOKS_BETWEEN
    assert set(skip.producer.replace(",", " +").split(" + ")) == {"conv_a", "conv_b"}
    assert "bn" in norm_names(result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)  # nothing changed


def test_unhooked_no_op_inside_a_sum_still_folds() -> None:
    result = _fuse(NoOpInside(nn.Identity()), torch.randn(2, 3, 8, 8))
    assert [p.norm for p in result.report.fused] == ["bn"]
