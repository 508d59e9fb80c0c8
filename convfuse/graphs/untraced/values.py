"""The values convfuse's code reader (``convfuse.graphs.untraced``) computes with: what an expression may be.

An expression of the code being read evaluates to a frozenset of these, everything it may be at run
time. ``DATA`` stands for any value that holds none of the model's modules (an activation, a
number, an object not followed); the others name the model's modules, their tensors, collections
of them, and the functions and objects through which code reaches them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATA",
    "NOTHING",
    "ONLY_DATA",
    "Bound",
    "Children",
    "External",
    "Instance",
    "Known",
    "Method",
    "Mods",
    "ModuleMethod",
    "Nested",
    "Seq",
    "Super",
    "Tensors",
    "Tup",
    "bounded",
    "leaves",
    "one",
]

class _Data:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DATA"


DATA = _Data()


@dataclass(frozen=True)
class Mods:
    """One of these modules of the model (qualified names)."""

    names: frozenset[str]


@dataclass(frozen=True)
class Tensors:
    """Parameters or buffers of these modules (``subtree``: or of the modules below them)."""

    names: frozenset[str]
    subtree: bool
    attr: str = ""  # the attribute it was read as (``weight``), for reports


@dataclass(frozen=True)
class Seq:
    """A collection (list, iterator, generator, dict) whose items may be any of ``items``."""

    items: frozenset


@dataclass(frozen=True)
class Tup:
    """A tuple or list display whose items are known position by position."""

    items: tuple[frozenset, ...]


@dataclass(frozen=True)
class Children:
    """``module._modules``: the children of a module, by name."""

    name: str


class Known:
    """A concrete Python object (function, class, Python module, plain object), by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Known) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


@dataclass(frozen=True)
class Bound:
    """A Python function bound to ``self_values`` (a method)."""

    func: Known
    self_values: frozenset


@dataclass(frozen=True)
class ModuleMethod:
    """A method of nn.Module itself (``parameters``, ``modules``, ``apply``, ...) on these modules."""

    name: str
    names: frozenset[str]


@dataclass(frozen=True)
class Method:
    """A method of a value the reader models itself (a tensor's metadata, a list's ``append``)."""

    name: str
    receiver: frozenset


@dataclass(frozen=True)
class Instance:
    """An object of a class of the model's own code, created by the code being read."""

    cls: Known


@dataclass(frozen=True)
class Nested:
    """A function or lambda defined inside the code being read (it sees that code's names)."""

    node: ast.AST
    scope: Any  # the frames.Scope of the code that defines it
    func: Known  # the function whose code defines it (globals, display name)
    self_values: frozenset
    defining: type | None


@dataclass(frozen=True)
class Super:
    """``super()``: the methods after ``after`` in the MRO of ``self_values``' class."""

    self_values: frozenset
    after: Known


@dataclass(frozen=True)
class External:
    """A name imported by the code being read that is not loaded (nothing is imported here)."""

    name: str


def one(value: Any) -> frozenset:
    return frozenset((value,))


_MAX_DEPTH = 3  # containers nested deeper than this are read as one flat collection
_MAX_TUPLE = 16


def leaves(value: Any, out: set) -> None:
    if isinstance(value, Seq):
        for item in value.items:
            leaves(item, out)
    elif isinstance(value, Tup):
        for position in value.items:
            for item in position:
                leaves(item, out)
    else:
        out.add(value)


def bounded(values: frozenset, depth: int = 0) -> frozenset:
    """``values`` with containers nested at most ``_MAX_DEPTH`` deep: code that keeps putting a
    list into itself (``y.append(y[i])``) would otherwise grow values on every pass."""
    if all(not isinstance(v, (Seq, Tup)) for v in values):
        return values
    result: set = set()
    for value in values:
        if isinstance(value, Seq):
            if depth >= _MAX_DEPTH:
                flat: set = set()
                leaves(value, flat)
                result.add(Seq(frozenset(flat)))
            else:
                result.add(Seq(bounded(value.items, depth + 1)))
        elif isinstance(value, Tup):
            if depth >= _MAX_DEPTH or len(value.items) > _MAX_TUPLE:
                flat = set()
                leaves(value, flat)
                result.add(Seq(frozenset(flat)))
            else:
                result.add(Tup(tuple(bounded(item, depth + 1) for item in value.items)))
        else:
            result.add(value)
    return frozenset(result)


ONLY_DATA = one(DATA)
NOTHING: frozenset = frozenset()
