"""What code that torch.fx did not trace does with the model's modules, read from its source.

Where a forward cannot be traced, convfuse traces the parts below it on their own; the untraced
code then decides how those parts are used. A fold inside a part is right only where every use
of the part's modules goes through the part's own forward. This module reads that code (``ast``
on ``inspect.getsource``: the forward and every function it can reach with one of the model's
modules in hand, in every branch, whatever inputs would take) and records each use:

* ``call``: a module called as a whole (``self.a(x)``, ``for m in self.blocks: x = m(x)``), or
  handed whole to code this reader does not follow (another package's function, such as
  ``torch.utils.checkpoint.checkpoint(self.a, x)`` or a profiler);
* ``reach``: a use that sees inside a module: its parameters or buffers read (``self.bn.weight``,
  ``self.conv.bias is None``), nn.Module introspection (``self.a.modules()``, ``.apply``), a module
  stored on another object, an attribute named only at run time through a custom ``__getattr__``;
* ``unreadable``: code that could not be read (no source): anything below its module may be used.

Reading a part root's plain data attributes (``m.f``, ``m.i``, ``m.type`` in ultralytics),
comparing modules, ``isinstance`` and parameter metadata (``next(self.parameters()).device``)
are not uses. The reading is flow-insensitive (every assignment to a name may reach every use),
so it over-approximates: a use it cannot rule out is recorded.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import inspect
import linecache
import sys
import textwrap
import tokenize
import types
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convfuse.code_values import (
    DATA,
    NOTHING,
    ONLY_DATA,
    Bound,
    Children,
    External,
    Instance,
    Known,
    Method,
    Mods,
    ModuleMethod,
    Nested,
    Seq,
    Super,
    Tensors,
    Tup,
    bounded,
    leaves,
    one,
)
from convfuse.held import BOOKKEEPING, held_objects

__all__ = ["CALL", "REACH", "READ", "UNREADABLE", "CodeUse", "Reader", "Use", "first_reach"]

CALL = "call"
REACH = "reach"
READ = "read"  # a reach that reads a parameter or buffer
UNREADABLE = "unreadable"

_MAX_FUNCTIONS = 4000  # functions read for one model before giving up (then: unreadable)
_MAX_PASSES = 6  # fixpoint passes over one function body
_MAX_ITEMS = 10_000  # items of one container looked at when lifting an attribute's value


@dataclass(frozen=True)
class Use:
    """One use of a module by code outside the traced parts."""

    module: str  # qualified name ("" for the model's root)
    kind: str  # CALL, REACH, READ or UNREADABLE
    code: str  # the function that uses it, e.g. "Model.forward"
    how: str  # what it does, e.g. "calls self.a.bn"
    subtree: bool = True  # REACH: also the modules below it (False: only its own tensors)

    @property
    def detail(self) -> str:
        return f"{self.code} {self.how}"


@dataclass
class CodeUse:
    """Every use found so far, one per (module, kind, subtree)."""

    uses: dict[tuple[str, str, bool], Use] = field(default_factory=dict)

    def add(self, use: Use) -> None:
        key = (use.module, use.kind, use.subtree)
        known = self.uses.get(key)
        if known is None or (use.code, use.how) < (known.code, known.how):  # the same whatever order code is read in
            self.uses[key] = use

    def calls_below(self, name: str) -> bool:
        """Whether some module strictly below ``name`` is called (or used) by code read so far."""
        prefix = name + "." if name else ""
        return any(u.module.startswith(prefix) and u.module != name for u in self.uses.values())

    def called(self, name: str) -> bool:
        return (name, CALL, True) in self.uses


_KIND_ORDER = (CALL, READ, REACH, UNREADABLE)


def _at_or_under(name: str, above: str) -> bool:
    return above == "" or name == above or name.startswith(above + ".")


def first_reach(uses: CodeUse | None, names: Iterable[str], part: str) -> Use | None:
    """The first use that makes a fold of modules ``names``, found in the part traced at ``part``,
    unsafe: a call of a module strictly inside the part at or above one of them, a reach into one
    of them, or code that could not be read above one of them."""
    if uses is None:
        return None
    names = list(names)
    found = []
    for use in uses.uses.values():
        if use.kind == CALL:
            inside = use.module != part and _at_or_under(use.module, part)
            hit = inside and any(_at_or_under(n, use.module) for n in names)
        elif use.kind == UNREADABLE:
            hit = any(_at_or_under(n, use.module) for n in names)
        else:
            hit = any(n == use.module or (use.subtree and _at_or_under(n, use.module)) for n in names)
        if hit:
            found.append(use)
    # the most specific first (a call, then a read, ...), then by name: the same on every run
    return min(found, key=lambda u: (_KIND_ORDER.index(u.kind), -u.module.count("."), u.module, u.code, u.how),
               default=None)


_TENSOR_METADATA = frozenset({
    "shape", "dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "is_meta",
    "requires_grad", "layout", "names", "itemsize", "nbytes", "T", "mT", "H", "mH",
})
_TENSOR_METADATA_METHODS = frozenset({
    "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "get_device", "type", "stride", "storage_offset",
})
# nn.Module methods that return the module itself and change nothing a fold depends on
_MODULE_SELF_METHODS = frozenset({
    "to", "cuda", "cpu", "float", "double", "half", "bfloat16", "type", "eval", "xpu", "ipu", "mtia",
    "share_memory", "to_empty",
})
_MODULE_DATA_METHODS = frozenset({
    "_get_name", "extra_repr", "__repr__", "__str__", "__dir__", "__hash__", "__eq__", "__ne__",
    "__sizeof__", "__format__", "__reduce_ex__", "__getstate__",
})
_MODULE_CALLS = frozenset({"__call__", "forward", "_call_impl", "_wrapped_call_impl"})
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONTAINER_METHODS = frozenset({"__getitem__", "__iter__", "__len__", "__contains__", "__bool__",
                                "items", "values", "keys", "append", "extend", "insert", "pop",
                                "update", "add_module", "__setitem__", "__delitem__"})
_MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft",
                       "extendleft", "__setitem__"})
_SAFE_CONTEXTS = ("compare", "truth")  # uses that only look at a module's identity or truth


class _TooMuch(Exception):
    """More code than one model's reading may cost."""


class _Scope:
    """The names of one function being read; unknown names are looked up in ``parent``."""

    __slots__ = ("locals", "parent", "values")

    def __init__(self, local_names: set[str], parent: _Scope | None) -> None:
        self.locals = local_names
        self.values: dict[str, frozenset] = {}
        self.parent = parent

    def bind(self, name: str, values: frozenset) -> None:
        old = self.values.get(name, NOTHING)
        if not values <= old:
            self.values[name] = old | bounded(values)

    def lookup(self, name: str) -> frozenset | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.locals:
                return scope.values.get(name, NOTHING)
            scope = scope.parent
        return None

    def size(self) -> int:
        return sum(len(v) for v in self.values.values())


@dataclass
class _Frame:
    """One function being read: its code, its ``self`` and what it returns."""

    func: Known
    scope: _Scope
    self_values: frozenset
    defining: type | None  # the class whose body defines the function (for ``super()``)
    returns: set = field(default_factory=set)
    yields: set = field(default_factory=set)

    @property
    def code(self) -> str:
        obj = self.func.obj
        return getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))


def _local_names(node: ast.AST) -> set[str]:
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


def _constant(node: ast.AST | None) -> Any:
    """The literal value of ``node``, or ``_NOT_CONSTANT``."""
    if node is None:
        return _NOT_CONSTANT
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_CONSTANT


_NOT_CONSTANT = object()
_NO_CALL = ast.Call(func=ast.Constant(None), args=[], keywords=[])  # a call whose arguments are not written


def _prefix(node: ast.AST) -> str:
    """The constant start of a name built at run time (``f"layer{i}"`` -> ``"layer"``)."""
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _constant(node.left)
        return left if isinstance(left, str) else _prefix(node.left)
    return ""


def _top_package(name: str | None) -> str:
    return (name or "").split(".")[0]


def _defined_on(cls: type, name: str) -> type | None:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


class Reader:
    """Reads untraced forwards of ``model``; ``uses`` collects what they do with its modules."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.names: dict[int, list[str]] = {}
        for name, module in self.modules.items():
            self.names.setdefault(id(module), []).append(name)
        self.own = {_top_package(type(m).__module__) for m in self.modules.values()} - {"torch", "builtins"}
        self.uses = CodeUse()
        self._aliases: dict[tuple[str, str], frozenset] = {}  # self.x = ... stored on a module by code
        self._version = 0  # changes with the aliases: what was read before may read differently now
        self._memo: dict[tuple, frozenset] = {}
        self._active: set[tuple] = set()
        self._read = 0
        self._files: dict[str, dict[tuple[str, int], list[ast.AST]]] = {}
        self._holds: dict[int, bool] = {}

    # -- entry points -----------------------------------------------------------------------

    def read_forward(self, name: str) -> None:
        """Read the forward of module ``name`` (and what it reaches) into ``uses``."""
        module = self.modules[name]
        forward = type(module).forward
        where = f"{type(module).__qualname__}.forward"
        try:
            for _ in range(_MAX_PASSES):  # again while code stores modules on modules
                version = self._version
                self._call_function(Known(forward), one(Mods(frozenset({name}))), [ONLY_DATA] * 8, {}, None,
                                    entry=True)
                if version == self._version:
                    break
        except _TooMuch:
            self._unreadable(name, where, "is more code than convfuse reads")
        except RecursionError:
            self._unreadable(name, where, "nests too deeply to be read")
        except Exception as error:  # noqa: BLE001 - a reader bug must not fold anything it did not understand
            self._unreadable(name, where, f"could not be read ({type(error).__name__}: {error})")

    def _unreadable(self, name: str, code: str, why: str) -> None:
        self.uses.add(Use(name, UNREADABLE, code, why))

    # -- source ------------------------------------------------------------------------------

    def _function_node(self, func: Any) -> ast.AST | None:
        """The ``def`` (or lambda) of a Python function, from its file, or None."""
        code = getattr(func, "__code__", None)
        if code is None:
            return None
        lines = linecache.getlines(code.co_filename, getattr(func, "__globals__", None))
        if code.co_name != "<lambda>" and 0 < code.co_firstlineno <= len(lines):
            # the function's own lines only: parsing whole files costs more than reading them
            try:
                block = inspect.getblock(lines[code.co_firstlineno - 1:])
                tree = ast.parse(textwrap.dedent("".join(block)))
            except (SyntaxError, ValueError, IndentationError, tokenize.TokenError):
                tree = None
            first = tree.body[0] if tree is not None and tree.body else None
            if isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef)) and first.name == code.co_name:
                return first
        filename = code.co_filename
        if filename not in self._files:
            self._files[filename] = self._index_file(filename, getattr(func, "__globals__", None))
        found = self._files[filename].get((code.co_name, code.co_firstlineno), [])
        # one match, or none: not in the file as it is now, or ambiguous (two lambdas on one line)
        return found[0] if len(found) == 1 else None

    @staticmethod
    def _index_file(filename: str, module_globals: dict | None) -> dict[tuple[str, int], list[ast.AST]]:
        """Every function and lambda of a source file, by (name, first line) as its code records."""
        lines = linecache.getlines(filename, module_globals)
        try:
            tree = ast.parse("".join(lines)) if lines else None
        except (SyntaxError, ValueError):
            tree = None
        index: dict[tuple[str, int], list[ast.AST]] = {}
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for line in {node.lineno, *(d.lineno for d in node.decorator_list)}:
                    index.setdefault((node.name, line), []).append(node)
            elif isinstance(node, ast.Lambda):
                index.setdefault(("<lambda>", node.lineno), []).append(node)
        return index

    # -- functions ---------------------------------------------------------------------------

    def _call_function(
        self,
        func: Known,
        self_values: frozenset | None,
        args: list[frozenset],
        kwargs: dict[str, frozenset],
        caller: _Frame | None,
        *,
        entry: bool = False,
    ) -> frozenset:
        """Read ``func`` called with these values; the values it returns."""
        obj = inspect.unwrap(func.obj) if callable(func.obj) else func.obj
        args = [bounded(a) for a in args]
        kwargs = {k: bounded(v) for k, v in kwargs.items()}
        self_values = bounded(self_values) if self_values is not None else None
        positional = ([self_values] if self_values is not None else []) + list(args)
        node = self._function_node(obj)
        if node is None:
            where = caller.code if caller is not None else getattr(obj, "__qualname__", "?")
            name = getattr(obj, "__qualname__", repr(obj))
            self._unreadable_values(positional + list(kwargs.values()), where,
                                    f"calls {name}, whose source cannot be read" if not entry
                                    else "has no source to read")
            return ONLY_DATA
        defining = self._defining_class(obj, self_values)
        return self._once(
            (id(obj), tuple(positional)),
            kwargs,
            lambda: self._run(node, Known(obj), positional, kwargs, None, self_values or ONLY_DATA, defining),
        )

    def _once(self, key: tuple, kwargs: dict[str, frozenset], read: Any) -> frozenset:
        """``read()``, once per function and arguments (while no code stores new modules on modules);
        a call back into a function being read gives nothing new: its outer reading records it."""
        key = (self._version, *key, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key in self._memo:
            return self._memo[key]
        if key in self._active:
            return ONLY_DATA
        self._read += 1
        if self._read > _MAX_FUNCTIONS:
            raise _TooMuch
        self._active.add(key)
        try:
            result = read()
        finally:
            self._active.discard(key)
        self._memo[key] = result
        return result

    def _defining_class(self, func: Any, self_values: frozenset | None) -> type | None:
        for value in self_values or ():
            for cls in self._classes_of(value):
                for klass in cls.__mro__:
                    if any(v is func or inspect.unwrap(v) is func for v in _functions_in(klass)):
                        return klass
        return None

    def _classes_of(self, value: Any) -> list[type]:
        if isinstance(value, Mods):
            return [type(self.modules[n]) for n in value.names]
        if isinstance(value, Known):
            return [type(value.obj)]
        if isinstance(value, Instance) and isinstance(value.cls.obj, type):
            return [value.cls.obj]
        return []

    def _run(
        self,
        node: ast.AST,
        func: Known,
        positional: list[frozenset],
        kwargs: dict[str, frozenset],
        parent: _Scope | None,
        self_values: frozenset,
        defining: type | None,
    ) -> frozenset:
        scope = _Scope(_local_names(node), parent)
        frame = _Frame(func, scope, self_values, defining)
        self._bind_arguments(node.args, positional, kwargs, frame)
        body = node.body if isinstance(node.body, list) else None
        for _ in range(_MAX_PASSES):
            before = (scope.size(), len(frame.returns), len(frame.yields), len(self.uses.uses))
            if body is None:
                frame.returns.update(bounded(self._ev(node.body, frame)))
            else:
                self._block(body, frame)
            if before == (scope.size(), len(frame.returns), len(frame.yields), len(self.uses.uses)):
                break
        result = frozenset(frame.returns) or ONLY_DATA
        if frame.yields or (body is not None and _is_generator(node)):
            result = result | one(Seq(frozenset(frame.yields) or ONLY_DATA))
        return result

    def _bind_arguments(self, args: ast.arguments, positional: list[frozenset], kwargs: dict[str, frozenset],
                        frame: _Frame) -> None:
        params = [*args.posonlyargs, *args.args]
        extra: set = set()
        for index, value in enumerate(positional):
            if index < len(params):
                frame.scope.bind(params[index].arg, value)
            else:
                extra |= value
        named = {p.arg for p in (*params, *args.kwonlyargs)}
        for name, value in kwargs.items():
            if name in named:
                frame.scope.bind(name, value)
            else:
                extra |= value
        for param in (*params, *args.kwonlyargs):
            frame.scope.bind(param.arg, ONLY_DATA if param.arg not in frame.scope.values else NOTHING)
        for param in (args.vararg, args.kwarg):
            if param is not None:
                frame.scope.bind(param.arg, one(Seq(frozenset(extra) or ONLY_DATA)) | ONLY_DATA)
        if not args.vararg and not args.kwarg and extra:
            self._consume(frozenset(extra), frame, "passes")

    # -- statements --------------------------------------------------------------------------

    def _block(self, body: list[ast.stmt], frame: _Frame) -> None:
        for stmt in body:
            self._stmt(stmt, frame)

    def _stmt(self, stmt: ast.stmt, frame: _Frame) -> None:
        if isinstance(stmt, ast.Expr):
            self._ev(stmt.value, frame)
        elif isinstance(stmt, ast.Assign):
            values = self._ev(stmt.value, frame)
            for target in stmt.targets:
                self._assign(target, values, frame)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self._assign(stmt.target, self._ev(stmt.value, frame), frame)
        elif isinstance(stmt, ast.AugAssign):
            values = self._ev(stmt.value, frame)
            if isinstance(stmt.op, ast.Add):  # list += [...] keeps the items
                old = self._ev(stmt.target, frame)
                self._assign(stmt.target, old | values | one(Seq(self._items(values, frame))), frame)
            else:
                self._consume(values | self._ev(stmt.target, frame), frame, "strict")
                self._assign(stmt.target, ONLY_DATA, frame)
        elif isinstance(stmt, ast.Return):
            frame.returns.update(bounded(self._ev(stmt.value, frame)) if stmt.value is not None else ONLY_DATA)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            self._assign(stmt.target, self._items(self._ev(stmt.iter, frame), frame), frame)
            self._block(stmt.body, frame)
            self._block(stmt.orelse, frame)
        elif isinstance(stmt, (ast.While, ast.If)):
            self._consume(self._ev(stmt.test, frame), frame, "truth")
            self._block(stmt.body, frame)
            self._block(stmt.orelse, frame)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                self._ev(item.context_expr, frame)
                if item.optional_vars is not None:
                    self._assign(item.optional_vars, ONLY_DATA, frame)
            self._block(stmt.body, frame)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            self._block(stmt.body, frame)
            for handler in stmt.handlers:
                if handler.type is not None:
                    self._ev(handler.type, frame)
                if handler.name:
                    frame.scope.bind(handler.name, ONLY_DATA)
                self._block(handler.body, frame)
            self._block(stmt.orelse, frame)
            self._block(stmt.finalbody, frame)
        elif isinstance(stmt, ast.Raise):
            for part in (stmt.exc, stmt.cause):
                if part is not None:
                    self._consume(self._ev(part, frame), frame, "strict")
        elif isinstance(stmt, ast.Assert):
            self._consume(self._ev(stmt.test, frame), frame, "truth")
            if stmt.msg is not None:
                self._consume(self._ev(stmt.msg, frame), frame, "compare")
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, (ast.Attribute, ast.Subscript)):
                    self._reach_values(self._ev(target.value, frame), frame, "deletes an attribute of", True)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._import(stmt, frame)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in stmt.decorator_list:
                self._ev(decorator, frame)
            frame.scope.bind(stmt.name, one(Nested(stmt, frame.scope, frame.func, frame.self_values, frame.defining)))
        elif isinstance(stmt, ast.ClassDef):
            frame.scope.bind(stmt.name, ONLY_DATA)
        elif isinstance(stmt, ast.Match):
            subject = self._ev(stmt.subject, frame)
            captured = subject | self._items(subject, frame)
            for case in stmt.cases:
                for item in ast.walk(case.pattern):
                    if isinstance(item, (ast.MatchAs, ast.MatchStar)) and item.name:
                        frame.scope.bind(item.name, captured)
                    elif isinstance(item, ast.MatchMapping) and item.rest:
                        frame.scope.bind(item.rest, captured)
                    elif isinstance(item, ast.MatchValue):
                        self._ev(item.value, frame)
                if case.guard is not None:
                    self._consume(self._ev(case.guard, frame), frame, "truth")
                self._block(case.body, frame)
        # Pass, Break, Continue, Global, Nonlocal: nothing to read

    def _import(self, stmt: ast.Import | ast.ImportFrom, frame: _Frame) -> None:
        """Bind imported names to what is loaded already; nothing is imported by reading."""
        package = getattr(frame.func.obj, "__module__", None) or ""
        for alias in stmt.names:
            if alias.name == "*":
                continue
            if isinstance(stmt, ast.Import):
                bound = alias.asname or alias.name.split(".")[0]
                target = alias.name if alias.asname else alias.name.split(".")[0]
                loaded = sys.modules.get(target)
                frame.scope.bind(bound, one(Known(loaded)) if loaded is not None else one(External(target)))
                continue
            try:
                base = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), package) \
                    if stmt.level else (stmt.module or "")
            except (ImportError, ValueError):
                base = stmt.module or ""
            bound = alias.asname or alias.name
            loaded = sys.modules.get(base)
            if loaded is not None and hasattr(loaded, alias.name):
                frame.scope.bind(bound, self._lift(getattr(loaded, alias.name)))
            elif f"{base}.{alias.name}" in sys.modules:
                frame.scope.bind(bound, one(Known(sys.modules[f"{base}.{alias.name}"])))
            else:
                frame.scope.bind(bound, one(External(f"{base}.{alias.name}")))

    def _assign(self, target: ast.expr, values: frozenset, frame: _Frame) -> None:
        if isinstance(target, ast.Name):
            frame.scope.bind(target.id, values)
        elif isinstance(target, (ast.Tuple, ast.List)):
            count = len(target.elts)
            for index, element in enumerate(target.elts):
                if isinstance(element, ast.Starred):
                    self._assign(element.value, one(Seq(self._items(values, frame))), frame)
                    continue
                parts: set = set()
                for value in values:
                    if isinstance(value, Tup) and len(value.items) == count:
                        parts |= value.items[index]
                    else:
                        parts |= self._items(one(value), frame)
                self._assign(element, frozenset(parts) or ONLY_DATA, frame)
        elif isinstance(target, ast.Starred):
            self._assign(target.value, one(Seq(self._items(values, frame))), frame)
        elif isinstance(target, ast.Attribute):
            self._store_attribute(self._ev(target.value, frame), target.attr, values, frame)
        elif isinstance(target, ast.Subscript):
            self._consume(self._ev(target.slice, frame), frame, "compare")
            self._store_item(target.value, values, frame)

    def _store_attribute(self, owners: frozenset, attr: str, values: frozenset, frame: _Frame) -> None:
        for owner in owners:
            if isinstance(owner, Mods):
                for name in owner.names:
                    if attr in self.modules[name]._parameters or attr in self.modules[name]._buffers:
                        self._reach(name, frame, f"assigns {self._show(name, frame)}.{attr}", False)
                    key = (name, attr)
                    old = self._aliases.get(key, NOTHING)
                    new = old | bounded(values)
                    if new != old:
                        self._aliases[key] = new
                        self._version += 1
            else:  # kept on an object this reader does not follow: anything may use it later
                self._consume(values, frame, "stores", reach=True)

    def _store_item(self, container: ast.expr, values: frozenset, frame: _Frame) -> None:
        """``items[k] = v`` or ``items.append(v)``: the container now also holds ``values``."""
        added = one(Seq(values))
        if isinstance(container, ast.Name):
            frame.scope.bind(container.id, added)
            return
        if isinstance(container, ast.Attribute):
            owners = self._ev(container.value, frame)
            if all(isinstance(o, Mods) for o in owners):
                self._store_attribute(owners, container.attr, added, frame)
                return
        held = self._ev(container, frame)
        if any(isinstance(v, Mods) for v in held):  # a module container changed by code
            self._reach_values(frozenset(v for v in held if isinstance(v, Mods)), frame, "changes", True)
        self._consume(values, frame, "stores", reach=True)

    # -- expressions -------------------------------------------------------------------------

    def _ev(self, node: ast.expr, frame: _Frame) -> frozenset:
        if isinstance(node, ast.Constant):
            return ONLY_DATA
        if isinstance(node, ast.Name):
            return self._name(node.id, frame)
        if isinstance(node, ast.Attribute):
            return self._attribute(self._ev(node.value, frame), node.attr, frame)
        if isinstance(node, ast.Call):
            return self._call(node, frame)
        if isinstance(node, ast.Subscript):
            return self._subscript(self._ev(node.value, frame), node.slice, frame)
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                self._consume(self._ev(operand, frame), frame, "compare")
            return ONLY_DATA
        if isinstance(node, ast.BoolOp):
            values: frozenset = NOTHING
            for operand in node.values:
                value = self._ev(operand, frame)
                self._consume(value, frame, "truth")
                values |= value
            return values
        if isinstance(node, ast.UnaryOp):
            self._consume(self._ev(node.operand, frame), frame, "truth" if isinstance(node.op, ast.Not) else "strict")
            return ONLY_DATA
        if isinstance(node, ast.BinOp):
            self._consume(self._ev(node.left, frame) | self._ev(node.right, frame), frame, "strict")
            return ONLY_DATA
        if isinstance(node, ast.IfExp):
            self._consume(self._ev(node.test, frame), frame, "truth")
            return self._ev(node.body, frame) | self._ev(node.orelse, frame)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                items: frozenset = NOTHING
                for element in node.elts:
                    value = self._ev(element.value if isinstance(element, ast.Starred) else element, frame)
                    items |= self._items(value, frame) if isinstance(element, ast.Starred) else value
                return one(Seq(items or ONLY_DATA))
            return one(Tup(tuple(self._ev(e, frame) for e in node.elts)))
        if isinstance(node, ast.Dict):
            items = NOTHING
            for key, value in zip(node.keys, node.values):
                if key is not None:
                    items |= self._ev(key, frame)
                    items |= self._ev(value, frame)
                else:  # {**other}
                    items |= self._items(self._ev(value, frame), frame)
            return one(Seq(items or ONLY_DATA))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for generator in node.generators:
                self._assign(generator.target, self._items(self._ev(generator.iter, frame), frame), frame)
                for condition in generator.ifs:
                    self._consume(self._ev(condition, frame), frame, "truth")
            if isinstance(node, ast.DictComp):
                return one(Seq(self._ev(node.key, frame) | self._ev(node.value, frame)))
            return one(Seq(self._ev(node.elt, frame)))
        if isinstance(node, ast.Lambda):
            return one(Nested(node, frame.scope, frame.func, frame.self_values, frame.defining))
        if isinstance(node, ast.NamedExpr):
            values = self._ev(node.value, frame)
            self._assign(node.target, values, frame)
            return values
        if isinstance(node, ast.JoinedStr):
            for part in node.values:
                self._ev(part, frame)
            return ONLY_DATA
        if isinstance(node, ast.FormattedValue):
            self._consume(self._ev(node.value, frame), frame, "compare")
            if node.format_spec is not None:
                self._ev(node.format_spec, frame)
            return ONLY_DATA
        if isinstance(node, ast.Starred):
            return one(Seq(self._items(self._ev(node.value, frame), frame)))
        if isinstance(node, ast.Yield):
            if node.value is not None:
                frame.yields.update(bounded(self._ev(node.value, frame)))
            return ONLY_DATA
        if isinstance(node, ast.YieldFrom):
            frame.yields.update(bounded(self._items(self._ev(node.value, frame), frame)))
            return ONLY_DATA
        if isinstance(node, ast.Await):
            return self._ev(node.value, frame)
        if isinstance(node, ast.Slice):
            for part in (node.lower, node.upper, node.step):
                if part is not None:
                    self._consume(self._ev(part, frame), frame, "strict")
            return ONLY_DATA
        for child in ast.iter_child_nodes(node):  # anything else: every part used as a value
            if isinstance(child, ast.expr):
                self._consume(self._ev(child, frame), frame, "strict")
        return ONLY_DATA

    def _name(self, name: str, frame: _Frame) -> frozenset:
        local = frame.scope.lookup(name)
        if local is not None:
            return local
        obj = frame.func.obj
        code = getattr(obj, "__code__", None)
        closure = getattr(obj, "__closure__", None)
        if code is not None and closure and name in code.co_freevars:
            try:
                return self._lift(closure[code.co_freevars.index(name)].cell_contents)
            except ValueError:  # an empty cell
                return ONLY_DATA
        module_globals = getattr(obj, "__globals__", None) or {}
        if name in module_globals:
            return self._lift(module_globals[name])
        if hasattr(builtins, name):
            return one(Known(getattr(builtins, name)))
        return ONLY_DATA

    def _attribute(self, owners: frozenset, attr: str, frame: _Frame) -> frozenset:
        result: set = set()
        for owner in owners:
            if isinstance(owner, Mods):
                for name in owner.names:
                    result |= self._module_attribute(name, attr, frame)
            elif isinstance(owner, Tensors):
                if attr in _TENSOR_METADATA:
                    result.add(DATA)
                elif attr in _TENSOR_METADATA_METHODS:
                    result.add(Method("metadata", one(owner)))
                else:
                    self._reach_values(one(owner), frame, "reads", None)
                    result.add(DATA)
            elif isinstance(owner, (Seq, Tup)):
                result.add(Method(attr, one(owner)))
            elif isinstance(owner, Children):
                result.add(Method(f"children.{attr}", one(owner)))
            elif isinstance(owner, Known):
                result |= self._known_attribute(owner.obj, attr)
            elif isinstance(owner, Instance):
                cls = owner.cls.obj
                found = inspect.getattr_static(cls, attr, None) if isinstance(cls, type) else None
                if isinstance(found, (types.FunctionType, staticmethod, classmethod)):
                    func = found.__func__ if isinstance(found, (staticmethod, classmethod)) else found
                    result.add(Bound(Known(func), one(owner)) if isinstance(found, types.FunctionType)
                               else Known(func))
                else:
                    result.add(DATA)
            elif isinstance(owner, Super):
                result |= self._super_attribute(owner, attr, frame)
            elif isinstance(owner, External):
                result.add(External(f"{owner.name}.{attr}"))
            else:
                result.add(DATA)
        return frozenset(result) or ONLY_DATA

    def _module_attribute(self, name: str, attr: str, frame: _Frame) -> frozenset:
        """``module.attr`` for module ``name``, as nn.Module resolves it."""
        module = self.modules[name]
        state = module.__dict__
        result: frozenset = self._aliases.get((name, attr), NOTHING)
        if attr in state.get("_modules", {}):
            child = state["_modules"][attr]
            return result | (self._lift(child) if child is not None else ONLY_DATA)
        if attr in state.get("_parameters", {}) or attr in state.get("_buffers", {}):
            return result | one(Tensors(frozenset({name}), False, attr))
        if attr == "_modules":
            return result | one(Children(name))
        if attr in ("_parameters", "_buffers"):
            return result | one(Tensors(frozenset({name}), False))
        if attr == "__dict__":
            self._reach(name, frame, f"reads {self._show(name, frame)}.__dict__", True)
            return result | ONLY_DATA
        cls = type(module)
        owner = _defined_on(cls, attr)
        found = owner.__dict__[attr] if owner is not None else None
        if isinstance(found, property):
            if owner is nn.Module or found.fget is None:
                return result | ONLY_DATA
            return result | self._call_function(Known(found.fget), one(Mods(frozenset({name}))), [], {}, frame)
        if attr in state:
            return result | self._lift(state[attr])
        if owner is None:
            if cls.__getattr__ is not nn.Module.__getattr__:
                self._reach(name, frame, f"reads {self._show(name, frame)}.{attr} through a custom __getattr__", True)
            return result | ONLY_DATA
        if isinstance(found, staticmethod):
            return result | self._lift(found.__func__)
        if isinstance(found, classmethod):
            return result | one(Known(getattr(cls, attr)))
        if isinstance(found, types.FunctionType):
            if attr in _MODULE_CALLS:
                return result | one(Mods(frozenset({name})))
            if owner is nn.Module:
                return result | one(ModuleMethod(attr, frozenset({name})))
            if owner in _CONTAINERS and attr in _CONTAINER_METHODS:
                return result | one(ModuleMethod(f"container.{attr}", frozenset({name})))
            return result | one(Bound(Known(found), one(Mods(frozenset({name})))))
        return result | self._lift(found)

    def _known_attribute(self, obj: Any, attr: str) -> frozenset:
        """``obj.attr`` of a concrete object, without running its properties."""
        if isinstance(obj, (types.ModuleType, type)):
            try:
                return self._lift(getattr(obj, attr))
            except Exception:  # noqa: BLE001 - a lazy module attribute that fails: not the model's
                return ONLY_DATA
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict) and attr in state:
            return self._lift(state[attr])
        found = inspect.getattr_static(type(obj), attr, None)
        if isinstance(found, types.FunctionType):
            return one(Bound(Known(found), one(Known(obj))))
        if isinstance(found, (staticmethod, classmethod)):
            return one(Known(found.__func__))
        if found is None or isinstance(found, property):
            return ONLY_DATA
        return self._lift(found)

    def _super_attribute(self, owner: Super, attr: str, frame: _Frame) -> frozenset:
        result: set = set()
        after = owner.after.obj
        for value in owner.self_values:
            for cls in self._classes_of(value):
                mro = cls.__mro__
                start = mro.index(after) + 1 if after in mro else 0
                for klass in mro[start:]:
                    if attr not in klass.__dict__:
                        continue
                    found = klass.__dict__[attr]
                    if klass is nn.Module and isinstance(value, Mods):
                        if attr in _MODULE_CALLS:
                            result.add(DATA)  # nn.Module.forward raises
                        else:
                            result.add(ModuleMethod(attr, value.names))
                    elif klass in _CONTAINERS and attr in _CONTAINER_METHODS and isinstance(value, Mods):
                        result.add(ModuleMethod(f"container.{attr}", value.names))
                    elif isinstance(found, types.FunctionType):
                        result.add(Bound(Known(found), one(value)))
                    elif isinstance(found, property) and found.fget is not None:
                        result |= self._call_function(Known(found.fget), one(value), [], {}, frame)
                    else:
                        result |= self._lift(found)
                    break
        return frozenset(result) or ONLY_DATA

    def _subscript(self, containers: frozenset, index: ast.expr, frame: _Frame) -> frozenset:
        key = _constant(index)
        index_values = self._ev(index, frame)
        self._consume(index_values, frame, "compare")
        result: set = set()
        for container in containers:
            if isinstance(container, Mods):
                for name in container.names:
                    result |= self._module_item(name, key, frame)
            elif isinstance(container, Tup):
                if isinstance(key, int) and -len(container.items) <= key < len(container.items):
                    result |= container.items[key]
                elif isinstance(key, slice):
                    result.add(Tup(container.items[key]))
                else:
                    result |= self._items(one(container), frame)
                    result.add(Seq(self._items(one(container), frame)))
            elif isinstance(container, Seq):
                result |= container.items
                result.add(container)  # a slice
            elif isinstance(container, Children):
                result |= self._module_item(container.name, key, frame, by_name=True)
            elif isinstance(container, Tensors):
                self._reach_values(one(container), frame, "indexes", None)
                result.add(DATA)
            elif isinstance(container, Known):
                obj = container.obj
                try:
                    result |= self._lift(obj[key]) if key is not _NOT_CONSTANT else self._lift_items(obj)
                except Exception:  # noqa: BLE001 - not indexable this way: nothing of the model
                    result |= self._lift_items(obj)
            else:
                result.add(DATA)
        return frozenset(result) or ONLY_DATA

    def _module_item(self, name: str, key: Any, frame: _Frame, *, by_name: bool = False) -> frozenset:
        """``module[key]``: a container's child, chosen by a constant key where there is one."""
        module = self.modules[name]
        children = list(module._modules.items())
        every = self._lift_all(child for _, child in children)
        if by_name or isinstance(module, nn.ModuleDict):
            if isinstance(key, str):
                return self._lift(dict(children).get(key))
            return every
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and not self._overrides(module, "__getitem__"):
            if isinstance(key, int):
                try:
                    return self._lift(children[key][1])
                except IndexError:
                    return ONLY_DATA
            if isinstance(key, slice):
                return one(Seq(self._lift_all(child for _, child in children[key])))
            return every | one(Seq(every))
        getitem = inspect.getattr_static(type(module), "__getitem__", None)
        if isinstance(getitem, types.FunctionType):
            return self._call_function(Known(getitem), one(Mods(frozenset({name}))), [ONLY_DATA], {}, frame)
        return ONLY_DATA

    def _overrides(self, module: nn.Module, attr: str) -> bool:
        owner = _defined_on(type(module), attr)
        return owner is not None and owner not in _CONTAINERS and owner is not nn.Module

    def _items(self, values: frozenset, frame: _Frame) -> frozenset:
        """What iterating over any of ``values`` may yield."""
        result: set = set()
        for value in values:
            if isinstance(value, Mods):
                for name in value.names:
                    module = self.modules[name]
                    if isinstance(module, (nn.Sequential, nn.ModuleList)) and not self._overrides(module, "__iter__"):
                        result |= self._lift_all(module._modules.values())
                    elif isinstance(module, nn.ModuleDict) and not self._overrides(module, "__iter__"):
                        result.add(DATA)  # its keys
                    else:
                        iterate = inspect.getattr_static(type(module), "__iter__", None)
                        if isinstance(iterate, types.FunctionType):
                            got = self._call_function(Known(iterate), one(Mods(frozenset({name}))), [], {}, frame)
                            result |= self._items(got, frame)
                        else:
                            result.add(DATA)
            elif isinstance(value, Seq):
                result |= value.items
            elif isinstance(value, Tup):
                for item in value.items:
                    result |= item
            elif isinstance(value, Tensors):
                self._reach_values(one(value), frame, "iterates over", None)
                result.add(DATA)
            elif isinstance(value, Known):
                result |= self._lift_items(value.obj)
            else:
                result.add(DATA)
        return frozenset(result) or ONLY_DATA

    # -- calls -------------------------------------------------------------------------------

    def _call(self, node: ast.Call, frame: _Frame) -> frozenset:
        callees = self._ev(node.func, frame)
        args: list[frozenset] = []
        starred: frozenset = NOTHING
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                starred |= self._items(self._ev(arg.value, frame), frame)
            else:
                args.append(self._ev(arg, frame))
        kwargs: dict[str, frozenset] = {}
        for keyword in node.keywords:
            value = self._ev(keyword.value, frame)
            if keyword.arg is None:
                starred |= self._items(value, frame)
            else:
                kwargs[keyword.arg] = kwargs.get(keyword.arg, NOTHING) | value
        if starred:
            args.append(starred)  # where the spread values land is not known: at the next position
        result: set = set()
        for callee in callees:
            result |= self._call_value(callee, args, kwargs, node, frame)
        return frozenset(result) or ONLY_DATA

    def _call_value(self, callee: Any, args: list[frozenset], kwargs: dict[str, frozenset], node: ast.Call,
                    frame: _Frame) -> frozenset:
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        if isinstance(callee, Mods):
            for name in sorted(callee.names):
                self._use(name, frame, f"calls {self._show(name, frame)}")
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if isinstance(callee, (Seq, Tup)):  # a slice of an nn.Sequential is called like it
            self._consume(one(callee), frame, "passes")
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if isinstance(callee, ModuleMethod):
            return self._module_method(callee, args, kwargs, node, frame)
        if isinstance(callee, Method):
            return self._method(callee, args, kwargs, node, frame)
        if isinstance(callee, Bound):
            if self._follows(callee.func.obj, callee.self_values, args, kwargs):
                return self._call_function(callee.func, callee.self_values, args, kwargs, frame)
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if isinstance(callee, Nested):
            return self._call_nested(callee, args, kwargs, frame)
        if isinstance(callee, Known):
            return self._call_known(callee.obj, args, kwargs, node, frame)
        if isinstance(callee, Instance):
            method = inspect.getattr_static(callee.cls.obj, "__call__", None)
            if isinstance(method, types.FunctionType) and self._follows(method, None, args, kwargs):
                return self._call_function(Known(method), one(callee), args, kwargs, frame)
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if isinstance(callee, External):
            if _top_package(callee.name) in self.own and self._carries(every):
                self._unreadable_values(list(args) + list(kwargs.values()), frame.code,
                                        f"calls {callee.name}, which is not loaded")
            else:
                self._consume(every, frame, "passes")
            return ONLY_DATA
        self._consume(every, frame, "passes")  # an unknown callee: the values are handed away
        return ONLY_DATA

    def _call_nested(self, callee: Nested, args: list[frozenset], kwargs: dict[str, frozenset],
                     frame: _Frame) -> frozenset:
        args = [bounded(a) for a in args]
        kwargs = {k: bounded(v) for k, v in kwargs.items()}
        return self._once(
            (id(callee.node), id(callee.scope), tuple(args)),
            kwargs,
            lambda: self._run(callee.node, callee.func, list(args), kwargs, callee.scope, callee.self_values,
                              callee.defining),
        )

    def _follows(self, func: Any, self_values: frozenset | None, args: list[frozenset],
                 kwargs: dict[str, frozenset]) -> bool:
        """Whether a call of ``func`` is read: a method of one of the model's modules, or code of
        the model's own packages that is handed something of the model."""
        handed = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        if self_values is not None and any(isinstance(v, Mods) for v in self_values):
            return True
        if not self._carries(handed | (self_values or NOTHING)):
            return False
        return _top_package(getattr(func, "__module__", None)) in self.own

    def _call_known(self, obj: Any, args: list[frozenset], kwargs: dict[str, frozenset], node: ast.Call,
                    frame: _Frame) -> frozenset:
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        modelled = _BUILTINS.get(id(obj)) if _is_builtin(obj) else None
        if modelled is not None:
            return modelled(self, args, kwargs, node, frame)
        if isinstance(obj, functools.partial):
            lifted = [self._lift(a) for a in obj.args]
            extra = {k: self._lift(v) for k, v in obj.keywords.items()}
            result: set = set()
            for callee in self._lift(obj.func):
                result |= self._call_value(callee, lifted + args, {**extra, **kwargs}, _NO_CALL, frame)
            return frozenset(result) or ONLY_DATA
        if isinstance(obj, weakref.ref):
            return self._lift(obj())
        if isinstance(obj, type):
            own = _top_package(obj.__module__) in self.own
            init = inspect.getattr_static(obj, "__init__", None)
            instance = one(Instance(Known(obj))) if own else ONLY_DATA
            if isinstance(init, types.FunctionType) and own and self._carries(every):
                self._call_function(Known(init), instance, args, kwargs, frame)
                return instance
            self._consume(every, frame, "passes")
            return instance
        if isinstance(obj, types.FunctionType):
            first = args[0] if args else NOTHING
            if any(isinstance(v, Mods) and self._is_method_of(obj, v) for v in first):
                return self._call_function(Known(obj), first, args[1:], kwargs, frame)
            if self._follows(obj, None, args, kwargs):
                return self._call_function(Known(obj), None, args, kwargs, frame)
        elif isinstance(obj, types.MethodType):
            return self._call_value(Bound(Known(obj.__func__), self._lift(obj.__self__)), args, kwargs, node, frame)
        self._consume(every, frame, "passes")
        return ONLY_DATA

    def _is_method_of(self, func: Any, value: Mods) -> bool:
        return any(func in _functions_in(klass) for name in value.names for klass in type(self.modules[name]).__mro__)

    def _module_method(self, method: ModuleMethod, args: list[frozenset], kwargs: dict[str, frozenset],
                       node: ast.Call, frame: _Frame) -> frozenset:
        """A method of nn.Module (or of torch's containers) on the model's modules."""
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        name = method.name
        names = method.names
        children = self._lift_all(c for n in names for c in self.modules[n]._modules.values())
        below = self._lift_all(m for n in names for m in self.modules[n].modules())
        if name in _MODULE_SELF_METHODS:
            self._consume(every, frame, "compare")
            return one(Mods(names))
        if name in _MODULE_DATA_METHODS:
            return ONLY_DATA
        if name in ("children", "container.values"):
            return one(Seq(children))
        if name in ("named_children", "container.items"):
            return one(Seq(one(Tup((ONLY_DATA, children)))))
        if name == "modules":
            return one(Seq(below))
        if name == "named_modules":
            return one(Seq(one(Tup((ONLY_DATA, below)))))
        if name in ("parameters", "buffers"):
            return one(Seq(one(Tensors(names, True))))
        if name in ("named_parameters", "named_buffers"):
            return one(Seq(one(Tup((ONLY_DATA, one(Tensors(names, True)))))))
        if name in ("get_parameter", "get_buffer", "state_dict"):
            return one(Tensors(names, True)) if name != "state_dict" else one(Seq(one(Tensors(names, True))))
        if name == "get_submodule":
            key = _constant(node.args[0]) if node.args else _NOT_CONSTANT
            if isinstance(key, str):
                result: frozenset = NOTHING
                for n in names:
                    try:
                        result |= self._lift(self.modules[n].get_submodule(key))
                    except AttributeError:
                        result |= ONLY_DATA
                return result
            return below
        if name in ("container.__getitem__",):
            key = _constant(node.args[0]) if node.args else _NOT_CONSTANT
            return frozenset().union(*(self._module_item(n, key, frame) for n in names))
        if name in ("container.__iter__",):
            return one(Seq(self._items(one(Mods(names)), frame)))
        if name in ("container.__len__", "container.__contains__", "container.__bool__", "container.keys"):
            self._consume(every, frame, "compare")
            return ONLY_DATA
        if name in ("container.append", "container.extend", "container.insert", "container.__setitem__",
                    "container.update", "container.add_module"):
            for n in names:
                self._reach(n, frame, f"changes {self._show(n, frame)}", True)
            self._consume(every, frame, "passes")
            return one(Mods(names))
        verb = name.removeprefix("container.")
        for n in sorted(names):  # every other nn.Module method sees inside: apply, train, register_*, ...
            if verb == "<named at run time>":
                self._reach(n, frame, f"calls a method of {self._show(n, frame)} named at run time", True)
            else:
                self._reach(n, frame, f"calls {self._show(n, frame)}.{verb}()", True)
        for value in every:
            if isinstance(value, (Bound, Nested, ModuleMethod)):  # apply(fn): fn runs on each module
                self._call_value(value, [below], {}, node, frame)
        self._consume(every, frame, "passes")
        return ONLY_DATA

    def _method(self, method: Method, args: list[frozenset], kwargs: dict[str, frozenset], node: ast.Call,
                frame: _Frame) -> frozenset:
        """A method of a tensor's metadata, of a list or dict display, or of ``_modules``."""
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        if method.name == "metadata":
            self._consume(every, frame, "compare")
            return ONLY_DATA
        if method.name.startswith("children."):
            verb = method.name.removeprefix("children.")
            (children,) = method.receiver
            if verb == "values":
                return one(Seq(self._lift_all(self.modules[children.name]._modules.values())))
            if verb == "items":
                return one(Seq(one(Tup((ONLY_DATA, self._lift_all(self.modules[children.name]._modules.values()))))))
            if verb in ("get", "__getitem__"):
                key = _constant(node.args[0]) if node.args else _NOT_CONSTANT
                return self._module_item(children.name, key, frame, by_name=True)
            if verb in ("keys", "__len__", "__contains__"):
                return ONLY_DATA
            self._reach(children.name, frame, f"changes {self._show(children.name, frame)}._modules", True)
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if method.name in _MUTATORS:
            target = node.func.value if isinstance(node.func, ast.Attribute) else None
            added = self._items(args[-1], frame) if method.name in ("extend", "update", "extendleft") and args \
                else (args[-1] if args else NOTHING)
            if target is not None:
                self._store_item(target, added | frozenset().union(*kwargs.values()) if kwargs else added, frame)
            else:
                self._consume(every, frame, "stores", reach=True)
            return ONLY_DATA
        items = self._items(method.receiver, frame)
        if method.name in ("pop", "get", "copy", "values", "popitem", "__getitem__", "setdefault", "popleft"):
            self._consume(every, frame, "compare")
            return items | one(Seq(items))
        if method.name == "items":
            return one(Seq(one(Tup((ONLY_DATA, items)))))
        self._consume(every, frame, "compare")
        return ONLY_DATA

    # -- uses --------------------------------------------------------------------------------

    def _use(self, name: str, frame: _Frame, how: str) -> None:
        self.uses.add(Use(name, CALL, frame.code, how))

    def _reach(self, name: str, frame: _Frame, how: str, subtree: bool, kind: str = REACH) -> None:
        self.uses.add(Use(name, kind, frame.code, how, subtree))

    def _reach_values(self, values: frozenset, frame: _Frame, verb: str, subtree: bool | None) -> None:
        for value in values:
            if isinstance(value, Mods):
                for name in value.names:
                    self._reach(name, frame, f"{verb} {self._show(name, frame)}", True if subtree is None else subtree)
            elif isinstance(value, Tensors):
                for name in value.names:
                    self._reach(name, frame, f"{verb} {self._tensors(name, value, frame)}", value.subtree, READ)

    def _unreadable_values(self, values: list[frozenset], code: str, why: str) -> None:
        for value in frozenset().union(*values) if values else NOTHING:
            for name in self._module_names(value):
                self.uses.add(Use(name, UNREADABLE, code, why))

    def _module_names(self, value: Any, depth: int = 0) -> set[str]:
        if depth > 8:
            return set()
        if isinstance(value, (Mods, Tensors, ModuleMethod)):
            return set(value.names)
        if isinstance(value, Children):
            return {value.name}
        if isinstance(value, Seq):
            return set().union(*(self._module_names(v, depth + 1) for v in value.items)) if value.items else set()
        if isinstance(value, Tup):
            return set().union(*(self._module_names(v, depth + 1) for item in value.items for v in item)) \
                if value.items else set()
        if isinstance(value, (Bound, Super)):
            return set().union(*(self._module_names(v, depth + 1) for v in value.self_values))
        if isinstance(value, Known) and self._holds_modules(value.obj):
            return {""}
        if isinstance(value, Nested):
            return {""}  # a closure over the code's names: anything it sees
        return set()

    def _consume(self, values: frozenset, frame: _Frame, context: str, *, reach: bool = False) -> None:
        """``values`` used in ``context``: "compare"/"truth" only look at a module (not at its
        tensors); "strict" and "passes" (handed to code not read) use modules whole and read
        tensors; ``reach``: kept where later code not read may reach inside."""
        items: set = set()
        for value in values:
            if isinstance(value, (Seq, Tup)):
                if context in _SAFE_CONTEXTS:
                    continue  # a collection's truth or identity says nothing of its items
                leaves(value, items)
            else:
                items.add(value)
        for value in items:
            self._consume_one(value, frame, context, reach, 0)

    def _consume_one(self, value: Any, frame: _Frame, context: str, reach: bool, depth: int) -> None:
        if depth > 8 or value is DATA:
            return
        if isinstance(value, Mods):
            if context in _SAFE_CONTEXTS:
                return
            for name in value.names:
                if reach:
                    self._reach(name, frame, f"{context} {self._show(name, frame)} on an object", True)
                else:
                    self._use(name, frame, f"passes {self._show(name, frame)} on")
        elif isinstance(value, Tensors):
            for name in value.names:
                self._reach(name, frame, f"reads {self._tensors(name, value, frame)}", value.subtree, READ)
        elif isinstance(value, Children):
            if context not in _SAFE_CONTEXTS:
                self._reach(value.name, frame, f"passes {self._show(value.name, frame)}._modules on", True)
        elif isinstance(value, (Bound, Nested, ModuleMethod)) and context == "passes":
            # handed to code not read, which may call it: read it as called with unknown arguments
            if isinstance(value, ModuleMethod):
                self._module_method(value, [ONLY_DATA], {}, _NO_CALL, frame)
            elif isinstance(value, Bound) and not self._follows(value.func.obj, value.self_values, [ONLY_DATA], {}):
                self._consume(value.self_values, frame, context, reach=reach)
            else:
                self._call_value(value, [ONLY_DATA] * 4, {}, _NO_CALL, frame)
        elif isinstance(value, Super) and context not in _SAFE_CONTEXTS:
            self._consume(value.self_values, frame, context, reach=reach)
        elif isinstance(value, Known) and reach and self._holds_modules(value.obj):
            self._reach("", frame, "stores an object holding modules", True)

    def _carries(self, values: frozenset) -> bool:
        """Whether ``values`` may hold something of the model (a module, its tensors, code over them)."""
        return bool(set().union(*(self._module_names(v) for v in values))) if values else False

    def _tensors(self, name: str, value: Tensors, frame: _Frame) -> str:
        if value.attr:
            return f"{self._show(name, frame)}.{value.attr}"
        return f"the tensors of {self._show(name, frame)}"

    def _show(self, name: str, frame: _Frame) -> str:
        """``name`` as the code being read writes it: ``self.a.bn`` where ``self`` is ``a``'s parent."""
        for value in frame.self_values:
            if isinstance(value, Mods):
                for base in sorted(value.names, key=len, reverse=True):
                    if base == name:
                        return "self"
                    if base == "" or name.startswith(base + "."):
                        return "self." + (name[len(base) + 1:] if base else name)
        return name or "the model"

    # -- concrete objects --------------------------------------------------------------------

    def _lift(self, obj: Any) -> frozenset:
        """The abstract value of a concrete object found in an attribute, a global or a closure."""
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            return ONLY_DATA
        if isinstance(obj, nn.Module):
            names = self.names.get(id(obj))
            return one(Mods(frozenset(names))) if names else ONLY_DATA
        if isinstance(obj, torch.Tensor):
            return ONLY_DATA
        if isinstance(obj, (list, tuple, set, frozenset, dict)) or type(obj).__name__ == "deque":
            return one(Seq(self._lift_items(obj))) if self._holds_modules(obj) else ONLY_DATA
        if isinstance(obj, weakref.ref):
            return one(Known(obj))
        if isinstance(obj, types.MethodType):
            return one(Bound(Known(obj.__func__), self._lift(obj.__self__)))
        return one(Known(obj))

    def _lift_items(self, obj: Any) -> frozenset:
        if isinstance(obj, dict):
            items: Iterable = (*obj.keys(), *obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            items = obj
        else:
            return ONLY_DATA
        result: set = set()
        for index, item in enumerate(items):
            if index >= _MAX_ITEMS:
                break
            result |= self._lift(item)
        return frozenset(result) or ONLY_DATA

    def _lift_all(self, objects: Iterable[Any]) -> frozenset:
        result: set = set()
        for obj in objects:
            result |= self._lift(obj)
        return frozenset(result) or ONLY_DATA

    def _holds_modules(self, obj: Any) -> bool:
        """Whether a plain object or container holds one of the model's modules, at any depth."""
        key = id(obj)
        if key not in self._holds:
            self._holds[key] = False  # a cycle reaches back here: not through this path
            self._holds[key] = any(
                id(m) in self.names for m in held_objects([obj], inside=lambda m: id(m) in self.names)
            )
        return self._holds[key]


def _functions_in(klass: type) -> list[Any]:
    found = []
    for value in vars(klass).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if isinstance(value, types.FunctionType):
            found.append(value)
    return found


def _is_generator(node: ast.AST) -> bool:
    for item in ast.walk(node):
        if isinstance(item, (ast.Yield, ast.YieldFrom)) and item is not node:
            return True
    return False


def _is_builtin(obj: Any) -> bool:
    try:
        return id(obj) in _BUILTINS and _BUILTIN_OBJECTS[id(obj)] is obj
    except TypeError:
        return False


# -- builtins the reader models --------------------------------------------------------------------


def _b_iterate(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if not args:
        return ONLY_DATA
    for extra in args[1:]:
        reader._consume(extra, frame, "passes")
    return one(Seq(reader._items(args[0], frame)))


def _b_enumerate(reader: Reader, args, kwargs, node, frame) -> frozenset:
    items = reader._items(args[0], frame) if args else ONLY_DATA
    return one(Seq(one(Tup((ONLY_DATA, items)))))


def _b_zip(reader: Reader, args, kwargs, node, frame) -> frozenset:
    return one(Seq(one(Tup(tuple(reader._items(a, frame) for a in args)))))


def _b_next(reader: Reader, args, kwargs, node, frame) -> frozenset:
    items = reader._items(args[0], frame) if args else ONLY_DATA
    return items | (args[1] if len(args) > 1 else NOTHING)


def _b_getattr(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if len(args) < 2:
        return ONLY_DATA
    default = args[2] if len(args) > 2 else NOTHING
    name = _constant(node.args[1]) if len(node.args) > 1 else _NOT_CONSTANT
    if isinstance(name, str):
        return reader._attribute(args[0], name, frame) | default
    return _dynamic_attribute(reader, args[0], _prefix(node.args[1]), frame) | default


def _dynamic_attribute(reader: Reader, owners: frozenset, prefix: str, frame: _Frame) -> frozenset:
    """``getattr(obj, name)`` with a name known only at run time: every attribute it may name."""
    result: set = set()
    for owner in owners:
        if isinstance(owner, Mods):
            for name in owner.names:
                module = reader.modules[name]
                candidates = {*module._modules, *module._parameters, *module._buffers, *vars(module)}
                for klass in type(module).__mro__:
                    candidates.update(vars(klass))
                for attr in sorted(candidates):
                    if not attr.startswith(prefix) or attr in BOOKKEEPING or attr.startswith("__"):
                        continue
                    if _defined_on(type(module), attr) is nn.Module and attr not in module.__dict__:
                        result.add(ModuleMethod("<named at run time>", frozenset({name})))
                    else:
                        result |= reader._module_attribute(name, attr, frame)
        elif isinstance(owner, Known):
            result.add(DATA)
            if reader._holds_modules(owner.obj):
                reader._reach("", frame, "reads an attribute named at run time of an object holding modules", True)
        else:
            result.add(DATA)
    return frozenset(result) or ONLY_DATA


def _b_setattr(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if len(args) >= 3:
        name = _constant(node.args[1]) if len(node.args) > 1 else _NOT_CONSTANT
        if isinstance(name, str):
            reader._store_attribute(args[0], name, args[2], frame)
        else:
            reader._reach_values(args[0], frame, "sets an attribute named at run time of", True)
            reader._consume(args[2], frame, "stores", reach=True)
    return ONLY_DATA


def _b_harmless(reader: Reader, args, kwargs, node, frame) -> frozenset:
    for value in (*args, *kwargs.values()):
        reader._consume(value, frame, "compare")
    return ONLY_DATA


def _b_vars(reader: Reader, args, kwargs, node, frame) -> frozenset:
    for value in args:
        reader._reach_values(value, frame, "reads vars() of", True)
    return ONLY_DATA


def _b_map(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if not args:
        return ONLY_DATA
    items = [reader._items(a, frame) for a in args[1:]]
    result: set = set()
    for callee in args[0]:
        result |= reader._call_value(callee, items, {}, node, frame)
    return one(Seq(frozenset(result) or ONLY_DATA))


def _b_filter(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if len(args) < 2:
        return ONLY_DATA
    items = reader._items(args[1], frame)
    for callee in args[0]:
        reader._call_value(callee, [items], {}, node, frame)
    return one(Seq(items))


def _b_sorted(reader: Reader, args, kwargs, node, frame) -> frozenset:
    items = reader._items(args[0], frame) if args else ONLY_DATA
    for callee in kwargs.get("key", NOTHING):
        reader._call_value(callee, [items], {}, node, frame)
    return one(Seq(items))


def _b_reduce(reader: Reader, args, kwargs, node, frame) -> frozenset:
    for value in (*args, *kwargs.values()):
        reader._consume(reader._items(value, frame), frame, "strict")
    return ONLY_DATA


def _b_super(reader: Reader, args, kwargs, node, frame) -> frozenset:
    if len(args) >= 2:
        result: set = set()
        for cls in args[0]:
            if isinstance(cls, Known) and isinstance(cls.obj, type):
                result.add(Super(args[1], cls))
        return frozenset(result) or ONLY_DATA
    if frame.defining is None:
        return ONLY_DATA
    return one(Super(frame.self_values, Known(frame.defining)))


def _b_dict(reader: Reader, args, kwargs, node, frame) -> frozenset:
    items: frozenset = NOTHING
    for value in args:
        items |= reader._items(value, frame)
    for value in kwargs.values():
        items |= value
    return one(Seq(items or ONLY_DATA))


_BUILTIN_TABLE = {
    enumerate: _b_enumerate,
    zip: _b_zip,
    next: _b_next,
    getattr: _b_getattr,
    setattr: _b_setattr,
    vars: _b_vars,
    map: _b_map,
    filter: _b_filter,
    sorted: _b_sorted,
    super: _b_super,
    dict: _b_dict,
    **{f: _b_iterate for f in (list, tuple, set, frozenset, iter, reversed)},
    **{f: _b_harmless for f in (hasattr, isinstance, issubclass, callable, id, type, len, hash, repr, str,
                                print, format, bool)},
    **{f: _b_reduce for f in (min, max, sum, any, all)},
}
_BUILTINS = {id(f): handler for f, handler in _BUILTIN_TABLE.items()}
_BUILTIN_OBJECTS = {id(f): f for f in _BUILTIN_TABLE}
