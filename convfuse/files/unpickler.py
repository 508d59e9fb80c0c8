"""A restricted unpickler: the pickle machine with every opcode that could call something the file
chose replaced by a rule of the policy (``convfuse.files.trust``).

It is handed to ``torch.load`` as its ``pickle_module``, so torch's own reader decides the format
and finds the records (zip or legacy), and every pickle torch reads goes through these rules:
there is no separate scan that could read other bytes than the load. What the file may do:

- GLOBAL names only what the policy admits (``Policy.admit``), importing nothing else.
- REDUCE (a call) only of inert standard types, torch's tensor rebuilds (with their arguments
  checked: no backward hooks, no tensor types but torch's), and ``functools.partial`` of a torch
  layer class; never of a module or data class, never of a function the file names.
- NEWOBJ only ``cls.__new__(cls)`` with no arguments, of an admitted class.
- BUILD only fills an instance's ``__dict__`` (through torch's own ``__setstate__`` for its
  modules), and never with a key that shadows a method or attribute of the class.
- APPEND/SETITEM only into plain lists, dicts and admitted subclasses that keep their base's
  methods, and dict keys and set elements only of types whose hashing is built in.
- No INST/OBJ (protocol 0/1 instantiation), no copyreg extensions.

Caps: at most ``MAX_OPCODES`` opcodes per pickle and ``MAX_DEPTH`` levels of nesting in keys.
"""

from __future__ import annotations

import functools
import pickle
import types
from collections import Counter, OrderedDict
from typing import Any

import torch

from convfuse.files.bounds import ViewBudget, check_rnn_state
from convfuse.files.trust import Kind, Policy, Refused, is_layer_class, python3_name

__all__ = ["MAX_OPCODES", "pickle_module", "shadowed"]

MAX_OPCODES = 20_000_000
"""Opcodes one pickle may run: real models use tens to hundreds of thousands (a resnet50 about 28,000)."""

_KEY_BUDGET = 10_000
_PRIMITIVE_KEYS = (str, bytes, int, float, bool, complex, type(None), torch.dtype)

_MISSING = object()


def shadowed(cls: type, key: Any, value: Any) -> bool:
    """Whether setting instance attribute ``key`` to ``value`` would put something callable from
    the file where code of ``cls`` expects its own: a callable under the name of a method or other
    class attribute (such as nn.Module's ``_compiled_call_impl = None``), or any special (dunder)
    name. Plain data under a method's name (ultralytics' ``m.type = "Conv"``) runs nothing."""
    if not isinstance(key, str):
        return True
    if key.startswith("__") and key.endswith("__"):
        return True
    return callable(value) and _static_lookup(cls, key) is not _MISSING


def _static_lookup(cls: type, key: str) -> Any:
    for base in cls.__mro__:
        if key in vars(base):
            return vars(base)[key]
    return _MISSING


def _check_key(key: Any) -> None:
    """Refused unless hashing and comparing ``key`` runs only built-in code (nested tuples within a budget)."""
    pending, seen = [key], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > _KEY_BUDGET:
            raise Refused("a dict key or set element is nested too deeply or too large")
        if type(value) in (tuple, frozenset):
            pending.extend(value)
        elif type(value) not in _PRIMITIVE_KEYS:
            raise Refused(f"a dict key or set element is a {type(value).__name__}, whose hashing is not built in")


def _empty_hooks(value: Any, what: str) -> None:
    if value is not None and (not isinstance(value, dict) or value):
        raise Refused(f"{what} carries backward hooks, which torch would call with arguments the file chose")


def _check_object_state(cls: type, state: Any, what: str) -> None:
    """The attributes a tensor rebuild would set on a tensor: plain data under names that are not
    the class's own."""
    if state is None:
        return
    if isinstance(state, tuple) and len(state) == 2:
        dict_state, slot_state = state
        if slot_state:
            raise Refused(f"{what} sets slot attributes on a tensor")
        state = dict_state
    if not isinstance(state, dict):
        raise Refused(f"{what} sets a tensor's state from a {type(state).__name__}")
    for key, value in state.items():
        if shadowed(cls, key, value) or callable(value):
            raise Refused(f"{what} sets attribute {key!r} of a tensor, replacing the tensor's own")


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined, misc]
    """``pickle._Unpickler`` with the policy's rules on every opcode that could call code."""

    policy: Policy  # set on the per-load subclass made by ``pickle_module``
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._opcodes = 0
        self._views = ViewBudget()

    # -- names -----------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise Refused("a GLOBAL opcode names something other than a module and a name")
        if self.proto < 3:
            module, name = python3_name(module, name)
        return self.policy.admit(module, name).obj

    # -- calls -----------------------------------------------------------------------------

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise Refused("a REDUCE opcode's arguments are not a tuple")
        self.stack[-1] = self._call(func, args)

    def _call(self, func: Any, args: tuple) -> Any:
        admitted = self.policy.admission(func)
        kind = admitted.kind if admitted is not None else None
        if kind is Kind.REBUILD:
            _check_rebuild(self.policy, admitted.name, args, self._views)
            return func(*args)
        if kind is Kind.INERT:
            _check_inert_call(admitted.name, func, args)
            return func(*args)
        if kind is Kind.PARTIAL:
            if len(args) != 1 or not is_layer_class(args[0]):
                raise Refused(
                    "the file makes a functools.partial of something other than a torch layer class; "
                    "only layer factories such as partial(nn.LayerNorm, eps=1e-6) are admitted"
                )
            return func(*args)
        name = admitted.name if admitted is not None else getattr(func, "__qualname__", type(func).__name__)
        what = "the constructor of " if isinstance(func, type) else ""
        raise Refused(
            f"the file calls {what}{name} with arguments stored in the file (torch.save never does; it "
            "creates objects empty and fills in their state), which could run code"
        )

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        kind = self.policy.kind_of(cls)
        if kind in (Kind.MODULE, Kind.DATA, Kind.INERT) and isinstance(cls, type) and args == () and not kwargs:
            return cls.__new__(cls)
        name = getattr(cls, "__qualname__", type(cls).__name__)
        raise Refused(f"the file creates a {name} with arguments stored in the file, which could run code")

    def load_inst(self) -> None:
        raise Refused("the file uses pickle's protocol-0 INST opcode, which calls a class; torch.save never does")

    def load_obj(self) -> None:
        raise Refused("the file uses pickle's protocol-1 OBJ opcode, which calls a class; torch.save never does")

    def get_extension(self, code: int) -> None:
        raise Refused("the file uses copyreg extension codes; torch.save never does")

    # -- state -----------------------------------------------------------------------------

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        kind = self.policy.kind_of(cls)
        if isinstance(inst, torch.Tensor):
            if cls is not torch.Tensor or not isinstance(state, tuple) or len(state) != 4:
                raise Refused("the file sets the state of a tensor other than by its storage")
            self._views.view(*state, inst.element_size(), "the file's legacy tensor")
            inst.set_(*state)  # a legacy tensor: storage, offset, size, stride
        elif kind is Kind.PARTIAL or isinstance(inst, functools.partial):
            _check_partial_state(state)
            inst.__setstate__(state)
        elif kind in (Kind.MODULE, Kind.DATA, Kind.INERT) or self.policy.inert_type(cls):
            if cls.__module__.split(".")[0] == "numpy":
                inst.__setstate__(state)  # numpy's own (C) code for its arrays, dtypes and scalars
                return
            state = _dict_state(state, cls)
            for key, value in state.items():
                if key not in _MODULE_BOOKKEEPING and shadowed(cls, key, value):
                    raise Refused(
                        f"the file sets attribute {key!r} of a {cls.__qualname__} to a {type(value).__name__}, "
                        "in place of the class's own, where code would call it"
                    )
            if kind is Kind.MODULE:
                if isinstance(inst, torch.nn.RNNBase):
                    check_rnn_state(state)  # its __setstate__ loops over the layers the file chose
                inst.__setstate__(state)  # torch's own (checked at admission): fills missing hook dicts
            else:
                inst.__dict__.update(state)
        else:
            raise Refused(f"the file sets the state of a {cls.__qualname__}, which convfuse does not admit")

    # -- containers ------------------------------------------------------------------------

    def load_append(self) -> None:
        item = self.stack.pop()
        list.append(self._list(self.stack[-1]), item)

    def load_appends(self) -> None:
        items = self.pop_mark()
        list.extend(self._list(self.stack[-1]), items)

    def _list(self, target: Any) -> list:
        if type(target) is list or (isinstance(target, list) and self.policy.kind_of(type(target)) is Kind.INERT):
            return target
        raise Refused(f"the file appends to a {type(target).__name__}, which is not a list")

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set(self.stack[-1], [(key, value)])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._set(self.stack[-1], list(zip(items[::2], items[1::2])))

    def _set(self, target: Any, pairs: list[tuple[Any, Any]]) -> None:
        plain = type(target) in (dict, OrderedDict, Counter)
        if not plain and not (isinstance(target, dict) and self.policy.kind_of(type(target)) is Kind.INERT):
            raise Refused(f"the file sets items of a {type(target).__name__}, which is not a dict")
        for key, value in pairs:
            _check_key(key)
            target[key] = value

    def load_dict(self) -> None:
        items = self.pop_mark()
        for key in items[::2]:
            _check_key(key)
        self.append(dict(zip(items[::2], items[1::2])))

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise Refused(f"the file adds items to a {type(target).__name__}, which is not a set")
        for item in items:
            _check_key(item)
        target.update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        for item in items:
            _check_key(item)
        self.append(frozenset(items))


_MODULE_BOOKKEEPING = frozenset(vars(torch.nn.Module()).keys())
"""The instance attributes every nn.Module has (hook dicts, ``_parameters``, ...): checked by
``convfuse.files.graph``, not as shadowing."""


def _count(handler: Any) -> Any:
    def counted(self: _Unpickler) -> None:
        self._opcodes += 1
        if self._opcodes > MAX_OPCODES:
            raise Refused(f"the pickle has more than {MAX_OPCODES:,} opcodes (the cap for one pickle)")
        handler(self)

    return counted


for _opcode, _name in (
    (pickle.REDUCE, "load_reduce"), (pickle.NEWOBJ, "load_newobj"), (pickle.NEWOBJ_EX, "load_newobj_ex"),
    (pickle.INST, "load_inst"), (pickle.OBJ, "load_obj"), (pickle.BUILD, "load_build"),
    (pickle.APPEND, "load_append"), (pickle.APPENDS, "load_appends"), (pickle.SETITEM, "load_setitem"),
    (pickle.SETITEMS, "load_setitems"), (pickle.DICT, "load_dict"), (pickle.ADDITEMS, "load_additems"),
    (pickle.FROZENSET, "load_frozenset"),
):
    _Unpickler.dispatch[_opcode[0]] = getattr(_Unpickler, _name)
_Unpickler.dispatch = {key: _count(handler) for key, handler in _Unpickler.dispatch.items()}


def _dict_state(state: Any, cls: type) -> dict:
    if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or state[1] == {}):
        state = state[0]
    if not isinstance(state, dict):
        raise Refused(f"the file sets the state of a {cls.__qualname__} from a {type(state).__name__}")
    for key in state:
        if not isinstance(key, str):
            raise Refused(f"the file sets a non-string attribute of a {cls.__qualname__}")
    return state


def _check_inert_call(name: str, func: Any, args: tuple) -> None:
    """Refused where calling an inert type with ``args`` would do more than build a small value:
    hash a key whose hashing is not built in, or allocate by a size the file chose (``bytearray(2**30)``,
    a numpy array of any shape)."""
    short = name.rsplit(".", 1)[1]
    if short == "bytearray" and not all(isinstance(a, (bytes, str)) for a in args):
        raise Refused("the file makes a bytearray of a size it chose, not from bytes")
    if short == "_reconstruct" and not (len(args) == 3 and args[1] == (0,) and isinstance(args[2], bytes)):
        raise Refused("the file makes a numpy array other than as numpy pickles one (empty, then filled)")
    if short in ("dtype", "scalar") and not all(isinstance(a, (str, bytes, bool, int)) or _numpy_dtype(a) for a in args):
        raise Refused(f"the file makes a numpy {short} from something other than its name and bytes")
    hashes_items = func in (set, frozenset, Counter)
    for arg in args:
        if isinstance(arg, dict):
            for key in arg:
                _check_key(key)
        elif type(arg) in (list, tuple):
            for item in arg:
                if hashes_items:
                    _check_key(item)
                elif type(item) in (tuple, list) and len(item) == 2:
                    _check_key(item[0])


def _numpy_dtype(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "numpy" and type(value).__name__.endswith("DType") or (
        type(value).__name__ == "dtype" and type(value).__module__ == "numpy"
    )


_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.dtype)


def _check_partial_state(state: Any) -> None:
    if not (isinstance(state, tuple) and len(state) == 4):
        raise Refused("the file sets a functools.partial's state from something other than its four fields")
    func, args, kwargs, namespace = state
    plain_args = isinstance(args, tuple) and all(isinstance(a, _PLAIN) for a in args)
    plain_kwargs = kwargs is None or (
        isinstance(kwargs, dict) and all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in kwargs.items())
    )
    if not is_layer_class(func) or not plain_args or not plain_kwargs or namespace:
        raise Refused(
            "the file holds a functools.partial that is not a torch layer class with plain arguments; "
            "only layer factories such as partial(nn.LayerNorm, eps=1e-6) are admitted"
        )


def _check_rebuild(policy: Policy, name: str, args: tuple, views: ViewBudget) -> None:
    """Refused where a tensor rebuild's arguments would do more than rebuild a tensor."""
    short = name.rsplit(".", 1)[1]
    what = f"the file's {short}"
    if short in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        if len(args) < 4 or not isinstance(args[0], torch.storage.TypedStorage):
            raise Refused(f"{what} rebuilds a tensor from a {type(args[0]).__name__ if args else 'nothing'}")
        dtype = args[6] if short == "_rebuild_tensor_v3" and len(args) > 6 else args[0].dtype
        if not isinstance(dtype, torch.dtype):
            raise Refused(f"{what} gives a tensor the dtype {type(dtype).__name__}")
        views.view(args[0], args[1], args[2], args[3], dtype.itemsize, what)
        if len(args) > 5:
            _empty_hooks(args[5], what)
    elif short == "_rebuild_meta_tensor_no_storage":
        if len(args) < 3 or not isinstance(args[0], torch.dtype):
            raise Refused(f"{what} rebuilds a meta tensor from something other than a dtype and a shape")
        views.view(None, 0, args[1], args[2], args[0].itemsize, what)
    elif short in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        if len(args) < 3 or not isinstance(args[0], torch.Tensor):
            raise Refused(f"{what} rebuilds a parameter from something other than a tensor")
        _empty_hooks(args[2], what)
        if short == "_rebuild_parameter_with_state":
            _check_object_state(torch.nn.Parameter, args[3] if len(args) > 3 else None, what)
    elif short == "_rebuild_from_type_v2":
        if len(args) != 4:
            raise Refused(f"{what} has {len(args)} arguments, not 4")
        func, new_type, inner, state = args
        inner_kind = policy.kind_of(func)
        tensor_types = (torch.Tensor, torch.nn.Parameter)
        if inner_kind is not Kind.REBUILD or func is torch._tensor._rebuild_from_type_v2:
            raise Refused(f"{what} calls {getattr(func, '__qualname__', func)!s}, which is not a tensor rebuild")
        if new_type not in tensor_types:
            raise Refused(f"{what} makes a tensor of type {getattr(new_type, '__qualname__', new_type)!s}")
        if not isinstance(inner, tuple):
            raise Refused(f"{what} has arguments that are not a tuple")
        _check_rebuild(policy, policy.admission(func).name, inner, views)
        _check_object_state(new_type, state, what)
    elif short == "_get_layout":
        if len(args) != 1 or not isinstance(args[0], str):
            raise Refused(f"{what} names a layout by something other than a string")
    elif short == "encode" and not (len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1"):
        # pickle writes bytes as encode(text, "latin1"); any other codec name is a lookup (an import)
        raise Refused(f"{what} encodes something other than a string as latin1 (how pickle writes bytes)")


def pickle_module(policy: Policy) -> types.ModuleType:
    """A module for ``torch.load(..., pickle_module=...)`` whose unpickler follows ``policy``."""
    unpickler = type("Unpickler", (_Unpickler,), {"policy": policy})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("convfuse_restricted_pickle", __doc__)
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module
