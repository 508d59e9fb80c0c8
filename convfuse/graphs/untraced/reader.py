"""The reader of untraced forwards: entry points, source, functions, uses and concrete objects."""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
import tokenize
import types
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from convfuse.graphs.held import held_objects
from convfuse.graphs.untraced.calls import Calls
from convfuse.graphs.untraced.expressions import Expressions
from convfuse.graphs.untraced.frames import (
    MAX_FUNCTIONS,
    MAX_ITEMS,
    MAX_PASSES,
    NO_CALL,
    SAFE_CONTEXTS,
    Frame,
    Scope,
    TooMuch,
    functions_in,
    is_generator,
    local_names,
    top_package,
)
from convfuse.graphs.untraced.statements import Statements
from convfuse.graphs.untraced.uses import (
    CALL,
    REACH,
    READ,
    UNREADABLE,
    CodeUse,
    Use,
)
from convfuse.graphs.untraced.values import (
    DATA,
    NOTHING,
    ONLY_DATA,
    Bound,
    Children,
    Instance,
    Known,
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


class Reader(Statements, Expressions, Calls):
    """Reads untraced forwards of ``model``; ``uses`` collects what they do with its modules."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.names: dict[int, list[str]] = {}
        for name, module in self.modules.items():
            self.names.setdefault(id(module), []).append(name)
        self.own = {top_package(type(m).__module__) for m in self.modules.values()} - {"torch", "builtins"}
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
            for _ in range(MAX_PASSES):  # again while code stores modules on modules
                version = self._version
                self._call_function(Known(forward), one(Mods(frozenset({name}))), [ONLY_DATA] * 8, {}, None,
                                    entry=True)
                if version == self._version:
                    break
        except TooMuch:
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
        caller: Frame | None,
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
        if self._read > MAX_FUNCTIONS:
            raise TooMuch
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
                    if any(v is func or inspect.unwrap(v) is func for v in functions_in(klass)):
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
        parent: Scope | None,
        self_values: frozenset,
        defining: type | None,
    ) -> frozenset:
        scope = Scope(local_names(node), parent)
        frame = Frame(func, scope, self_values, defining)
        self._bind_arguments(node.args, positional, kwargs, frame)
        body = node.body if isinstance(node.body, list) else None
        for _ in range(MAX_PASSES):
            before = (scope.size(), len(frame.returns), len(frame.yields), len(self.uses.uses))
            if body is None:
                frame.returns.update(bounded(self._ev(node.body, frame)))
            else:
                self._block(body, frame)
            if before == (scope.size(), len(frame.returns), len(frame.yields), len(self.uses.uses)):
                break
        result = frozenset(frame.returns) or ONLY_DATA
        if frame.yields or (body is not None and is_generator(node)):
            result = result | one(Seq(frozenset(frame.yields) or ONLY_DATA))
        return result

    def _bind_arguments(self, args: ast.arguments, positional: list[frozenset], kwargs: dict[str, frozenset],
                        frame: Frame) -> None:
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

    # -- uses --------------------------------------------------------------------------------

    def _use(self, name: str, frame: Frame, how: str) -> None:
        self.uses.add(Use(name, CALL, frame.code, how))

    def _reach(self, name: str, frame: Frame, how: str, subtree: bool, kind: str = REACH) -> None:
        self.uses.add(Use(name, kind, frame.code, how, subtree))

    def _reach_values(self, values: frozenset, frame: Frame, verb: str, subtree: bool | None) -> None:
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

    def _consume(self, values: frozenset, frame: Frame, context: str, *, reach: bool = False) -> None:
        """``values`` used in ``context``: "compare"/"truth" only look at a module (not at its
        tensors); "strict" and "passes" (handed to code not read) use modules whole and read
        tensors; ``reach``: kept where later code not read may reach inside."""
        items: set = set()
        for value in values:
            if isinstance(value, (Seq, Tup)):
                if context in SAFE_CONTEXTS:
                    continue  # a collection's truth or identity says nothing of its items
                leaves(value, items)
            else:
                items.add(value)
        for value in items:
            self._consume_one(value, frame, context, reach, 0)

    def _consume_one(self, value: Any, frame: Frame, context: str, reach: bool, depth: int) -> None:
        if depth > 8 or value is DATA:
            return
        if isinstance(value, Mods):
            if context in SAFE_CONTEXTS:
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
            if context not in SAFE_CONTEXTS:
                self._reach(value.name, frame, f"passes {self._show(value.name, frame)}._modules on", True)
        elif isinstance(value, (Bound, Nested, ModuleMethod)) and context == "passes":
            # handed to code not read, which may call it: read it as called with unknown arguments
            if isinstance(value, ModuleMethod):
                self._module_method(value, [ONLY_DATA], {}, NO_CALL, frame)
            elif isinstance(value, Bound) and not self._follows(value.func.obj, value.self_values, [ONLY_DATA], {}):
                self._consume(value.self_values, frame, context, reach=reach)
            else:
                self._call_value(value, [ONLY_DATA] * 4, {}, NO_CALL, frame)
        elif isinstance(value, Super) and context not in SAFE_CONTEXTS:
            self._consume(value.self_values, frame, context, reach=reach)
        elif isinstance(value, Known) and reach and self._holds_modules(value.obj):
            self._reach("", frame, "stores an object holding modules", True)

    def _carries(self, values: frozenset) -> bool:
        """Whether ``values`` may hold something of the model (a module, its tensors, code over them)."""
        return bool(set().union(*(self._module_names(v) for v in values))) if values else False

    def _tensors(self, name: str, value: Tensors, frame: Frame) -> str:
        if value.attr:
            return f"{self._show(name, frame)}.{value.attr}"
        return f"the tensors of {self._show(name, frame)}"

    def _show(self, name: str, frame: Frame) -> str:
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
            if index >= MAX_ITEMS:
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


