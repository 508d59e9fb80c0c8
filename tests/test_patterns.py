"""Which pairs are fused and which are skipped, with which Reason: one tiny model per trap."""

from __future__ import annotations

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
        assert skip.detail == "CallsPartsDirectly.forward calls self.block.conv"


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
