"""How the reader evaluates expressions: names, attributes, subscripts, items."""

from __future__ import annotations

import ast
import builtins
import inspect
import types
from typing import Any

from torch import nn

from convfuse.graphs.untraced.frames import (
    CONTAINER_METHODS,
    CONTAINERS,
    MODULE_CALLS,
    NOT_CONSTANT,
    TENSOR_METADATA,
    TENSOR_METADATA_METHODS,
    Frame,
    constant_of,
    defined_on,
)
from convfuse.graphs.untraced.values import (
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
    one,
)


class Expressions:
    # -- expressions -------------------------------------------------------------------------

    def _ev(self, node: ast.expr, frame: Frame) -> frozenset:
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

    def _name(self, name: str, frame: Frame) -> frozenset:
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

    def _attribute(self, owners: frozenset, attr: str, frame: Frame) -> frozenset:
        result: set = set()
        for owner in owners:
            if isinstance(owner, Mods):
                for name in owner.names:
                    result |= self._module_attribute(name, attr, frame)
            elif isinstance(owner, Tensors):
                if attr in TENSOR_METADATA:
                    result.add(DATA)
                elif attr in TENSOR_METADATA_METHODS:
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

    def _module_attribute(self, name: str, attr: str, frame: Frame) -> frozenset:
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
        owner = defined_on(cls, attr)
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
            if attr in MODULE_CALLS:
                return result | one(Mods(frozenset({name})))
            if owner is nn.Module:
                return result | one(ModuleMethod(attr, frozenset({name})))
            if owner in CONTAINERS and attr in CONTAINER_METHODS:
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

    def _super_attribute(self, owner: Super, attr: str, frame: Frame) -> frozenset:
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
                        if attr in MODULE_CALLS:
                            result.add(DATA)  # nn.Module.forward raises
                        else:
                            result.add(ModuleMethod(attr, value.names))
                    elif klass in CONTAINERS and attr in CONTAINER_METHODS and isinstance(value, Mods):
                        result.add(ModuleMethod(f"container.{attr}", value.names))
                    elif isinstance(found, types.FunctionType):
                        result.add(Bound(Known(found), one(value)))
                    elif isinstance(found, property) and found.fget is not None:
                        result |= self._call_function(Known(found.fget), one(value), [], {}, frame)
                    else:
                        result |= self._lift(found)
                    break
        return frozenset(result) or ONLY_DATA

    def _subscript(self, containers: frozenset, index: ast.expr, frame: Frame) -> frozenset:
        key = constant_of(index)
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
                    result |= self._lift(obj[key]) if key is not NOT_CONSTANT else self._lift_items(obj)
                except Exception:  # noqa: BLE001 - not indexable this way: nothing of the model
                    result |= self._lift_items(obj)
            else:
                result.add(DATA)
        return frozenset(result) or ONLY_DATA

    def _module_item(self, name: str, key: Any, frame: Frame, *, by_name: bool = False) -> frozenset:
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
        owner = defined_on(type(module), attr)
        return owner is not None and owner not in CONTAINERS and owner is not nn.Module

    def _items(self, values: frozenset, frame: Frame) -> frozenset:
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

