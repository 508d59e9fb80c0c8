"""What plain Python objects hold: the modules and tensors reachable from an attribute's value.

Used to find modules (and tensors) that something besides the module tree also keeps, in lists,
dicts, plain objects, closures and the like, at any depth.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["BOOKKEEPING", "held_objects", "module_contents"]

BOOKKEEPING = frozenset(vars(nn.Module()))
"""The attributes every nn.Module has (parameters, buffers, children, hooks, flags)."""

_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, type, types.ModuleType,
          types.BuiltinFunctionType)


def held_objects(roots: Iterable[Any], *, inside: Any = None, limit: int = 200_000) -> Iterator[Any]:
    """Every module and tensor reachable from ``roots`` through plain containers and objects (lists,
    tuples, sets, dicts, attributes of plain objects, closures, bound methods, partials, weak
    references), each once. A module for which ``inside(module)`` is true (the model's own) is
    yielded and not entered; any other module is yielded and entered (its children, tensors and
    attributes). Stops after ``limit`` objects."""
    seen: set[int] = set()
    stack = list(roots)
    steps = 0
    while stack:
        value = stack.pop()
        if isinstance(value, _ATOMS) or id(value) in seen:
            continue
        seen.add(id(value))
        steps += 1
        if steps > limit:
            return
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, nn.Module):
            yield value
            if inside is None or not inside(value):
                stack.extend(module_contents(value, plain_only=False))
        else:
            stack.extend(_contents(value))


def module_contents(module: nn.Module, *, plain_only: bool) -> list[Any]:
    """What a module holds: its instance attributes other than nn.Module's bookkeeping, and
    (``plain_only=False``) also its children, parameters and buffers."""
    state = vars(module)
    found = [value for key, value in state.items() if key not in BOOKKEEPING]
    if not plain_only:
        for key in ("_modules", "_parameters", "_buffers"):
            found.extend(v for v in state.get(key, {}).values() if v is not None)
    return found


def _contents(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)) or type(value).__name__ == "deque":
        return list(value)
    if isinstance(value, weakref.ref):
        target = value()
        return [target] if target is not None else []
    if isinstance(value, types.MethodType):
        return [value.__self__, value.__func__]
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:
                continue
        return [*cells, *(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values()]
    found = []
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        found.extend(state.values())
    for slot in getattr(type(value), "__slots__", ()) or ():
        if isinstance(slot, str) and hasattr(value, slot) and slot not in ("__dict__", "__weakref__"):
            try:
                found.append(getattr(value, slot))
            except Exception:  # noqa: BLE001, S112 - a slot that cannot be read holds nothing we can see
                continue
    return found
