"""Inputs for running a model: example inputs as call arguments, shapes inferred from the
first layer, and random batches drawn like a given one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["BATCH_SIZE", "Batch", "InputSpec", "as_batch", "as_call", "candidate_batches", "map_tensors", "similar_batch"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one forward call."""

BATCH_SIZE = 2
SEED = 0


@dataclass(frozen=True)
class InputSpec:
    """Example inputs described rather than given: random tensors of ``shapes`` (one per
    positional argument; None: inferred from the first layer) in ``dtype`` (None: the model's)."""

    shapes: tuple[tuple[int, ...], ...] | None = None
    dtype: torch.dtype | None = None


def as_batch(example: Any) -> Batch:
    """Example inputs as call arguments: a tensor is one argument, a tuple is the positional
    arguments, a dict the keyword arguments; anything else (a list of images) is one argument."""
    if isinstance(example, tuple) and not hasattr(example, "_fields"):
        return tuple(example), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    return (example,), {}


def as_call(example_inputs: Any) -> Batch:
    """Example inputs as (args, kwargs): a Batch stays as it is, anything else as ``as_batch`` reads it."""
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs
    return as_batch(example_inputs)


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (through tuples, lists, dicts, namedtuples)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _first_floating(model: nn.Module) -> Tensor | None:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def inputs_from_shapes(
    model: nn.Module, shapes: list[tuple[int, ...]], dtype: torch.dtype | None = None
) -> tuple[Tensor, ...]:
    """Random inputs of ``shapes`` with the model's parameter dtype (or ``dtype``) and device."""
    reference = _first_floating(model)
    dtype = dtype or (reference.dtype if reference is not None else torch.float32)
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(SEED)
    return tuple(torch.randn(shape, generator=generator).to(dtype=dtype, device=device) for shape in shapes)


_SPATIAL_CANDIDATES: dict[int, list[tuple[int, ...]]] = {
    1: [(256,), (64,)],
    2: [(224, 224), (32, 32), (64, 64), (299, 299)],
    3: [(8, 112, 112), (16, 64, 64), (16, 224, 224)],
}
_NORM_DIMS = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def inferred_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Candidate input shapes, from the first layer that tells its input's channels or features."""
    for module in model.modules():
        if isinstance(module, _ConvNd):
            dims = len(module.kernel_size)
            return [(BATCH_SIZE, module.in_channels, *spatial) for spatial in _SPATIAL_CANDIDATES[dims]]
        if isinstance(module, nn.Linear):
            return [(BATCH_SIZE, module.in_features)]
        if isinstance(module, _BatchNorm) and type(module) in _NORM_DIMS:
            dims = _NORM_DIMS[type(module)]
            if dims == 0:
                return [(BATCH_SIZE, module.num_features)]
            return [(BATCH_SIZE, module.num_features, *spatial) for spatial in _SPATIAL_CANDIDATES[dims]]
        if isinstance(module, nn.Embedding):
            break
    return []


def candidate_batches(model: nn.Module, example_inputs: Any) -> list[Batch]:
    """The first batch to try: the example inputs as given, else random inputs of the given or
    inferred shapes (several candidates when inferred; the first the model accepts wins)."""
    spec = example_inputs if isinstance(example_inputs, InputSpec) else None
    if spec is not None and spec.shapes:
        return [(inputs_from_shapes(model, list(spec.shapes), spec.dtype), {})]
    if example_inputs is not None and spec is None:
        return [as_batch(example_inputs)]
    dtype = spec.dtype if spec is not None else None
    return [(inputs_from_shapes(model, [shape], dtype), {}) for shape in inferred_shapes(model)]


def similar_batch(batch: Batch, generator: torch.Generator, spread: float) -> Batch:
    """A new batch shaped like ``batch``: floating tensors redrawn around their own mean, with
    ``spread`` times their own standard deviation; other values kept."""

    def redraw(value: Tensor) -> Tensor:
        if not value.is_floating_point() or value.numel() == 0:
            return value
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.device)
        mean = value.double().mean()
        std = value.double().std() if value.numel() > 1 else value.double().abs().clamp_min(1.0)
        return (mean + noise * std * spread).to(value.dtype)

    args, kwargs = batch
    return map_tensors(args, redraw), map_tensors(kwargs, redraw)
