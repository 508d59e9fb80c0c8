"""The fuse pass end to end: outputs equal, BNs gone, the user's model kept, the input untouched."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

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

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (10,), 2: (7, 6), 3: (5, 4, 5)}

# How many units of rounding (of the output's largest magnitude) the fused output may differ by:
# a wrong fold differs by order 1.
ULPS = {torch.float64: 256, torch.float32: 64, torch.float16: 8, torch.bfloat16: 8}


def _assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    assert scale > 0.1  # a non-trivial output: the comparison can fail
    atol = ULPS[expected.dtype] * torch.finfo(expected.dtype).eps * scale
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, tensor in snapshot.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def _hyperparameters(model: nn.Module) -> dict[str, tuple]:
    """Everything that defines a producer layer except its weight and bias values."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            found[name] = (
                type(module), module.in_channels, module.out_channels, module.kernel_size,
                module.padding_mode, module.padding, module.stride, module.dilation, module.groups,
                module.output_padding, module.transposed,
                module.weight.dtype, module.weight.device, module.weight.shape,
            )
        elif isinstance(module, nn.Linear):
            found[name] = (type(module), module.in_features, module.out_features, module.weight.dtype)
    return found


def _check_fuse(
    model: nn.Module,
    example: torch.Tensor,
    *,
    left: set[str] = frozenset(),
    replacement: type[nn.Module] = nn.Identity,
    **kwargs,
) -> convfuse.FuseResult:
    """Fuse a copy of ``model`` (eval, randomised BNs) and check what every fuse must do.

    Outputs equal; every BN but ``left`` replaced by ``replacement``; the class, attributes and
    conv hyperparameters kept; the input model bit-identical and still holding its BNs.
    """
    model.eval()
    before_norms = norm_names(model)
    assert before_norms, "a test model without BatchNorm proves nothing"
    with torch.no_grad():
        expected = model(example)
    snapshot = _snapshot(model)
    hyper = _hyperparameters(model)
    children = [name for name, _ in model.named_children()]
    originals = {name: model.get_submodule(name) for name in before_norms}

    result = convfuse.fuse(model, example, **kwargs)

    fused = result.model
    assert fused is not model
    assert type(fused) is type(model)
    assert [name for name, _ in fused.named_children()] == children
    assert norm_names(fused) == set(left)
    for name in before_norms - set(left):
        assert type(fused.get_submodule(name)) is replacement, name
    assert {pair.norm for pair in result.report.fused} == before_norms - set(left)
    assert _hyperparameters(fused) == hyper
    assert result.report.verification.passed is True
    assert result.report.norm_layers.before == len(before_norms)
    assert result.report.norm_layers.after == len(left)
    with torch.no_grad():
        _assert_outputs_close(fused(example), expected)

    # The input model is untouched.
    _assert_same_state(model, snapshot)
    assert norm_names(model) == before_norms
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    return result


class Net(nn.Module):
    """A user's model: conv -> bn -> relu, with a method and an attribute that must survive."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = nn.ReLU()
        self.tag = "keep-me"

    def describe(self) -> str:
        return f"{self.tag}:{type(self.conv).__name__}"

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) - 0.25


def _net(conv: nn.Module, bn: nn.Module, seed: int = 0) -> Net:
    return randomize_bn(Net(conv, bn), seed).eval()


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (in_channels, out_channels, groups)
GROUPS = {"plain": (4, 6, 1), "grouped": (4, 6, 2), "depthwise": (4, 8, 4)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_bn_outputs_equal(dim: int, padding_mode: str, groups: str, dtype: torch.dtype) -> None:
    cin, cout, g = GROUPS[groups]
    conv = CONV[dim](cin, cout, 3, padding=1, padding_mode=padding_mode, groups=g, dtype=dtype)
    model = _net(conv, BN[dim](cout, dtype=dtype), seed=dim)
    result = _check_fuse(model, torch.randn(2, cin, *SPATIAL[dim], dtype=dtype))
    assert result.model.describe() == "keep-me:" + type(conv).__name__
    assert result.model.tag == "keep-me"
    assert [(p.producer, p.norm, p.kind) for p in result.report.fused] == [
        ("conv", "bn", f"{type(conv).__name__}+{BN[dim].__name__}")
    ]
    assert result.model.conv.weight.dtype == dtype and result.model.conv.bias.dtype == dtype


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": 2},
        {"padding": (1, 2), "kernel_size": (3, 5)},
        {"padding": "same", "kernel_size": (3, 4)},
        {"padding": "same", "dilation": 2},
        {"padding": "valid"},
        {"stride": 2, "padding": 1},
        {"stride": (2, 1), "dilation": (1, 2), "padding": (0, 2)},
        {"padding": 1, "bias": False},
        {"padding": "same", "padding_mode": "reflect", "bias": False, "dilation": 2},
    ],
    ids=str,
)
def test_conv_hyperparameters(conv_kwargs: dict) -> None:
    """Padding as int, tuple, 'same', 'valid'; stride; dilation; no bias (one is created)."""
    kwargs = {"kernel_size": 3, **conv_kwargs}
    conv = nn.Conv2d(3, 6, **kwargs)
    result = _check_fuse(_net(conv, nn.BatchNorm2d(6)), torch.randn(2, 3, 11, 10))
    fused_conv = result.model.conv
    assert fused_conv.bias is not None and fused_conv.bias.shape == (6,)
    assert fused_conv.padding == conv.padding


@pytest.mark.parametrize(
    "bn_kwargs",
    [{"affine": False}, {"eps": 1e-3}, {"momentum": None}, {"eps": 0.3, "affine": False}],
    ids=str,
)
@pytest.mark.parametrize("bias", [True, False])
def test_bn_options(bn_kwargs: dict, bias: bool) -> None:
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
    _check_fuse(_net(conv, nn.BatchNorm2d(6, **bn_kwargs)), torch.randn(2, 3, 8, 8))


# (in_channels, out_channels, groups) for transposed convs
TRANSPOSED = [(4, 6, 1), (4, 6, 2), (6, 3, 3), (3, 6, 3)]


@pytest.mark.parametrize(("cin", "cout", "groups"), TRANSPOSED)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_transposed_conv_bn(dim: int, cin: int, cout: int, groups: int) -> None:
    conv = CONV_T[dim](cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups)
    _check_fuse(_net(conv, BN[dim](cout), seed=groups), torch.randn(2, cin, *SPATIAL[dim]))


class PreNorm(nn.Module):
    """bn -> conv, the BN folded into the conv after it (no zero padding)."""

    def __init__(self, bn: nn.Module, conv: nn.Module) -> None:
        super().__init__()
        self.bn = bn
        self.conv = conv

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bn_before_conv_outputs_equal(dim: int, groups: str, padding_mode: str) -> None:
    cin, cout, g = GROUPS[groups]
    padding = 0 if padding_mode == "zeros" else 1
    conv = CONV[dim](cin, cout, 3, padding=padding, padding_mode=padding_mode, groups=g)
    model = randomize_bn(PreNorm(BN[dim](cin), conv), seed=dim).eval()
    result = _check_fuse(model, torch.randn(2, cin, *SPATIAL[dim]))
    assert result.report.fused[0].kind == f"{BN[dim].__name__}+{type(conv).__name__}"


class Sandwich(nn.Module):
    """bn0 -> conv -> bn1: the conv absorbs both, in the order the model applies them."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn1 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(self.conv(self.bn0(x)))


def test_conv_between_two_bns() -> None:
    result = _check_fuse(randomize_bn(Sandwich()), torch.randn(2, 4, 7, 7))
    assert {(p.producer, p.norm) for p in result.report.fused} == {("conv", "bn0"), ("conv", "bn1")}


def test_linear_bn_outputs_equal() -> None:
    model = _net(nn.Linear(5, 7), nn.BatchNorm1d(7))
    _check_fuse(model, torch.randn(4, 5))


# -- other norm layers ------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sync_batchnorm(dim: int) -> None:
    """SyncBatchNorm on CPU at eval normalises like BatchNorm."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(Net(CONV[dim](3, 6, 3, padding=1), BN[dim](6)))
    assert type(model.bn) is nn.SyncBatchNorm
    randomize_bn(model, seed=dim).eval()
    result = _check_fuse(model, torch.randn(2, 3, *SPATIAL[dim]))
    assert result.report.fused[0].kind == f"{CONV[dim].__name__}+SyncBatchNorm"


def test_frozen_batchnorm() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = Net(nn.Conv2d(3, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6, eps=1e-3))
    randomize_bn(model, seed=5).eval()
    result = _check_fuse(model, torch.randn(2, 3, 8, 8))
    assert result.report.fused[0].kind == "Conv2d+FrozenBatchNorm2d"


# -- the API's promises ------------------------------------------------------------------


def test_inplace_returns_and_mutates_the_same_model() -> None:
    model = _net(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
    example = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(example)
    weight_before = model.conv.weight.detach().clone()
    result = convfuse.fuse(model, example, inplace=True)
    assert result.model is model
    assert norm_names(model) == set()
    assert type(model.bn) is nn.Identity
    assert not torch.equal(model.conv.weight, weight_before)
    with torch.no_grad():
        _assert_outputs_close(model(example), expected)


def test_failed_verification_leaves_input_untouched() -> None:
    """With zero tolerance the fused float32 model's rounding fails verification: nothing changes."""
    model = _net(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16))
    snapshot = _snapshot(model)
    with pytest.raises(convfuse.VerificationError) as raised:
        convfuse.fuse(model, torch.randn(2, 3, 8, 8), atol=0.0, rtol=0.0)
    assert raised.value.report is not None
    assert raised.value.report.verification.passed is False
    _assert_same_state(model, snapshot)
    assert type(model.bn) is nn.BatchNorm2d


def test_training_mode_is_refused() -> None:
    model = _net(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).train()
    snapshot = _snapshot(model)
    with pytest.raises(convfuse.TrainingModeError, match=r"\.eval\(\)"):
        convfuse.fuse(model, torch.randn(2, 3, 8, 8))
    _assert_same_state(model, snapshot)


def test_report_to_dict() -> None:
    """The JSON report's keys, and counts that agree with the models."""
    model = _net(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    result = _check_fuse(model, torch.randn(2, 3, 8, 8))
    report = json.loads(json.dumps(result.report.to_dict()))
    assert report["fused"] == [{"producer": "conv", "norm": "bn", "kind": "Conv2d+BatchNorm2d"}]
    assert report["skipped"] == [] and report["untraced"] == []
    assert report["verification"]["passed"] is True
    assert report["norm_layers"] == {"before": 1, "after": 0}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert report["parameters"] == {"before": count(model), "after": count(result.model)}


class Untraceable(nn.Module):
    """The root's forward branches on data (``if x.mean() > 0``): torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4),
        )
        self.head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        if x.mean() > 0:
            x = self.features(x)
        else:
            x = self.features(-x)
        return self.head(x.mean(dim=(2, 3)))


def test_untraceable_root_still_fuses_children() -> None:
    result = _check_fuse(randomize_bn(Untraceable()), torch.randn(2, 3, 8, 8))
    assert [u.module for u in result.report.untraced] == ["(model)"]
    assert {(p.producer, p.norm) for p in result.report.fused} == {
        ("features.0", "features.1"), ("features.3", "features.4"), ("head.0", "head.1")
    }


def test_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18(weights=None), seed=18).eval()
    result = _check_fuse(model, torch.randn(1, 3, 64, 64))
    assert len(result.report.fused) == 20
    assert result.report.skipped == []


# -- norm and conv subclasses -------------------------------------------------------------

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: normalise, then an activation chosen by name."""

    def __init__(self, num_features: int, act: str = "relu", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = ACTS[act]()

    def forward(self, x):
        x = super().forward(x)
        return self.act(x)


class BNDropAct(nn.BatchNorm2d):
    """Normalise, dropout (identity at eval), then an activation."""

    def __init__(self, num_features: int, act: str = "relu") -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(0.3)
        self.act = ACTS[act]()

    def forward(self, x):
        x = super().forward(x)
        x = self.drop(x)
        return self.act(x)


class ConvNorm(nn.Module):
    """conv -> norm -> a constant shift (so the output is not all rectified)."""

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x)) + 0.5


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("norm_cls", [BNAct, BNDropAct])
def test_norm_with_activation_is_fused(norm_cls: type[nn.Module], act: str) -> None:
    """The statistics fold into the conv; the norm becomes a Sequential of its own act module
    (an nn.Identity where the act is one: identities are dropped, they compute nothing)."""
    model = randomize_bn(ConvNorm(nn.Conv2d(3, 6, 3, padding=1), norm_cls(6, act=act))).eval()
    act_module = model.norm.act
    example = torch.randn(2, 3, 8, 8)
    expected_type = nn.Identity if all(type(m) is nn.Identity for m in model.norm.children()) else nn.Sequential
    _check_fuse(copy.deepcopy(model), example, replacement=expected_type)  # the non-inplace promises
    with torch.no_grad():
        expected = model(example)
    result = convfuse.fuse(model, example, inplace=True)
    assert result.report.fused[0].kind == f"Conv2d+{norm_cls.__name__}"
    replacement = model.norm
    assert type(replacement) is expected_type
    if not isinstance(act_module, nn.Identity):
        assert any(module is act_module for module in replacement)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in replacement.modules())
    with torch.no_grad():
        _assert_outputs_close(model(example), expected)


class Conv2dSame(nn.Conv2d):
    """TensorFlow-style 'same' padding computed from the input size in forward (timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward: scaling the weight (the fold) is undone by it."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_conv_with_dynamic_same_padding_is_fused() -> None:
    model = ConvNorm(Conv2dSame(3, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6))
    result = _check_fuse(randomize_bn(model), torch.randn(2, 3, 9, 8))
    assert result.report.fused[0].kind == "Conv2dSame+BatchNorm2d"
    assert type(result.model.conv) is Conv2dSame


def test_weight_standardised_conv_is_not_fused() -> None:
    model = ConvNorm(StdConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
    result = _check_fuse(randomize_bn(model), torch.randn(2, 3, 8, 8), left={"norm"})
    [skip] = result.report.skipped
    assert (skip.norm, skip.producer, skip.reason) == ("norm", "conv", Reason.NOT_PROVEN)


def test_norm_with_activation_before_conv_is_not_fused() -> None:
    """Pre-activation: the act sits between the statistics and the conv they would fold into."""
    model = randomize_bn(PreNorm(BNAct(4, act="relu"), nn.Conv2d(4, 6, 3))).eval()
    result = _check_fuse(model, torch.randn(2, 4, 8, 8), left={"bn"})
    [skip] = result.report.skipped
    assert (skip.norm, skip.producer, skip.reason) == ("bn", "conv", Reason.NORM_DOES_MORE_BEFORE)


class DoubledVarBN(nn.BatchNorm2d):
    """A subclass that normalises with its statistics in its own way (twice the variance)."""

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var * 2, self.weight, self.bias, False, 0.0, self.eps
        )


def test_norm_using_statistics_otherwise_is_not_fused() -> None:
    model = ConvNorm(nn.Conv2d(3, 6, 3, padding=1), DoubledVarBN(6))
    result = _check_fuse(randomize_bn(model), torch.randn(2, 3, 8, 8), left={"norm"})
    [skip] = result.report.skipped
    assert skip.norm == "norm"
    assert skip.reason in (Reason.NORM_FORWARD, Reason.NOT_PROVEN)


def test_memory_format_kept() -> None:
    """A channels_last conv keeps its layout: the folded weight is written into it."""
    model = _net(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).to(memory_format=torch.channels_last)
    result = _check_fuse(model, torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert result.model.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_inputs_inferred_from_first_layer() -> None:
    """Without example inputs, fuse builds them from the first conv's channels and verifies."""
    model = _net(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
    result = convfuse.fuse(model)
    assert result.report.verification.passed is True
    assert norm_names(result.model) == set()
    example = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _assert_outputs_close(result.model(example), model(example))


def test_verify_false_still_fuses() -> None:
    model = _net(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
    example = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, example, verify=False)
    assert result.report.verification.passed is None
    assert norm_names(result.model) == set() and norm_names(model) == {"bn"}
    with torch.no_grad():
        _assert_outputs_close(result.model(example), model(example))


@pytest.mark.parametrize("norm_cls", [nn.BatchNorm2d, BNDropAct])
def test_fused_model_stays_in_eval_mode(norm_cls: type[nn.Module]) -> None:
    model = randomize_bn(ConvNorm(nn.Conv2d(3, 6, 3, padding=1), norm_cls(6))).eval()
    result = convfuse.fuse(model, torch.randn(2, 3, 8, 8))
    assert len(result.report.fused) == 1
    assert [name for name, m in result.model.named_modules() if m.training] == []


def test_runs_leave_a_training_mode_norm_as_it_was() -> None:
    """A BatchNorm left in training mode is skipped, and the verification runs (which update its
    running statistics) must not change it either."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                       nn.BatchNorm2d(4))).eval()
    model[4].train()
    before = {k: v.clone() for k, v in model[4].state_dict().items()}
    result = convfuse.fuse(model, torch.randn(2, 3, 8, 8), inplace=True)
    assert {s.norm: s.reason for s in result.report.skipped} == {"4": Reason.TRAINING}
    assert all(torch.equal(v, before[k]) for k, v in model[4].state_dict().items())
