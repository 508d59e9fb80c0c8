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
_PLAIN = (str, bytes, bytearray, int, float, bool, complex, type(None), slice, range)
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme, torch.device, torch.Size,
                 torch.storage.TypedStorage, torch.storage.UntypedStorage)


def check_object_graph(root: Any, policy: Policy) -> None:
    """Refused (naming the path) where ``root`` holds something torch or convfuse would act on
    as code; see the module doc."""
    walker = _Walker(policy)
    walker.walk(root)
    walker.check_tree()


class _Walker:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.seen: set[int] = set()
        self.roots: list[nn.Module] = []
        self.attached: list[tuple[str, nn.Module]] = []  # modules met inside a module, outside _modules

    def walk(self, root: Any) -> None:
        # (value, path, depth, inside a module's plain attributes)
        pending: list[tuple[Any, str, int, bool]] = [(root, "(file)", 0, False)]
        while pending:
            value, path, depth, inside = pending.pop()
            if depth > MAX_DEPTH:
                raise Refused(f"{path}: the file's data is nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, _PLAIN) or isinstance(value, _TORCH_VALUES):
                continue
            if isinstance(value, nn.Module):
                if inside:
                    self.attached.append((path, value))
                elif id(value) not in {id(r) for r in self.roots}:
                    self.roots.append(value)
            if id(value) in self.seen:
                continue
            self.seen.add(id(value))
            pending.extend(self._children(value, path, depth + 1, inside))

    def _children(self, value: Any, path: str, depth: int, inside: bool) -> list[tuple[Any, str, int, bool]]:
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
        items: list[tuple[Any, str, int, bool]] = []
        if isinstance(value, Mapping):
            items = [(v, f"{path}[{k!r}]", depth, inside) for k, v in value.items()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = [(v, f"{path}[{i}]", depth, inside) for i, v in enumerate(value)]
        if type(value) in (dict, list, tuple, set, frozenset):
            return items
        if isinstance(value, functools.partial):
            return [(value.args, f"{path}.args", depth, inside), (value.keywords, f"{path}.keywords", depth, inside)]
        admitted = self.policy.admission(value)
        if admitted is not None and admitted.kind is Kind.FUNCTION:
            return []
        if admitted is not None or callable(value) and not self.policy.kind_of(type(value)):
            what = admitted.name if admitted is not None else type(value).__qualname__
            raise Refused(f"{path}: holds {what} as a value, which installed code could call")
        if (
            isinstance(value, torch.Tensor)
            or self.policy.kind_of(type(value)) in (Kind.DATA, Kind.INERT)
            or self.policy.inert_type(type(value))
        ):
            return items + self._attributes(value, path, depth, inside)
        raise Refused(f"{path}: holds a {type(value).__qualname__} object, which convfuse does not admit")

    def _attributes(self, value: Any, path: str, depth: int, inside: bool) -> list[tuple[Any, str, int, bool]]:
        try:
            attributes = object.__getattribute__(value, "__dict__")
        except AttributeError:
            return []
        cls = type(value)
        for key, item in attributes.items():
            if shadowed(cls, key, item):
                raise Refused(f"{path}.{key}: an instance attribute replaces the {cls.__qualname__} class's own")
        return [(item, f"{path}.{key}", depth, inside) for key, item in attributes.items()]

    def _module(self, module: nn.Module, path: str, depth: int) -> list[tuple[Any, str, int, bool]]:
        name = "(model)" if path == "(file)" else path
        prefix = "" if path == "(file)" else f"{path}."
        attributes = object.__getattribute__(module, "__dict__")
        cls = type(module)
        children: list[tuple[Any, str, int, bool]] = []
        for key, value in attributes.items():
            where = f"{name}.{key}"
            if key in _HOOK_DICTS:
                if not isinstance(value, dict) or value:
                    raise Refused(
                        f"{name}: the file sets {key} of this module, which torch would call with "
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
                    children.append((module_value, f"{prefix}{child}", depth, False))
            elif key == "_non_persistent_buffers_set":
                if not isinstance(value, set) or not all(isinstance(k, str) for k in value):
                    raise Refused(f"{where}: holds a {type(value).__name__}, not a set of buffer names")
            elif key in ("training", "_is_full_backward_hook"):
                if not isinstance(value, (bool, type(None))):
                    raise Refused(f"{where}: holds a {type(value).__name__}, not a flag")
            elif shadowed(cls, key, value):
                raise Refused(f"{where}: an instance attribute replaces the {cls.__qualname__} class's own")
            else:
                children.append((value, where, depth, True))
        return children

    def _slot_items(self, value: Any, where: str, expected: type, what: str) -> list[tuple[str, Any]]:
        if not isinstance(value, dict):
            raise Refused(f"{where}: holds a {type(value).__name__}, not a dict of {what}")
        items = []
        for key, item in value.items():
            if not isinstance(key, str) or (item is not None and not isinstance(item, expected)):
                raise Refused(f"{where}[{key!r}]: holds a {type(item).__name__} among the module's {what}")
            if item is not None:
                items.append((key, item))
        return items

    def _slots(self, value: Any, where: str, depth: int, expected: type, what: str) -> list[tuple[Any, str, int, bool]]:
        return [(item, f"{where}[{key!r}]", depth, True) for key, item in self._slot_items(value, where, expected, what)]

    def check_tree(self) -> None:
        """Every module met in a module's plain attributes is in some model's module tree."""
        tree: set[int] = set()
        pending = list(self.roots)
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

