"""The check of the object graph a restricted load built, before anything runs on it.

The unpickler (``convfuse.files.unpickler``) let the file choose only data and which admitted
classes its objects are. What remains to check is the shape of that data where torch would act
on it: no module carries hooks (torch would call them), ``_parameters``/``_buffers``/``_modules``
hold what their names say, no instance attribute replaces a method of its class, every module
reachable is in a model's module tree (so every module convfuse checks and rewrites is one it
sees), and nothing is nested deeper than ``MAX_DEPTH``. It reads attributes statically (no
``named_modules()``, no ``repr``, no method of a loaded object), so it runs no code of the file.
"""

from __future__ import annotations

import enum
import functools
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from convfuse.files.trust import Kind, Policy, Refused, is_layer_class
from convfuse.files.unpickler import shadowed

__all__ = ["MAX_DEPTH", "check_object_graph"]

MAX_DEPTH = 500
"""Levels of nesting a loaded object may have (a deep module tree has a few dozen)."""

_HOOK_DICTS = frozenset(("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                         "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                         "_load_state_dict_post_hooks"))
_HOOK_FLAGS = frozenset(("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks_with_kwargs"))
_BOOKKEEPING = frozenset(vars(nn.Module()))
_PLAIN = (str, bytes, bytearray, int, float, bool, complex, type(None), slice, range)
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme, torch.device, torch.Size,
                 torch.storage.TypedStorage, torch.storage.UntypedStorage)


def check_object_graph(root: Any, policy: Policy) -> None:
    """Refused (naming the path) where ``root`` holds something torch or convfuse would act on
    as code; see the module doc. Linear in the objects the file built."""
    walker = _Walker(policy)
    walker.walk(root)
    walker.check_tree()


class _Path:
    """Where a value lies, rendered only for an error message (a file may build millions of
    values, and keys of any size)."""

    __slots__ = ("parent", "key", "attribute")

    def __init__(self, parent: _Path | None, key: Any, attribute: bool) -> None:
        self.parent, self.key, self.attribute = parent, key, attribute

    def child(self, key: Any) -> _Path:
        return _Path(self, key, False)

    def attr(self, name: str) -> _Path:
        return _Path(self, name, True)

    def __str__(self) -> str:
        steps, node = [], self
        while node is not None and node.parent is not None:
            if node.attribute:
                steps.append(f".{node.key}")
            else:
                text = repr(node.key) if isinstance(node.key, (str, bytes, int, float, bool, type(None))) else "..."
                steps.append(f"[{text[:40]}]")
            node = node.parent
        text = "".join(reversed(steps)).lstrip(".")
        return f"(file){text}" if text.startswith("[") else text or "(model)"


_TOP = _Path(None, None, False)
Item = tuple[Any, _Path, int, bool]  # value, where, depth, inside a module's plain attributes


class _Walker:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.seen: set[int] = set()
        self.roots: dict[int, nn.Module] = {}
        self.attached: list[tuple[_Path, nn.Module]] = []  # modules met inside a module, outside _modules

    def walk(self, root: Any) -> None:
        pending: list[Item] = [(root, _TOP, 0, False)]
        while pending:
            value, path, depth, inside = pending.pop()
            if depth > MAX_DEPTH:
                raise Refused(f"{path}: the file's data is nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, _PLAIN) or isinstance(value, _TORCH_VALUES):
                continue
            if isinstance(value, nn.Module):
                if inside:
                    self.attached.append((path, value))
                else:
                    self.roots.setdefault(id(value), value)
            if id(value) in self.seen:
                continue
            self.seen.add(id(value))
            pending.extend(self._children(value, path, depth + 1, inside))

    def _children(self, value: Any, path: _Path, depth: int, inside: bool) -> list[Item]:
        if isinstance(value, nn.Module):
            return self._module(value, path, depth)
        if isinstance(value, enum.Enum):
            return []
        if isinstance(value, type):
            if is_layer_class(value):
                return []  # a layer factory, as ResNet's _norm_layer
            raise Refused(
                f"{path}: holds the class {value.__module__}.{value.__qualname__} as a value, which installed "
                "code could call; only torch layer classes (a norm_layer) may be held so"
            )
        items: list[Item] = []
        if isinstance(value, Mapping):
            items = [(v, path.child(k), depth, inside) for k, v in value.items()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = [(v, path.child(i), depth, inside) for i, v in enumerate(value)]
        if type(value) in (dict, list, tuple, set, frozenset):
            return items
        if isinstance(value, functools.partial):
            return [(value.args, path.attr("args"), depth, inside), (value.keywords, path.attr("keywords"), depth, inside)]
        admitted = self.policy.admission(value)
        if admitted is not None and admitted.kind is Kind.FUNCTION:
            return []
        if admitted is not None or callable(value) and not self.policy.kind_of(type(value)):
            what = admitted.name if admitted is not None else type(value).__qualname__
            raise Refused(f"{path}: holds {what} as a value, which installed code could call")
        numpy = type(value).__module__.split(".")[0] == "numpy"  # what numpy's object arrays hold is out of sight
        if numpy and getattr(getattr(value, "dtype", value), "hasobject", False):
            raise Refused(f"{path}: holds a numpy array of Python objects, which convfuse does not admit")
        if (
            isinstance(value, torch.Tensor)
            or self.policy.kind_of(type(value)) in (Kind.DATA, Kind.INERT)
            or self.policy.inert_type(type(value))
        ):
            return items + self._attributes(value, path, depth, inside)
        raise Refused(f"{path}: holds a {type(value).__qualname__} object, which convfuse does not admit")

    def _attributes(self, value: Any, path: _Path, depth: int, inside: bool) -> list[Item]:
        try:
            attributes = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return []
        cls = type(value)
        for key, item in attributes.items():
            if shadowed(cls, key, item):
                raise Refused(f"{path.attr(key)}: an instance attribute replaces the {cls.__qualname__} class's own")
        return [(item, path.attr(key), depth, inside) for key, item in attributes.items()]

    def _module(self, module: nn.Module, path: _Path, depth: int) -> list[Item]:
        attributes = object.__getattribute__(module, "__dict__")
        cls = type(module)
        _check_unique_names(attributes, path)
        children: list[Item] = []
        for key, value in attributes.items():
            where = path.attr(key)
            if key in _HOOK_DICTS:
                if not isinstance(value, dict) or value:
                    raise Refused(
                        f"{path}: the file sets {key} of this module, which torch would call with "
                        "arguments chosen by the file"
                    )
            elif key in _HOOK_FLAGS:
                if not isinstance(value, dict) or any(not isinstance(k, int) for k in value):
                    raise Refused(f"{where}: holds a {type(value).__name__}, not torch's hook bookkeeping")
            elif key == "_parameters":
                children += self._slots(value, where, depth, nn.Parameter, "parameters")
            elif key == "_buffers":
                children += self._slots(value, where, depth, torch.Tensor, "buffers")
            elif key == "_modules":
                for child, module_value in self._slot_items(value, where, nn.Module, "submodules"):
                    children.append((module_value, path.attr(child), depth, False))
            elif key == "_non_persistent_buffers_set":
                if not isinstance(value, set) or not all(isinstance(k, str) for k in value):
                    raise Refused(f"{where}: holds a {type(value).__name__}, not a set of buffer names")
            elif key == "_flat_weight_refs" and isinstance(module, nn.RNNBase):
                _check_weight_refs(value, attributes.get("_flat_weights"), where)
            elif key in ("training", "_is_full_backward_hook"):
                if not isinstance(value, (bool, type(None))):
                    raise Refused(f"{where}: holds a {type(value).__name__}, not a flag")
            elif shadowed(cls, key, value):
                raise Refused(f"{where}: an instance attribute replaces the {cls.__qualname__} class's own")
            else:
                children.append((value, where, depth, True))
        return children

    def _slot_items(self, value: Any, where: _Path, expected: type, what: str) -> list[tuple[str, Any]]:
        if not isinstance(value, dict):
            raise Refused(f"{where}: holds a {type(value).__name__}, not a dict of {what}")
        items = []
        for key, item in value.items():
            if not isinstance(key, str) or (item is not None and not isinstance(item, expected)):
                raise Refused(f"{where.child(key)}: holds a {type(item).__name__} among the module's {what}")
            if item is not None:
                items.append((key, item))
        return items

    def _slots(self, value: Any, where: _Path, depth: int, expected: type, what: str) -> list[Item]:
        return [(item, where.child(key), depth, True) for key, item in self._slot_items(value, where, expected, what)]

    def check_tree(self) -> None:
        """Every module met in a module's plain attributes is in some model's module tree."""
        tree: set[int] = set()
        pending = list(self.roots.values())
        while pending:
            module = pending.pop()
            if id(module) in tree:
                continue
            tree.add(id(module))
            pending.extend(m for m in object.__getattribute__(module, "__dict__")["_modules"].values() if m is not None)
        for path, module in self.attached:
            if id(module) not in tree:
                raise Refused(
                    f"{path}: a {type(module).__qualname__} module kept outside the module tree "
                    "(not a registered submodule), which convfuse could neither check nor rewrite"
                )


def _check_weight_refs(refs: Any, weights: Any, where: _Path) -> None:
    """An RNN's weak references to its ``_flat_weights``, which its ``__setstate__`` makes (a file
    cannot name weakref): each must point at the weight in its place, or be None where that is."""
    if type(refs) is not list or type(weights) is not list or len(refs) != len(weights) or any(
        (ref is not None or weight is not None) and not (type(ref) is weakref.ref and ref() is weight)
        for ref, weight in zip(refs, weights)
    ):
        raise Refused(f"{where}: holds something other than references to the RNN's own weights")


_SLOT_DICTS = ("_parameters", "_buffers", "_modules")


def _check_unique_names(attributes: dict, path: _Path) -> None:
    """Refused where one name is in two of a module's parameters, buffers, submodules and plain
    attributes (nn.Module's own ``__setattr__`` never leaves it so): its forward would use one,
    its ``state_dict`` (what a state_dict or safetensors output holds) another."""
    seen: dict[str, str] = {}
    places = [(key, "attribute") for key in attributes if key not in _BOOKKEEPING]
    for slot in _SLOT_DICTS:
        value = attributes.get(slot)
        if isinstance(value, dict):
            places += [(key, slot) for key in value if isinstance(key, str)]
    for key, place in places:
        if seen.setdefault(key, place) != place:
            raise Refused(
                f"{path}: {key!r} is both in {seen[key]} and in {place}: forward would use one, the "
                "state_dict the other"
            )
