"""The folding math against the layers it replaces, computed in float64: bn(conv(x)) and conv(bn(x))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from convfuse.fold.arithmetic import fuse_bn_conv_weights, fuse_conv_bn_weights
from tests.conftest import randomize_bn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

F64 = torch.float64

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


def _bn(dim: int, channels: int, seed: int, **kwargs) -> nn.Module:
    """An eval-mode BatchNorm in float64 with random statistics."""
    return randomize_bn(BN[dim](channels, dtype=F64, **kwargs), seed).eval()


def _stats(bn: nn.Module) -> tuple:
    return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias


def _with_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    folded = copy.deepcopy(layer)
    assert weight.dtype == F64 and bias.dtype == F64
    assert weight.shape == layer.weight.shape
    folded.weight = nn.Parameter(weight)
    folded.bias = nn.Parameter(bias)
    return folded


def _assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.1  # a non-trivial output: the comparison can fail
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-12 * scale)


# (in_channels, out_channels, groups): plain, grouped with out/groups != in/groups, depthwise
CONV_SHAPES = [(4, 6, 1), (4, 6, 2), (6, 3, 3), (4, 8, 4)]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), CONV_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_bn(dim: int, cin: int, cout: int, groups: int, bias: bool) -> None:
    """bn(conv(x)) as one conv, zero padding and stride included (exact for conv -> bn)."""
    stride = 2 if dim == 1 else 1
    conv = CONV[dim](cin, cout, 3, padding=1, stride=stride, groups=groups, bias=bias, dtype=F64)
    bn = _bn(dim, cout, seed=dim + cin + groups)
    x = torch.randn(2, cin, *SPATIAL[dim], dtype=F64)
    weight, fused_bias = fuse_conv_bn_weights(conv.weight, conv.bias, *_stats(bn), groups=groups)
    with torch.no_grad():
        _assert_exact(_with_weights(conv, weight, fused_bias)(x), bn(conv(x)))


# (in_channels, out_channels, groups) for transposed convs, whose weight is (in, out/groups, *k)
TRANSPOSED_SHAPES = [(4, 6, 1), (4, 6, 2), (6, 3, 3), (3, 6, 3), (6, 9, 3), (4, 4, 4)]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), TRANSPOSED_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_conv_then_bn(dim: int, cin: int, cout: int, groups: int, bias: bool) -> None:
    """Transposed convs spread output channels over the weight's first two axes (grouped)."""
    conv = CONV_T[dim](
        cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias, dtype=F64
    )
    bn = _bn(dim, cout, seed=10 + dim + cin + groups)
    x = torch.randn(2, cin, *SPATIAL[dim], dtype=F64)
    weight, fused_bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, *_stats(bn), transpose=True, groups=groups
    )
    with torch.no_grad():
        _assert_exact(_with_weights(conv, weight, fused_bias)(x), bn(conv(x)))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "groups"), CONV_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_bn_then_conv(dim: int, cin: int, cout: int, groups: int, bias: bool, padding_mode: str) -> None:
    """conv(bn(x)) as one conv: exact with no padding, or padding that copies bn(x) values."""
    padding = 0 if padding_mode == "zeros" else 1
    conv = CONV[dim](
        cin, cout, 3, padding=padding, padding_mode=padding_mode, groups=groups, bias=bias, dtype=F64
    )
    bn = _bn(dim, cin, seed=20 + dim + cin + groups)
    x = torch.randn(2, cin, *SPATIAL[dim], dtype=F64)
    weight, fused_bias = fuse_bn_conv_weights(conv.weight, conv.bias, *_stats(bn), groups=groups)
    with torch.no_grad():
        _assert_exact(_with_weights(conv, weight, fused_bias)(x), conv(bn(x)))


@pytest.mark.parametrize("order", ["conv_bn", "bn_conv"])
@pytest.mark.parametrize("bn_kwargs", [{"affine": False}, {"eps": 0.37}, {"eps": 1e-3, "affine": False}])
def test_non_affine_and_odd_eps(order: str, bn_kwargs: dict) -> None:
    """A BN without weight/bias (None passed) and an eps far from the default."""
    conv = nn.Conv2d(4, 6, 3, padding=1 if order == "conv_bn" else 0, dtype=F64)
    bn = _bn(2, 6 if order == "conv_bn" else 4, seed=3, **bn_kwargs)
    assert (bn.weight is None) == (not bn_kwargs.get("affine", True))
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    with torch.no_grad():
        if order == "conv_bn":
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, *_stats(bn))
            expected = bn(conv(x))
        else:
            weight, bias = fuse_bn_conv_weights(conv.weight, conv.bias, *_stats(bn))
            expected = conv(bn(x))
        _assert_exact(_with_weights(conv, weight, bias)(x), expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_then_bn(bias: bool, affine: bool) -> None:
    """A Linear weight (out, in) is a conv weight without spatial axes."""
    linear = nn.Linear(5, 7, bias=bias, dtype=F64)
    bn = _bn(1, 7, seed=4, affine=affine)
    x = torch.randn(3, 5, dtype=F64)
    weight, fused_bias = fuse_conv_bn_weights(linear.weight, linear.bias, *_stats(bn))
    with torch.no_grad():
        _assert_exact(_with_weights(linear, weight, fused_bias)(x), bn(linear(x)))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_then_linear(bias: bool, affine: bool) -> None:
    """BatchNorm1d on (N, features) then Linear: the scale goes to the Linear's input axis."""
    linear = nn.Linear(5, 7, bias=bias, dtype=F64)
    bn = _bn(1, 5, seed=5, affine=affine)
    x = torch.randn(3, 5, dtype=F64)
    weight, fused_bias = fuse_bn_conv_weights(linear.weight, linear.bias, *_stats(bn))
    with torch.no_grad():
        _assert_exact(_with_weights(linear, weight, fused_bias)(x), linear(bn(x)))


def test_inputs_not_modified() -> None:
    """The fold returns new tensors and leaves the layer's own weight and statistics alone."""
    conv = nn.Conv2d(4, 6, 3, dtype=F64)
    bn = _bn(2, 6, seed=6)
    before = [t.clone() for t in (conv.weight, conv.bias, *bn.parameters(), *bn.buffers())]
    fuse_conv_bn_weights(conv.weight, conv.bias, *_stats(bn))
    fuse_bn_conv_weights(conv.weight, conv.bias, *_stats(_bn(2, 4, seed=7)))
    after = [conv.weight, conv.bias, *bn.parameters(), *bn.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _fold_in_dtype(conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b):
    """The naive fold, every operation in the layer's own (low-precision) dtype."""
    scale = torch.rsqrt(bn_rv + bn_eps) * bn_w
    weight = conv_w * scale.reshape(-1, *([1] * (conv_w.dim() - 1)))
    return weight, (conv_b - bn_rm) * scale + bn_b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float64_fold_beats_low_precision_fold(dtype: torch.dtype) -> None:
    """Folding in float64 then casting loses less than folding in float16/bfloat16."""
    conv = nn.Conv2d(32, 64, 3, dtype=dtype)
    bn = randomize_bn(nn.BatchNorm2d(64, dtype=dtype), seed=8).eval()
    stats = _stats(bn)
    assert conv.weight.dtype == dtype and bn.running_var.dtype == dtype

    # Reference: the exact fold of the very values the layers hold.
    exact_w, exact_b = fuse_conv_bn_weights(conv.weight, conv.bias, *stats)
    assert exact_w.dtype == F64

    ours_w, ours_b = exact_w.to(dtype), exact_b.to(dtype)
    with torch.no_grad():
        naive_w, naive_b = _fold_in_dtype(conv.weight, conv.bias, *stats)
    assert naive_w.dtype == dtype

    def error(tensor: torch.Tensor, exact: torch.Tensor) -> float:
        return (tensor.double() - exact).abs().sum().item()

    assert error(ours_w, exact_w) < error(naive_w, exact_w)
    assert error(ours_b, exact_b) < error(naive_b, exact_b)
    # Casting a correctly folded value costs at most half a unit in the last place.
    info = torch.finfo(dtype)
    bound = 0.5 * info.eps * exact_w.abs() * (1 + 1e-6) + 0.5 * info.eps * info.smallest_normal
    assert ((ours_w.double() - exact_w).abs() <= bound).all()
