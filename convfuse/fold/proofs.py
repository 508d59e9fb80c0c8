"""Local proofs that a fold is exact for a layer whose forward was overridden.

The fold is linear algebra on a layer's parameters. Running the layer on random float64 inputs
with its original and with its folded parameters, and finding agreement to float64 precision,
proves that its forward uses them the way the base class does: a conv with dynamic 'same'
padding passes, one that standardises its weight does not; a BatchNorm subclass whose forward
was analysed (``norms.analyse_norm``) passes only if the analysis was right.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from convfuse.fold.arithmetic import bn_scale_shift
from convfuse.fold.norms import NormFold

__all__ = ["Stats", "affine", "norm_proven", "producer_proven"]

Stats = tuple[Tensor, Tensor, float, "Tensor | None", "Tensor | None"]
"""running_mean, running_var, eps, weight, bias: the BatchNorm (part) one layer absorbs."""


def affine(x: Tensor, stats: Stats, axis: int) -> Tensor:
    """``x * scale + shift`` per channel along ``axis``: what a BatchNorm computes at eval."""
    scale, shift = bn_scale_shift(*stats)
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * scale.reshape(shape).to(x.device) + shift.reshape(shape).to(x.device)


def _agree(expected: Tensor, actual: Tensor) -> bool:
    if expected.shape != actual.shape:
        return False
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return bool(torch.allclose(actual, expected, rtol=0.0, atol=1e-9 * max(scale, 1e-30)))


def _probes(shape: tuple[int, ...], device: torch.device) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(device) for _ in range(2)]


def _made_up_shape(producer: nn.Module) -> tuple[int, ...]:
    """A small input that fits ``producer``, where the real run did not show one."""
    if isinstance(producer, nn.Linear):
        return (2, producer.in_features)
    spatial = [16 + d * (k - 1) for d, k in zip(producer.dilation, producer.kernel_size)]
    return (2, producer.in_channels, *spatial)


def norm_proven(norm: nn.Module, fold: NormFold, shape: tuple[int, ...] | None) -> bool:
    """Whether ``norm`` computes ``fold.remainder(batch_norm(x))`` with the folded statistics, on
    random float64 inputs of ``shape`` (the shape it saw in the real run, where known)."""
    shape = shape or (2, fold.running_mean.numel(), 8, 8)
    stats = (fold.running_mean, fold.running_var, fold.eps, fold.weight, fold.bias)
    try:
        original = copy.deepcopy(norm).to(torch.float64)
        remainder = copy.deepcopy(fold.remainder).to(torch.float64)
        with torch.no_grad():
            return all(
                _agree(original(x), remainder(affine(x, stats, 1))) for x in _probes(shape, fold.running_mean.device)
            )
    except Exception:  # a layer that cannot run alone or in float64 proves nothing
        return False


def producer_proven(
    producer: nn.Module,
    stats: Stats,
    weight: Tensor,
    bias: Tensor,
    *,
    norm_first: bool,
    shape: tuple[int, ...] | None,
) -> bool:
    """Whether ``producer`` with the folded ``weight``/``bias`` computes the BatchNorm's affine
    map of its original output (``norm_first``: its original output on the normalised input)."""
    shape = shape or _made_up_shape(producer)
    axis = -1 if isinstance(producer, nn.Linear) else 1
    try:
        original = copy.deepcopy(producer).to(torch.float64)
        folded = copy.deepcopy(original)
        with torch.no_grad():
            folded.weight.copy_(weight)
            folded.bias = nn.Parameter(bias.clone())
            for x in _probes(shape, producer.weight.device):
                if norm_first:
                    expected = original(affine(x, stats, axis))
                else:
                    expected = affine(original(x), stats, axis)
                if not _agree(expected, folded(x)):
                    return False
    except Exception:  # a layer that cannot run alone or in float64 proves nothing
        return False
    return True
