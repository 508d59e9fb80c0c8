"""Builtins the reader models: what each does with the values it is given."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from convfuse.graphs.held import BOOKKEEPING
from convfuse.graphs.untraced.frames import (
    NOT_CONSTANT,
    Frame,
    constant_of,
    defined_on,
    dotted_prefix,
)
from convfuse.graphs.untraced.values import (
    DATA,
    NOTHING,
    ONLY_DATA,
    Known,
    Mods,
    ModuleMethod,
    Seq,
    Super,
    Tup,
    one,
)

if TYPE_CHECKING:
    from convfuse.graphs.untraced.reader import Reader

def is_builtin(obj: Any) -> bool:
    try:
        return id(obj) in BUILTINS and _BUILTIN_OBJECTS[id(obj)] is obj
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
    name = constant_of(node.args[1]) if len(node.args) > 1 else NOT_CONSTANT
    if isinstance(name, str):
        return reader._attribute(args[0], name, frame) | default
    return _dynamic_attribute(reader, args[0], dotted_prefix(node.args[1]), frame) | default


def _dynamic_attribute(reader: Reader, owners: frozenset, prefix: str, frame: Frame) -> frozenset:
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
                    if defined_on(type(module), attr) is nn.Module and attr not in module.__dict__:
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
        name = constant_of(node.args[1]) if len(node.args) > 1 else NOT_CONSTANT
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
BUILTINS = {id(f): handler for f, handler in _BUILTIN_TABLE.items()}
_BUILTIN_OBJECTS = {id(f): f for f in _BUILTIN_TABLE}
