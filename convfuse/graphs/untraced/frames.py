"""The reader's scopes and frames, its limits, and the vocabulary of harmless attribute uses."""

from __future__ import annotations

import ast
import types
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convfuse.graphs.untraced.values import (
    NOTHING,
    Known,
    bounded,
)

MAX_FUNCTIONS = 4000  # functions read for one model before giving up (then: unreadable)
MAX_PASSES = 6  # fixpoint passes over one function body
MAX_ITEMS = 10_000  # items of one container looked at when lifting an attribute's value

TENSOR_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "is_meta",
    "requires_grad", "layout", "names", "itemsize", "nbytes", "T", "mT", "H", "mH",
})
TENSOR_METADATA_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "get_device", "type", "stride", "storage_offset",
})
# nn.Module methods that return the module itself and change nothing a fold depends on
MODULE_SELF_METHODS = frozenset({
    "to", "cuda", "cpu", "float", "double", "half", "bfloat16", "type", "eval", "xpu", "ipu", "mtia",
    "share_memory", "to_empty",
})
MODULE_DATA_METHODS = frozenset({
    "_get_name", "extra_repr", "__repr__", "__str__", "__dir__", "__hash__", "__eq__", "__ne__",
    "__sizeof__", "__format__", "__reduce_ex__", "__getstate__",
})
MODULE_CALLS = frozenset({"__call__", "forward", "_call_impl", "_wrapped_call_impl"})
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
CONTAINER_METHODS = frozenset({"__getitem__", "__iter__", "__len__", "__contains__", "__bool__",
                                "items", "values", "keys", "append", "extend", "insert", "pop",
                                "update", "add_module", "__setitem__", "__delitem__"})
MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft",
                       "extendleft", "__setitem__"})
SAFE_CONTEXTS = ("compare", "truth")  # uses that only look at a module's identity or truth


class TooMuch(Exception):
    """More code than one model's reading may cost."""


class Scope:
    """The names of one function being read; unknown names are looked up in ``parent``."""

    __slots__ = ("locals", "parent", "values")

    def __init__(self, local_names: set[str], parent: Scope | None) -> None:
        self.locals = local_names
        self.values: dict[str, frozenset] = {}
        self.parent = parent

    def bind(self, name: str, values: frozenset) -> None:
        old = self.values.get(name, NOTHING)
        if not values <= old:
            self.values[name] = old | bounded(values)

    def lookup(self, name: str) -> frozenset | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.locals:
                return scope.values.get(name, NOTHING)
            scope = scope.parent
        return None

    def size(self) -> int:
        return sum(len(v) for v in self.values.values())


@dataclass
class Frame:
    """One function being read: its code, its ``self`` and what it returns."""

    func: Known
    scope: Scope
    self_values: frozenset
    defining: type | None  # the class whose body defines the function (for ``super()``)
    returns: set = field(default_factory=set)
    yields: set = field(default_factory=set)

    @property
    def code(self) -> str:
        obj = self.func.obj
        return getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))


def local_names(node: ast.AST) -> set[str]:
    """Names a function binds (its parameters and every assignment target in its own body)."""
    names: set[str] = set()
    args = getattr(node, "args", None)
    if isinstance(args, ast.arguments):
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
            if arg is not None:
                names.add(arg.arg)
    body = node.body if isinstance(node.body, list) else [node.body]
    stack = list(body)
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Name) and isinstance(item.ctx, (ast.Store, ast.Del)):
            names.add(item.id)
        elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(item.name)
            stack.extend(item.decorator_list)
            continue  # its body has its own scope
        elif isinstance(item, ast.Lambda):
            continue
        elif isinstance(item, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in item.names if a.name != "*")
        elif isinstance(item, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and item.name:
            names.add(item.name)
        elif isinstance(item, ast.MatchMapping) and item.rest:
            names.add(item.rest)
        elif isinstance(item, (ast.Global, ast.Nonlocal)):
            continue
        stack.extend(ast.iter_child_nodes(item))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        for item in ast.walk(node):
            if isinstance(item, (ast.Global, ast.Nonlocal)):
                names.difference_update(item.names)
    return names


def constant_of(node: ast.AST | None) -> Any:
    """The literal value of ``node``, or ``NOT_CONSTANT``."""
    if node is None:
        return NOT_CONSTANT
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_CONSTANT


NOT_CONSTANT = object()
NO_CALL = ast.Call(func=ast.Constant(None), args=[], keywords=[])  # a call whose arguments are not written


def dotted_prefix(node: ast.AST) -> str:
    """The constant start of a name built at run time (``f"layer{i}"`` -> ``"layer"``)."""
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = constant_of(node.left)
        return left if isinstance(left, str) else dotted_prefix(node.left)
    return ""


def top_package(name: str | None) -> str:
    return (name or "").split(".")[0]


def defined_on(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None

def functions_in(klass: type) -> list[Any]:
    found = []
    for value in vars(klass).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if isinstance(value, types.FunctionType):
            found.append(value)
    return found


def is_generator(node: ast.AST) -> bool:
    for item in ast.walk(node):
        if isinstance(item, (ast.Yield, ast.YieldFrom)) and item is not node:
            return True
    return False
