"""How the reader follows calls: functions, module calls, methods."""

from __future__ import annotations

import ast
import functools
import inspect
import types
import weakref
from typing import Any

from convfuse.graphs.untraced.builtins import BUILTINS, is_builtin
from convfuse.graphs.untraced.frames import (
    MODULE_DATA_METHODS,
    MODULE_SELF_METHODS,
    MUTATORS,
    NO_CALL,
    NOT_CONSTANT,
    Frame,
    constant_of,
    functions_in,
    top_package,
)
from convfuse.graphs.untraced.values import (
    NOTHING,
    ONLY_DATA,
    Bound,
    External,
    Instance,
    Known,
    Method,
    Mods,
    ModuleMethod,
    Nested,
    Seq,
    Tensors,
    Tup,
    bounded,
    one,
)


class Calls:
    # -- calls -------------------------------------------------------------------------------

    def _call(self, node: ast.Call, frame: Frame) -> frozenset:
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
                    frame: Frame) -> frozenset:
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
            if top_package(callee.name) in self.own and self._carries(every):
                self._unreadable_values(list(args) + list(kwargs.values()), frame.code,
                                        f"calls {callee.name}, which is not loaded")
            else:
                self._consume(every, frame, "passes")
            return ONLY_DATA
        self._consume(every, frame, "passes")  # an unknown callee: the values are handed away
        return ONLY_DATA

    def _call_nested(self, callee: Nested, args: list[frozenset], kwargs: dict[str, frozenset],
                     frame: Frame) -> frozenset:
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
        return top_package(getattr(func, "__module__", None)) in self.own

    def _call_known(self, obj: Any, args: list[frozenset], kwargs: dict[str, frozenset], node: ast.Call,
                    frame: Frame) -> frozenset:
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        modelled = BUILTINS.get(id(obj)) if is_builtin(obj) else None
        if modelled is not None:
            return modelled(self, args, kwargs, node, frame)
        if isinstance(obj, functools.partial):
            lifted = [self._lift(a) for a in obj.args]
            extra = {k: self._lift(v) for k, v in obj.keywords.items()}
            result: set = set()
            for callee in self._lift(obj.func):
                result |= self._call_value(callee, lifted + args, {**extra, **kwargs}, NO_CALL, frame)
            return frozenset(result) or ONLY_DATA
        if isinstance(obj, weakref.ref):
            return self._lift(obj())
        if isinstance(obj, type):
            own = top_package(obj.__module__) in self.own
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
        return any(func in functions_in(klass) for name in value.names for klass in type(self.modules[name]).__mro__)

    def _module_method(self, method: ModuleMethod, args: list[frozenset], kwargs: dict[str, frozenset],
                       node: ast.Call, frame: Frame) -> frozenset:
        """A method of nn.Module (or of torch's containers) on the model's modules."""
        every = frozenset().union(*args, *kwargs.values()) if (args or kwargs) else NOTHING
        name = method.name
        names = method.names
        children = self._lift_all(c for n in names for c in self.modules[n]._modules.values())
        below = self._lift_all(m for n in names for m in self.modules[n].modules())
        if name in MODULE_SELF_METHODS:
            self._consume(every, frame, "compare")
            return one(Mods(names))
        if name in MODULE_DATA_METHODS:
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
            key = constant_of(node.args[0]) if node.args else NOT_CONSTANT
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
            key = constant_of(node.args[0]) if node.args else NOT_CONSTANT
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
                frame: Frame) -> frozenset:
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
                key = constant_of(node.args[0]) if node.args else NOT_CONSTANT
                return self._module_item(children.name, key, frame, by_name=True)
            if verb in ("keys", "__len__", "__contains__"):
                return ONLY_DATA
            self._reach(children.name, frame, f"changes {self._show(children.name, frame)}._modules", True)
            self._consume(every, frame, "passes")
            return ONLY_DATA
        if method.name in MUTATORS:
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

