"""Which pairs are fused and which are skipped, with which Reason: one tiny model per trap."""

from __future__ import annotations

import copy
import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import convfuse
from convfuse import Reason
from tests.conftest import norm_names, randomize_bn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _x(channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


def _fuse(model: nn.Module, example: torch.Tensor, seed: int = 0) -> convfuse.FuseResult:
    """Randomised statistics, eval mode, fused and verified against the original."""
    randomize_bn(model, seed).eval()
    with torch.no_grad():
        expected = model(example)
    result = convfuse.fuse(model, example)
    with torch.no_grad():
        actual = result.model(example)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    return result


def _fused(result: convfuse.FuseResult) -> set[tuple[str, str]]:
    return {(pair.producer, pair.norm) for pair in result.report.fused}


def _skipped(result: convfuse.FuseResult) -> dict[str, convfuse.Skipped]:
    skipped = {skip.norm: skip for skip in result.report.skipped}
    assert len(skipped) == len(result.report.skipped), "a norm is reported twice"
    return skipped


def _assert_skipped(
    result: convfuse.FuseResult, norm: str, reason: str, producer: str | None = "conv"
) -> None:
    skip = _skipped(result)[norm]
    assert skip.reason == reason
    if producer is not None:
        assert skip.producer == producer
    assert norm in norm_names(result.model)
    assert norm not in {pair.norm for pair in result.report.fused}


# -- the simplest fused pair ----------------------------------------------------------------


class ConvBN(nn.Module):
    """The plain pair: conv -> bn, nothing else."""

    def __init__(self, cin: int = 3, cout: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_plain_pair_is_fused() -> None:
    result = _fuse(ConvBN(), _x())
    assert _fused(result) == {("conv", "bn")}
    assert result.report.skipped == []
    assert result.report.fused[0].kind == "Conv2d+BatchNorm2d"
    assert norm_names(result.model) == set()


# -- a module or value used more than once -------------------------------------------------


class ConvOutputUsedTwice(nn.Module):
    """The conv's output also feeds a residual add: folding would change the add's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_used_twice() -> None:
    result = _fuse(ConvOutputUsedTwice(), _x())
    _assert_skipped(result, "bn", Reason.OTHER_USERS)
    assert result.report.fused == []


class ConvCalledTwice(nn.Module):
    """One conv applied to two inputs, each followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))


def test_conv_called_twice() -> None:
    result = _fuse(ConvCalledTwice(), _x())
    _assert_skipped(result, "bn1", Reason.CALLED_TWICE)
    _assert_skipped(result, "bn2", Reason.CALLED_TWICE)
    assert result.report.fused == []


class BNCalledTwice(nn.Module):
    """One BN applied after two different convs: it cannot be folded into both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv1(x)) * self.bn(self.conv2(x))


def test_bn_called_twice() -> None:
    result = _fuse(BNCalledTwice(), _x())
    _assert_skipped(result, "bn", Reason.CALLED_TWICE, producer=None)
    assert result.report.fused == []


class SharedBNNames(nn.Module):
    """The same BN object registered as ``bn`` and ``bn_alias``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn_alias = self.bn

    def forward(self, x):
        return self.bn(self.conv(x))


def test_bn_registered_under_two_names() -> None:
    result = _fuse(SharedBNNames(), _x())
    assert result.report.fused == []
    assert [s.reason for s in result.report.skipped] == [Reason.SHARED_NAMES]
    assert result.model.bn is result.model.bn_alias
    assert isinstance(result.model.bn, nn.BatchNorm2d)


class SharedConvWeight(nn.Module):
    """Two convs hold the same weight Parameter; folding one BN would change the other conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2.weight = self.conv1.weight
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn1(self.conv1(x)) + self.bn2(self.conv2(x))


def test_conv_weight_shared_by_two_convs() -> None:
    result = _fuse(SharedConvWeight(), _x())
    _assert_skipped(result, "bn1", Reason.SHARED_PARAMETER, producer="conv1")
    _assert_skipped(result, "bn2", Reason.SHARED_PARAMETER, producer="conv2")
    assert result.model.conv1.weight is result.model.conv2.weight


# -- the forward reads the layers' tensors itself -------------------------------------------


class ReadsBNWeight(nn.Module):
    """forward adds ``self.bn.weight`` itself: folding rewrites what it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn.weight.view(1, -1, 1, 1)


class ReadsRunningMean(nn.Module):
    """forward subtracts the buffer ``self.bn.running_mean`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.bn.running_mean.view(1, -1, 1, 1)


class ReadsConvWeight(nn.Module):
    """forward uses ``self.conv.weight`` beside the conv (a weight-norm penalty, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.abs().sum()


@pytest.mark.parametrize("model_cls", [ReadsBNWeight, ReadsRunningMean, ReadsConvWeight])
def test_forward_reads_tensors_directly(model_cls: type[nn.Module]) -> None:
    result = _fuse(model_cls(), _x())
    _assert_skipped(result, "bn", Reason.DIRECT_ACCESS)
    assert result.report.fused == []


# -- hooks and parametrizations -------------------------------------------------------------


def _with_hook(kind: str) -> nn.Module:
    model = ConvBN()
    if kind == "bn_forward_hook":
        model.bn.register_forward_hook(lambda module, args, output: output * 2)
    elif kind == "conv_forward_hook":
        model.conv.register_forward_hook(lambda module, args, output: output + 1)
    elif kind == "bn_pre_hook":
        model.bn.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    else:
        model.conv.register_forward_pre_hook(lambda module, args: (args[0] - 1,))
    return model


@pytest.mark.parametrize("kind", ["bn_forward_hook", "conv_forward_hook", "bn_pre_hook", "conv_pre_hook"])
def test_hooks(kind: str) -> None:
    """A hook on either layer runs code between or around the pair."""
    result = _fuse(_with_hook(kind), _x())
    _assert_skipped(result, "bn", Reason.HOOKS)
    assert result.report.fused == []


class Doubled(nn.Module):
    def forward(self, weight):
        return weight * 2


@pytest.mark.parametrize("layer", ["conv", "bn"])
def test_parametrized(layer: str) -> None:
    """A parametrization recomputes the weight from an original at every access."""
    model = ConvBN()
    parametrize.register_parametrization(getattr(model, layer), "weight", Doubled())
    result = _fuse(model, _x())
    _assert_skipped(result, "bn", Reason.PARAMETRIZED)


# -- statistics and modes -------------------------------------------------------------------


def test_no_running_stats() -> None:
    """track_running_stats=False: even at eval the BN normalises with the batch's statistics."""
    model = ConvBN()
    model.bn = nn.BatchNorm2d(8, track_running_stats=False)
    result = _fuse(model, _x())
    assert not result.model.training
    _assert_skipped(result, "bn", Reason.NO_RUNNING_STATS)


class TwoPairs(nn.Module):
    """Two conv -> bn pairs in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_bn_left_in_training_mode() -> None:
    """The root is in eval but one BN was put back in train mode: it uses batch statistics."""
    model = randomize_bn(TwoPairs()).eval()
    model.bn2.train()
    result = convfuse.fuse(model, _x())
    _assert_skipped(result, "bn2", Reason.TRAINING, producer="conv2")
    assert _fused(result) == {("conv1", "bn1")}


# -- Linear -> BatchNorm1d ------------------------------------------------------------------


class LinearBN(nn.Module):
    """Linear -> BatchNorm1d: BN normalises dim 1, Linear transforms the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_bn_on_2d_input_is_fused() -> None:
    result = _fuse(LinearBN(), torch.randn(4, 6))
    assert _fused(result) == {("fc", "bn")}
    assert result.report.fused[0].kind == "Linear+BatchNorm1d"


def test_linear_bn_on_3d_input_is_skipped() -> None:
    """(N, 6, 6): the Linear's features are the last axis, the BN's channels axis 1."""
    result = _fuse(LinearBN(), torch.randn(4, 6, 6))
    _assert_skipped(result, "bn", Reason.LINEAR_NOT_2D, producer="fc")


# -- BN with no producer, and BN before a conv ----------------------------------------------


class BNAfterReLU(nn.Module):
    """conv -> relu -> bn: the BN's input is not a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


def test_bn_after_relu_has_no_producer() -> None:
    result = _fuse(BNAfterReLU(), _x())
    _assert_skipped(result, "bn", Reason.NO_PRODUCER, producer=None)


class BNThenConv(nn.Module):
    """bn -> conv (the BN reads the model's input)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = conv

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_before_zero_padded_conv() -> None:
    """Zeros padded after the BN are not bn(anything): the fold would change the borders."""
    result = _fuse(BNThenConv(nn.Conv2d(4, 6, 3, padding=1)), _x(4))
    _assert_skipped(result, "bn", Reason.ZERO_PADDING)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": 0},
        {"padding": "valid"},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular"},
        {"padding": 2, "padding_mode": "replicate"},
        {"padding": "same", "padding_mode": "reflect"},
    ],
)
def test_bn_before_conv_without_zero_padding_is_fused(conv_kwargs: dict) -> None:
    """No padding, or padding that copies bn(x) values: exact, folded with the norm first."""
    result = _fuse(BNThenConv(nn.Conv2d(4, 6, 3, **conv_kwargs)), _x(4))
    assert _fused(result) == {("conv", "bn")}
    assert result.report.fused[0].kind == "BatchNorm2d+Conv2d"
    assert result.model.conv.padding_mode == conv_kwargs.get("padding_mode", "zeros")


def test_bn_before_transposed_conv() -> None:
    """A transposed conv's borders sum fewer inputs, so the BN's shift cannot be absorbed."""
    result = _fuse(BNThenConv(nn.ConvTranspose2d(4, 6, 3)), _x(4))
    _assert_skipped(result, "bn", Reason.TRANSPOSED_AFTER)


class UnusedBN(nn.Module):
    """A BN registered in __init__ and never called in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.spare = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_bn_never_called() -> None:
    result = _fuse(UnusedBN(), _x())
    assert _fused(result) == {("conv", "bn")}
    _assert_skipped(result, "spare", Reason.NOT_CALLED, producer=None)


# -- untraceable code ------------------------------------------------------------------------


class Branchy(nn.Module):
    """Data-dependent control flow (``if x.sum() > 0``): torch.fx cannot trace this forward.

    Its own conv -> bn pair runs in that untraced code; the pair in ``inner`` is inside a
    child, which can be traced on its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.inner = ConvBN(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            x = self.bn(self.conv(x))
        else:
            x = -x
        return self.inner(x)


class WithBranchy(nn.Module):
    """A traceable root around an untraceable block, with a pair of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block = Branchy()

    def forward(self, x):
        return self.block(torch.relu(self.stem_bn(self.stem(x))))


def test_untraceable_block_children_still_fused() -> None:
    model = WithBranchy()
    example = _x().abs()  # takes the branch that calls block.conv and block.bn
    result = _fuse(model, example)
    assert _fused(result) == {("stem", "stem_bn"), ("block.inner.conv", "block.inner.bn")}
    assert [u.module for u in result.report.untraced] == ["block"]
    assert result.report.untraced[0].reason
    _assert_skipped(result, "block.bn", Reason.NOT_TRACED, producer=None)
    assert norm_names(result.model) == {"block.bn"}


# -- pairing by data flow -------------------------------------------------------------------


class RegisteredOutOfOrder(nn.Module):
    """Modules registered in an order unrelated to the order they are called."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm2d(4)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Crossed(nn.Module):
    """conv_a feeds bn_b and conv_b feeds bn_a: the names and registration order both mislead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(8, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn_a(self.conv_b(torch.relu(self.bn_b(self.conv_a(x)))))


def test_pairing_follows_data_flow_not_registration() -> None:
    result = _fuse(RegisteredOutOfOrder(), _x())
    assert _fused(result) == {("conv1", "bn1"), ("conv2", "bn2")}


def test_crossed_names_are_paired_by_data_flow() -> None:
    result = _fuse(Crossed(), _x())
    assert _fused(result) == {("conv_a", "bn_b"), ("conv_b", "bn_a")}
    assert norm_names(result.model) == set()


class AliasedConv(nn.Module):
    """The conv registered as ``conv`` and ``conv_alias``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_alias = self.conv
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_conv_registered_under_two_names() -> None:
    result = _fuse(AliasedConv(), _x())
    _assert_skipped(result, "bn", Reason.SHARED_NAMES, producer=None)


def test_global_hooks() -> None:
    """A global forward hook runs code on every module's output, the pair's included."""
    from torch.nn.modules.module import register_module_forward_hook

    handle = register_module_forward_hook(lambda module, args, output: None)
    try:
        result = _fuse(ConvBN(), _x())
    finally:
        handle.remove()
    _assert_skipped(result, "bn", Reason.GLOBAL_HOOKS)


class BNThenLinear(nn.Module):
    """BatchNorm1d -> Linear: foldable only where the BN's channels are the Linear's features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(features, 7)

    def forward(self, x):
        return self.fc(self.bn(x))


def test_bn_before_linear_on_2d_input_is_fused() -> None:
    result = _fuse(BNThenLinear(5), torch.randn(4, 5))
    assert _fused(result) == {("fc", "bn")}
    assert result.report.fused[0].kind == "BatchNorm1d+Linear"


def test_bn_before_linear_on_3d_input_is_skipped() -> None:
    """(N, 5, 6): the BN normalises axis 1, the Linear reads the last axis."""
    result = _fuse(BNThenLinear(6), torch.randn(4, 5, 6))
    _assert_skipped(result, "bn", Reason.LINEAR_NOT_2D, producer="fc")


# -- traps the pass does not see yet ---------------------------------------------------------


class UnbatchedConv1dBN(nn.Module):
    """Conv1d accepts an unbatched (C, L) input; BatchNorm1d then reads (C_out, L) as (N, C), so
    with L == C_out it normalises the length axis, not the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_conv1d_on_unbatched_input_is_skipped() -> None:
    result = _fuse(UnbatchedConv1dBN(), torch.randn(3, 8))
    assert result.report.fused == []
    assert _skipped(result)["bn"].reason == Reason.NOT_CHANNELS


class UnbatchedBNConv1d(nn.Module):
    """BatchNorm1d(6) reads a (4, 6) input as (N, C); Conv1d(4, ...) reads it as unbatched (C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.conv = nn.Conv1d(4, 8, 3)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_bn_then_conv1d_on_unbatched_input_is_skipped() -> None:
    result = _fuse(UnbatchedBNConv1d(), torch.randn(4, 6))
    assert result.report.fused == []
    assert _skipped(result)["bn"].reason == Reason.NOT_CHANNELS


class UntracedReader(nn.Module):
    """An untraceable forward that reads its child's BN weight: fx never sees the read."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvBN(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x) * self.inner.bn.weight.view(1, -1, 1, 1)
        return self.inner(x)


def test_untraced_code_reading_a_child_bn_parameter() -> None:
    result = _fuse(UntracedReader(), _x(8).abs())
    assert [u.module for u in result.report.untraced] == ["(model)"]
    assert result.report.fused == []
    assert _skipped(result)["inner.bn"].reason == Reason.DIRECT_ACCESS


class CallsPartsDirectly(nn.Module):
    """The untraceable root calls its child's conv and norm itself, with an add between them:
    the child's own graph (bn(conv(x))) is not how they are used."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBN(3, 8)

    def forward(self, x):
        if x.sum() > -1e9:  # the root does not trace; block is traced on its own
            return self.block.bn(self.block.conv(x) + 1.0)
        return self.block(x)


def test_pair_called_from_outside_its_traced_part_is_skipped() -> None:
    model = randomize_bn(CallsPartsDirectly()).eval()
    x = torch.randn(2, 3, 8, 8)
    for verify in (True, False):
        result = convfuse.fuse(model, x, verify=verify)
        assert result.report.fused == []
        skip = _skipped(result)["block.bn"]
        assert skip.reason == Reason.REACHED  # read from the code, before anything runs
        assert skip.detail == "CallsPartsDirectly.forward calls self.block.bn"


class TwoInputsUntraceable(nn.Module):
    """Two inputs (nothing to infer them from) and an untraceable root that reuses the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBN(3, 8)

    def forward(self, x, z):
        if x.sum() > -1e9:
            return self.block(x), self.block.bn(z)
        return self.block(x), z


def test_part_below_untraceable_code_without_inputs_is_skipped() -> None:
    model = randomize_bn(TwoInputsUntraceable()).eval()
    result = convfuse.fuse(model, convfuse.InputSpec(), verify=False)  # nothing can be run
    assert result.report.fused == []
    skip = _skipped(result)["block.bn"]
    assert (skip.reason, skip.detail) == (Reason.REACHED, "TwoInputsUntraceable.forward calls self.block.bn")


class ByName(nn.Module):
    """Untraceable code that takes its child's layers by name, through a function of another
    package: reading the code cannot see which modules the strings name; the real run can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBN(3, 8)

    def forward(self, x, z):
        if x.sum() > -1e9:
            conv, bn = operator.attrgetter("block.conv", "block.bn")(self)
            return bn(conv(x) + 1.0), z
        return self.block(x), z


def test_calls_the_code_does_not_show_are_caught_by_the_real_run() -> None:
    model = randomize_bn(ByName()).eval()
    result = convfuse.fuse(model, (torch.randn(2, 3, 8, 8), torch.randn(2)))
    assert _skipped(result)["block.bn"].reason == Reason.OUTSIDE_PART
    unseen = convfuse.fuse(model, convfuse.InputSpec(), verify=False)  # two inputs: nothing can be run
    assert _skipped(unseen)["block.bn"].reason == Reason.UNOBSERVED


class InspectsItsChild(nn.Module):
    """Untraceable code outside the fused part that looks at the norm module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.block = ConvBN(3, 8)

    def forward(self, x):
        y = self.block(x)
        if isinstance(self.block.bn, nn.BatchNorm2d) and x.sum() > -1e9:
            return y
        return y * 2 + 1


def test_outside_code_that_sees_the_rewrite_fails_verification() -> None:
    """The fused part matches on its own inputs, but the model's output changed and the original
    is continuous: that is no rounding jump, and verification must fail."""
    model = randomize_bn(InspectsItsChild()).eval()
    with pytest.raises(convfuse.VerificationError):
        convfuse.fuse(model, torch.randn(2, 3, 8, 8))


class StepsInAList(nn.Module):
    """Calls its layers through a plain Python list: rewriting the module tree would not reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.steps = [self.conv, self.bn]

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x


def test_module_also_held_in_a_plain_list_is_skipped() -> None:
    model = randomize_bn(StepsInAList()).eval()
    x = torch.randn(2, 3, 8, 8)
    for verify in (True, False):
        result = convfuse.fuse(model, x, verify=verify)
        assert _skipped(result)["bn"].reason == Reason.HELD_ELSEWHERE


# -- issue 14: a module also held in a plain container, any kind and depth ---------------------

DTYPES = [torch.float32, torch.bfloat16]


def _assert_same(model: nn.Module, fused: nn.Module, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """The fused model's outputs equal the original's, in ``dtype``, on every input given."""
    model, fused = model.to(dtype), fused.to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for x in inputs:
            x = x.to(dtype)
            expected, actual = model(x), fused(x)
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


class _Namespace:
    """A plain object that keeps a reference."""

    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm


# How a module keeps its norm besides the module tree, and how its forward takes it from there.
HOLDERS = {
    "underscore list": (lambda bn: [bn], lambda held: held[0]),
    "tuple": (lambda bn: (bn,), lambda held: held[0]),
    "dict": (lambda bn: {"bn": bn}, lambda held: held["bn"]),
    "set": (lambda bn: {bn}, lambda held: next(iter(held))),
    "nested list": (lambda bn: [[bn]], lambda held: held[0][0]),
    "deep mix": (lambda bn: {"a": [(1, {"b": [bn]})]}, lambda held: held["a"][0][1]["b"][0]),
    "dict key": (lambda bn: {bn: "norm"}, lambda held: next(iter(held))),
    "plain object": (lambda bn: _Namespace(bn), lambda held: held.norm),
    "object in a list": (lambda bn: [_Namespace(bn)], lambda held: held[0].norm),
    "closure": (lambda bn: (lambda x: bn(x)), lambda held: held),
    "bound method": (lambda bn: bn.__call__, lambda held: held),
    "partial": (lambda bn: functools.partial(bn), lambda held: held),
    "module outside the tree": (lambda bn: [nn.Sequential(bn)], lambda held: held[0]),
}


class HeldNorm(nn.Module):
    """Its norm is also held in ``self._held`` (a plain attribute); ``via_container``: the forward
    calls it from there (else through the module tree, and the container only keeps it)."""

    def __init__(self, kind: str, via_container: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        make, self._take = HOLDERS[kind]
        self._held = make(self.bn)
        self.via_container = via_container

    def forward(self, x):
        norm = self._take(self._held) if self.via_container else self.bn
        return norm(self.conv(x))


# fx cannot trace a call through these (a bound method made before tracing, a module outside the tree)
UNTRACEABLE_HOLDERS = {"bound method", "module outside the tree"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("via_container", [True, False], ids=["called from it", "only kept"])
@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_module_held_in_any_plain_container_is_skipped(kind: str, via_container: bool, dtype: torch.dtype) -> None:
    model = randomize_bn(HeldNorm(kind, via_container)).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    result = convfuse.fuse(model, x.to(dtype), inplace=True)  # no copy to hide what the holder sees
    untraced = via_container and kind in UNTRACEABLE_HOLDERS
    _assert_skipped(result, "bn", Reason.NOT_TRACED if untraced else Reason.HELD_ELSEWHERE,
                    producer=None if untraced else "conv")
    _assert_same(original.eval(), result.model, [x, -x], dtype)


class HeldWeight(nn.Module):
    """A view of its conv's weight is kept in a plain list: a fold writes that storage in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self._weights = [self.conv.weight.detach()]

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self._weights[0], padding=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_held_in_a_plain_container_is_skipped(dtype: torch.dtype) -> None:
    model = randomize_bn(HeldWeight()).eval().to(dtype)
    model._weights = [model.conv.weight.detach()]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x.to(dtype))
    # A copy would not share the storage, nor would the float64 reference run (it gives the
    # parameters new storage); without them the fold would write into the list's tensor too.
    result = convfuse.fuse(model, x.to(dtype), inplace=True, verify=False)
    _assert_skipped(result, "bn", Reason.TENSOR_HELD_ELSEWHERE)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x.to(dtype)), expected, rtol=0, atol=0)


# -- issue 14: hooks on a no-op module between the pair ----------------------------------------


def _doubling_hook(module, args, output):
    return output * 2 + 1


def _doubling_pre_hook(module, args):
    return (args[0] * 2 + 1,)


NO_OPS = {
    "identity": nn.Identity,
    "dropout": lambda: nn.Dropout(0.3),
    "dropout2d": lambda: nn.Dropout2d(0.3),
    "alpha dropout": lambda: nn.AlphaDropout(0.3),
    "feature alpha dropout": lambda: nn.FeatureAlphaDropout(0.3),
}


class HookedBetween(nn.Module):
    """conv -> a no-op module (with hooks set by the test) -> bn."""

    def __init__(self, no_op: str) -> None:
        super().__init__()
        self.conv, self.mid, self.bn = nn.Conv2d(3, 8, 3, padding=1), NO_OPS[no_op](), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.mid(self.conv(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hook", ["forward", "pre"])
@pytest.mark.parametrize("no_op", sorted(NO_OPS))
def test_hooked_no_op_between_the_pair_is_skipped(no_op: str, hook: str, dtype: torch.dtype) -> None:
    model = randomize_bn(HookedBetween(no_op)).eval().to(dtype)
    if hook == "forward":
        model.mid.register_forward_hook(_doubling_hook)
    else:
        model.mid.register_forward_pre_hook(_doubling_pre_hook)
    x = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, x.to(dtype))
    _assert_skipped(result, "bn", Reason.HOOKS_BETWEEN)
    _assert_same(model, result.model, [x], dtype)


class Block(nn.Module):
    """Returns its conv's output: the norm after it is its parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class NormAfterBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.bn = Block(), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.block(x))


def test_observing_hook_on_a_module_the_pair_crosses_is_skipped() -> None:
    """fx traces through ``block``; its hook only records what it returns, so the outputs agree
    either way, but after a fold it would record the normalised values."""
    model = randomize_bn(NormAfterBlock()).eval()
    seen: list[torch.Tensor] = []
    model.block.register_forward_hook(lambda module, args, output: seen.append(output))
    x = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, x)
    _assert_skipped(result, "bn", Reason.HOOKS_BETWEEN, producer="block.conv")
    seen.clear()
    with torch.no_grad():
        model(x), result.model(x)
    torch.testing.assert_close(seen[1], seen[0])


class DoublingIdentity(nn.Identity):
    """An nn.Identity subclass whose forward is not the identity, and does not trace."""

    def forward(self, x):
        if x.sum() > -1e9:
            return x * 2 + 1
        return x


def test_identity_subclass_with_its_own_forward_is_not_passed_through() -> None:
    model = randomize_bn(HookedBetween("identity")).eval()
    model.mid = DoublingIdentity()
    x = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, x)
    _assert_skipped(result, "bn", Reason.NO_PRODUCER, producer=None)
    _assert_same(model, result.model, [x], torch.float32)


# -- issue 14: untraced code that reaches inside a part, on a branch the inputs do not take --------


class Untaken(nn.Module):
    """Untraceable; the example's positive inputs take the first branch; the second calls the
    part's norm directly. Subclasses change the second branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ConvBN(3, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.other(x)

    def other(self, x):
        return self.a.bn(self.a.conv(x) * 2)


class UntakenGetattr(Untaken):
    def other(self, x):
        name = "bn"
        return getattr(self.a, f"{name}")(self.a(x))


class UntakenChildren(Untaken):
    def other(self, x):
        for layer in self.a.children():
            x = layer(x)
        return x * 2


class UntakenProperty(Untaken):
    @property
    def norm(self):
        return self.a.bn

    def other(self, x):
        return self.norm(self.a(x))


def _apply_norm(norm, x):
    return norm(x)


class UntakenHelperFunction(Untaken):
    def other(self, x):
        return _apply_norm(self.a.bn, self.a(x))


class UntakenLambda(Untaken):
    def other(self, x):
        part = self.a
        run = lambda y: part.bn(y)
        return run(self.a(x))


class UntakenReadsWeight(Untaken):
    def other(self, x):
        return self.a(x) * self.a.bn.weight.view(1, -1, 1, 1)


class UntakenModules(Untaken):
    def other(self, x):
        norms = [m for m in self.a.modules() if isinstance(m, nn.BatchNorm2d)]
        return norms[0](self.a(x))


class PartWithHelper(ConvBN):
    def norm_again(self, x):
        return self.bn(x)


class UntakenPartMethod(Untaken):
    """Calls a method of the part itself, whose body uses the part's norm outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = PartWithHelper(3, 8)

    def other(self, x):
        return self.a.norm_again(self.a(x))


UNTAKEN = {
    "direct call": (Untaken, "Untaken.other calls self.a.bn", Reason.REACHED),
    "getattr": (UntakenGetattr, "UntakenGetattr.other calls self.a.bn", Reason.REACHED),
    "children": (UntakenChildren, "UntakenChildren.other calls self.a.bn", Reason.REACHED),
    "property": (UntakenProperty, "UntakenProperty.other calls self.a.bn", Reason.REACHED),
    "helper function": (UntakenHelperFunction, "_apply_norm calls a.bn", Reason.REACHED),
    "lambda": (UntakenLambda, "UntakenLambda.other calls self.a.bn", Reason.REACHED),
    "reads a weight": (UntakenReadsWeight, "UntakenReadsWeight.other reads self.a.bn.weight", Reason.DIRECT_ACCESS),
    "modules()": (UntakenModules, "UntakenModules.other calls self.a.bn", Reason.REACHED),
    "part's method": (UntakenPartMethod, "PartWithHelper.norm_again calls self.bn", Reason.REACHED),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(UNTAKEN))
def test_untraced_branch_the_inputs_do_not_take_is_read(case: str, dtype: torch.dtype) -> None:
    cls, detail, reason = UNTAKEN[case]
    model = randomize_bn(cls()).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8).abs()  # takes the first branch only
    result = convfuse.fuse(model, x.to(dtype))
    skip = _skipped(result)["a.bn"]
    assert (skip.reason, skip.detail) == (reason, detail)
    assert "a.bn" in norm_names(result.model)
    _assert_same(model, result.model, [x, -x], dtype)  # -x takes the other branch


class Unreadable(Untaken):
    """Its forward is defined by exec: there is no source to read."""


exec("def _forward(self, x):\n    return self.a(x) if x.sum() > 0 else self.a.bn(self.a.conv(x) * 2)", globals())  # noqa: S102
Unreadable.forward = _forward  # type: ignore[name-defined]  # noqa: F821


def test_untraced_code_without_source_is_skipped() -> None:
    model = randomize_bn(Unreadable()).eval()
    x = torch.randn(2, 3, 8, 8).abs()
    result = convfuse.fuse(model, x)
    skip = _skipped(result)["a.bn"]
    assert skip.reason == Reason.NO_SOURCE
    assert skip.detail == "_forward has no source to read"
    _assert_same(model, result.model, [x, -x], torch.float32)


# -- the uses that stay safe ----------------------------------------------------------------------


class Layer(ConvBN):
    """A layer of a model list with plain data attributes, as ultralytics' modules have."""

    def __init__(self, index: int) -> None:
        super().__init__(8, 8)
        self.i, self.f, self.type = index, -1 if index != 2 else 0, "Layer"


class SafeUses(nn.Module):
    """Untraceable code that only calls its parts whole, iterates a list of them, reads their data
    attributes and parameter metadata, compares and inspects them: every pair folds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.layers = nn.Sequential(*(Layer(i) for i in range(3)))
        self.save = [0]

    def forward(self, x):
        device = next(self.parameters()).device
        x = self.stem(x.to(device))
        outputs = []
        for m in self.layers:
            if m.f != -1:
                x = outputs[m.f]
            if isinstance(m, Layer) and m is not self.layers[-1] or x.sum() > 0:
                x = m(x)
            else:
                x = m(x) * 2
            outputs.append(x if m.i in self.save else None)
        return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parts_called_whole_or_iterated_are_folded(dtype: torch.dtype) -> None:
    model = randomize_bn(SafeUses()).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, x.to(dtype))
    assert result.report.skipped == []
    assert norm_names(result.model) == set()
    assert [u.module for u in result.report.untraced] == ["(model)"]
    _assert_same(model, result.model, [x, -x], dtype)


# -- issue 14: a Linear + BatchNorm1d pair never run --------------------------------------------


class NeverRunHead(nn.Module):
    """The head (a part below untraceable code) runs only for 5-channel inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBN(3, 8)
        self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        y = self.body(x)
        if x.shape[1] == 5 and x.sum() > 0:
            return self.head(y.mean((2, 3)))
        return y


def test_pair_in_a_part_never_run_is_reported_as_never_called() -> None:
    result = _fuse(NeverRunHead(), _x())
    assert _fused(result) == {("body.conv", "body.bn")}
    _assert_skipped(result, "head.1", Reason.NOT_CALLED, producer="head.0")
