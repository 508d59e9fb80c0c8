"""Weight arithmetic that folds a BatchNorm into the layer beside it: tensors in, tensors out.

The math follows ``torch/nn/utils/fusion.py`` (same argument names) but is done in float64,
so folding adds no error of its own to float16/bfloat16 models, and it handles grouped
transposed convolutions, whose output channels are spread over the weight's first two axes.
A Linear weight is a convolution weight with ``groups=1`` and no spatial axes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bn_scale_shift",
    "fold_weights",
    "fuse_bn_conv_weights",
    "fuse_conv_bn_weights",
    "split_stats",
]


def bn_scale_shift(
    bn_rm: Tensor,
    bn_rv: Tensor,
    bn_eps: float,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The per-channel affine map ``bn(x) = x * scale + shift`` of a BatchNorm at eval, in float64."""
    scale = torch.rsqrt(bn_rv.double() + bn_eps)
    if bn_w is not None:
        scale = scale * bn_w.double()
    shift = -bn_rm.double() * scale
    if bn_b is not None:
        shift = shift + bn_b.double()
    return scale, shift


def _scale_channels(weight: Tensor, scale: Tensor, *, axis: int, groups: int) -> Tensor:
    """Multiply ``weight`` by ``scale`` along its channel ``axis`` (0 or 1), groups-aware.

    For axis 0 the channel is simply ``weight[c]``. For axis 1 (input channels of a conv,
    output channels of a transposed conv) channel ``c`` of group ``g`` lives at
    ``weight[g * (A/groups) + a, c - g * per_group]`` for every ``a`` of that group.
    """
    if axis == 0:
        return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    lead = weight.shape[0]
    per_group = weight.shape[1]
    grouped = weight.reshape(groups, lead // groups, per_group, *weight.shape[2:])
    factor = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    return (grouped * factor).reshape(weight.shape)


def _sum_channels(weight: Tensor, shift: Tensor, *, groups: int) -> Tensor:
    """``sum over input channels and kernel of weight * shift[input channel]``, per output channel."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, out_channels // groups, per_group, -1)
    summed = (grouped * shift.reshape(groups, 1, per_group, 1)).sum(dim=(2, 3))
    return summed.reshape(out_channels)


def fuse_conv_bn_weights(
    conv_w: Tensor,
    conv_b: Tensor | None,
    bn_rm: Tensor,
    bn_rv: Tensor,
    bn_eps: float,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv (or linear), in float64.

    ``conv_w`` is laid out as (out, in/groups, *k) for a conv or a Linear, and as
    (in, out/groups, *k) for a transposed conv (``transpose=True``).
    """
    scale, shift = bn_scale_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    # conv_w in its own dtype times a float64 scale computes (and returns) float64 in one pass.
    fused_w = _scale_channels(conv_w, scale, axis=1 if transpose else 0, groups=groups)
    bias = conv_b.double() if conv_b is not None else torch.zeros_like(scale)
    return fused_w, bias * scale + shift


def fuse_bn_conv_weights(
    conv_w: Tensor,
    conv_b: Tensor | None,
    bn_rm: Tensor,
    bn_rv: Tensor,
    bn_eps: float,
    bn_w: Tensor | None,
    bn_b: Tensor | None,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``conv(bn(x))`` as one conv (or linear), in float64.

    Exact only where the conv never sees padding added after the BatchNorm with zeros (a
    zero of ``bn(x)`` is not ``bn`` of anything the folded conv would see); the caller checks
    that. Not for transposed convs, whose output borders sum fewer inputs.
    """
    scale, shift = bn_scale_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b)
    fused_w = _scale_channels(conv_w, scale, axis=1, groups=groups)
    fused_b = _sum_channels(conv_w, shift, groups=groups)
    if conv_b is not None:
        fused_b = fused_b + conv_b.double()
    return fused_w, fused_b


Stats = tuple[Tensor, Tensor, float, "Tensor | None", "Tensor | None"]
"""running_mean, running_var, eps, weight, bias: a BatchNorm's eval-time statistics."""

Producer = tuple[Tensor, "Tensor | None", bool, int]
"""weight, bias, transposed, groups: one conv (or linear: groups 1, not transposed)."""


def split_stats(stats: Stats, index: int, combine: str, sizes: list[int]) -> Stats:
    """The part of a norm that producer ``index`` absorbs: of a sum, every term is scaled but only
    the first takes the shift; of a channel concatenation (``combine`` ``"cat"``), each part takes
    its own channel slice of ``sizes``."""
    running_mean, running_var, eps, weight, _ = stats
    if combine == "sum" and index > 0:
        return torch.zeros_like(running_mean), running_var, eps, weight, None
    if combine == "cat":
        start = sum(sizes[:index])
        part = slice(start, start + sizes[index])
        return tuple(t[part] if isinstance(t, Tensor) else t for t in stats)  # type: ignore[return-value]
    return stats


def fold_weights(
    producers: list[Producer], stats: Stats, *, combine: str = "direct", norm_first: bool = False
) -> list[tuple[Tensor, Tensor]]:
    """Float64 weight and bias of each producer once the norm is folded into them: the norm after
    their combined outputs (``combine``: ``"direct"``, ``"sum"``, ``"cat"``), or, ``norm_first``,
    before the one producer."""
    if norm_first:
        ((weight, conv_bias, _, groups),) = producers
        return [fuse_bn_conv_weights(weight, conv_bias, *stats, groups=groups)]
    sizes = [w.shape[1] * g if t else w.shape[0] for w, _, t, g in producers]
    return [
        fuse_conv_bn_weights(weight, bias, *split_stats(stats, i, combine, sizes), transpose=t, groups=g)
        for i, (weight, bias, t, g) in enumerate(producers)
    ]
