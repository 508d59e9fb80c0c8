"""Reading outputs leaf by leaf: paths, structure and exact differences, finite differences
relative to an output's scale, and whether outputs are evidence at all."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "describe_leaf",
    "evidence",
    "exact_difference",
    "leaves",
    "max_difference",
    "output_dtype",
    "paired_floats",
    "relative_difference",
    "scale",
    "structure_difference",
]


def leaves(obj: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested output, with a path that says where it is."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for name, value in zip(obj._fields, obj):
            yield from leaves(value, f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield path, type(obj)()
        for i, value in enumerate(obj):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def describe_leaf(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def structure_difference(expected: Any, actual: Any, path: str = "output", *, dtypes: bool = True) -> str | None:
    """Where two outputs differ in structure, shape or (``dtypes``) dtype; None where they match."""
    left, right = list(leaves(expected, path)), list(leaves(actual, path))
    for (path_a, a), (path_b, b) in zip(left, right):
        if path_a != path_b:
            return f"output structure differs: {path_a} vs {path_b}"
        if isinstance(a, Tensor) != isinstance(b, Tensor) or (
            isinstance(a, Tensor) and (a.shape != b.shape or (dtypes and a.dtype != b.dtype))
        ):
            return f"{path_a} is {describe_leaf(a)} in the original but {describe_leaf(b)} after fusing"
    if len(left) != len(right):
        extra = (left if len(left) > len(right) else right)[min(len(left), len(right))][0]
        return f"output structure differs at {extra}: {len(left)} leaves in the original, {len(right)} after fusing"
    return None


def exact_difference(expected: Any, actual: Any, path: str = "output") -> str | None:
    """Where integer/bool tensors or non-numeric leaves differ (those must match exactly)."""
    for (where, a), (_, b) in zip(leaves(expected, path), leaves(actual, path)):
        if isinstance(a, Tensor):
            if not a.is_floating_point() and not torch.equal(a, b):
                return f"{where} differs from the original ({describe_leaf(a)}, compared exactly)"
        elif isinstance(a, float) and isinstance(b, float):
            continue
        elif a != b:
            return f"{where} differs from the original: {a!r} vs {b!r}"
    return None


def paired_floats(expected: Any, actual: Any, path: str = "output") -> Iterator[tuple[str, Tensor, Tensor]]:
    for (where, a), (_, b) in zip(leaves(expected, path), leaves(actual, path)):
        if isinstance(a, float) and isinstance(b, float):
            a, b = torch.tensor(a), torch.tensor(b)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point():
            yield where, a, b


def scale(tensor: Tensor) -> float:
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.double().abs().max()) if finite.numel() else 0.0


def max_difference(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| over the finite entries; inf where non-finite entries disagree."""
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    infinite = torch.isinf(a) | torch.isinf(b)
    if not torch.equal(a[infinite], b[infinite]):
        return math.inf
    finite = ~(torch.isnan(a) | infinite)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def relative_difference(a: Tensor, b: Tensor) -> float:
    difference, size = max_difference(a, b), scale(a)
    if difference == 0.0:
        return 0.0
    return difference / size if size > 0 else math.inf


def output_dtype(output: Any) -> torch.dtype:
    for _, leaf in leaves(output):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return torch.float32



def _finite(value: Any) -> int:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex():
            return int(torch.isfinite(value).sum())
        return value.numel()
    return 0


def evidence(outputs: Sequence[Any]) -> tuple[dict[str, int], str | None]:
    """Finite tensor elements per output path over ``outputs`` (one per batch), and why they are
    not evidence (None where they are): every tensor empty or non-finite, or the same outputs
    for every batch (they do not depend on the inputs)."""
    compared: dict[str, int] = {}
    for output in outputs:
        for path, value in leaves(output):
            if isinstance(value, Tensor):
                compared[path] = compared.get(path, 0) + _finite(value)
    if not any(compared.values()):
        return compared, "every output tensor is empty or non-finite (NaN/inf)" if compared else "no output tensors"
    if len(outputs) > 1 and all(_same(outputs[0], other) for other in outputs[1:]):
        return compared, "the outputs are the same for every batch (they do not depend on the inputs)"
    return compared, None


def _same(a: Any, b: Any) -> bool:
    if structure_difference(a, b) is not None:
        return False
    for (_, x), (_, y) in zip(leaves(a), leaves(b)):
        if isinstance(x, Tensor) and not torch.equal(x, y) and not _same_with_nan(x, y):
            return False
    return True


def _same_with_nan(x: Tensor, y: Tensor) -> bool:
    return x.is_floating_point() and torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(x.nan_to_num(), y.nan_to_num())
