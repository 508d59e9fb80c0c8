"""What the sizes a file chose may reach: tensor views within their storages, RNN hyperparameters
within their weights.

A file chooses the size and strides of every tensor it rebuilds from a storage, and the
hyperparameters of every layer; installed code then allocates by them (a ``clone`` of a view, the
hidden state of an RNN, a loop over its layers). Here they are held to what the file's own bytes
support, checked by the restricted unpickler (``convfuse.files.unpickler``) before torch builds
anything from them:

- a view (``_rebuild_tensor*``, a legacy tensor's ``set_``) has non-negative sizes, strides and
  offset, stays inside its storage, and reaches no more elements than its storage holds (a few
  stride-0 views, as ``expand`` makes, may be small); all the views of one pickle together reach
  at most ``VIEW_FACTOR`` times the bytes of their storages (plus ``SMALL_VIEW_BYTES``);
- an RNN's ``num_layers``, ``hidden_size``, ``proj_size``, ``input_size``, ``bidirectional`` and
  ``bias`` describe exactly the weights it holds (names and shapes, as its constructor makes them),
  so the loop of its ``__setstate__`` and the state its forward allocates are bounded by them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from convfuse.files.trust import Refused

__all__ = ["SMALL_VIEW_BYTES", "SMALL_VIEW_ELEMENTS", "VIEW_FACTOR", "ViewBudget", "check_rnn_state", "check_view"]

SMALL_VIEW_ELEMENTS = 2**20
"""Elements a view may reach beyond its storage's own (a stride-0 ``expand`` of a small tensor)."""

VIEW_FACTOR = 4
SMALL_VIEW_BYTES = 64 * 2**20
"""All the views of one pickle reach at most ``VIEW_FACTOR`` times their storages' bytes, plus this
(tied weights, a state_dict's detached copies and a model's parameters share storages)."""


_INT64 = 2**63


def _index(value: Any) -> int | None:
    """A size, stride or offset as torch holds it (an int64); None for anything else, negative
    numbers included (before any arithmetic: a product of numbers of a billion digits each takes hours)."""
    return value if type(value) is int and 0 <= value < _INT64 else None


def _shape(values: Any, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise Refused(f"{what} gives a tensor's {name} as a {type(values).__name__}, not a tuple")
    items = tuple(_index(v) for v in values)
    if any(v is None for v in items):
        raise Refused(f"{what} gives a tensor a {name} that is not a tuple of non-negative integers")
    return items  # type: ignore[return-value]


def check_view(storage_bytes: int, offset: Any, size: Any, stride: Any, item_size: int, what: str) -> None:
    """Refused unless a view of a storage of ``storage_bytes`` stays inside it and reaches no more
    elements than it holds (or few)."""
    size = _shape(size, what, "size")
    stride = _shape(stride, what, "stride")
    offset = _index(offset)
    if offset is None or len(size) != len(stride):
        raise Refused(f"{what} gives a tensor an offset or strides that do not fit its size")
    elements = storage_bytes // item_size if item_size else 0
    numel = math.prod(size)
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements:
            raise Refused(f"{what} views a storage of {elements:,} elements up to element {last:,}, past its end")
        if numel > max(elements, SMALL_VIEW_ELEMENTS):
            raise Refused(
                f"{what} views a storage of {elements:,} elements as {numel:,} (strides that overlap), which "
                "later copies would allocate in full"
            )


class ViewBudget:
    """The views one pickle rebuilds, against the storages they view."""

    def __init__(self) -> None:
        self.storage_bytes: dict[int, int] = {}
        self.view_bytes = 0

    def view(self, storage: Any, offset: Any, size: Any, stride: Any, item_size: int, what: str) -> None:
        """Refused unless ``storage[offset]`` viewed with ``size``/``stride`` stays inside the
        storage, reaches no more than it holds (or few elements), and keeps within the budget."""
        size = _shape(size, what, "size")
        stride = _shape(stride, what, "stride")
        offset = _index(offset)
        if offset is None or offset < 0 or len(size) != len(stride):
            raise Refused(f"{what} gives a tensor an offset or strides that do not fit its size")
        if storage is not None and not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
            raise Refused(f"{what} views a {type(storage).__name__}, not a storage")
        untyped = storage.untyped() if isinstance(storage, torch.storage.TypedStorage) else storage
        storage_bytes = int(untyped.nbytes()) if storage is not None else 0
        numel = math.prod(size)
        if storage is not None:  # None: a meta tensor, which has no storage (only the budget)
            check_view(storage_bytes, offset, size, stride, item_size, what)
            self.storage_bytes.setdefault(id(untyped), storage_bytes)
        self.view_bytes += numel * item_size
        if self.view_bytes > VIEW_FACTOR * sum(self.storage_bytes.values()) + SMALL_VIEW_BYTES:
            raise Refused(
                f"the file's tensors view {self.view_bytes:,} bytes of storages that hold "
                f"{sum(self.storage_bytes.values()):,} (the same bytes as many tensors), over the cap of "
                f"{VIEW_FACTOR} times"
            )


# -- recurrent layers ---------------------------------------------------------------------

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _count(state: dict, key: str, least: int, default: Any = None) -> int:
    value = state.get(key, default)
    if type(value) is not int or not least <= value < _INT64:
        raise Refused(f"the file gives an RNN's {key} as a {type(value).__name__} out of range, not an integer of "
                      f"at least {least}")
    return value


def _flag(state: dict, key: str) -> bool:
    value = state.get(key)
    if type(value) is not bool:
        raise Refused(f"the file gives an RNN's {key} as a {type(value).__name__}, not a bool")
    return value


def check_rnn_state(state: dict) -> None:
    """Refused unless an RNN's state describes exactly the weights it holds (see the module doc)."""
    mode = state.get("mode")
    if not isinstance(mode, str) or mode not in _GATES:
        raise Refused(f"the file gives an RNN a mode that is not one of {', '.join(_GATES)}")
    parameters = state.get("_parameters")
    if not isinstance(parameters, dict):
        raise Refused("the file gives an RNN no dict of parameters")
    layers = _count(state, "num_layers", 1)
    hidden = _count(state, "hidden_size", 1)
    inputs = _count(state, "input_size", 1)
    projection = _count(state, "proj_size", 0, default=0)
    bidirectional, bias = _flag(state, "bidirectional"), _flag(state, "bias")
    directions = 2 if bidirectional else 1
    if layers * directions * 2 > len(parameters) or projection >= hidden:
        raise Refused(
            f"the file gives an RNN {layers:,} layers and {len(parameters)} weights, or a projection not "
            "smaller than its hidden size: its state does not describe its weights"
        )
    gate = _GATES[mode] * hidden
    real_hidden = projection or hidden
    nested: list[list[str]] = []
    for layer in range(layers):
        for direction in range(directions):
            suffix = "_reverse" if direction else ""
            layer_inputs = inputs if layer == 0 else real_hidden * directions
            shapes = {f"weight_ih_l{layer}{suffix}": (gate, layer_inputs), f"weight_hh_l{layer}{suffix}": (gate, real_hidden)}
            if bias:
                shapes |= {f"bias_ih_l{layer}{suffix}": (gate,), f"bias_hh_l{layer}{suffix}": (gate,)}
            if projection:
                shapes[f"weight_hr_l{layer}{suffix}"] = (projection, hidden)
            for name, shape in shapes.items():
                weight = parameters.get(name)
                if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
                    raise Refused(
                        f"the file's RNN has {name} of shape {tuple(getattr(weight, 'shape', ())) or None}, where its "
                        f"own hyperparameters make it {shape}"
                    )
            nested.append(list(shapes))
    names = [name for group in nested for name in group]
    _check_names(state, nested, names, parameters)


def _check_names(state: dict, nested: list[list[str]], names: list[str], parameters: dict) -> None:
    """``_all_weights`` and ``_flat_weights_names`` name the weights in their order (an old file's
    ``_all_weights`` holds something else, and ``__setstate__`` then rebuilds them), and
    ``_flat_weights`` (what forward hands to the kernel) are those weights."""
    for key in ("_all_weights", "all_weights"):
        groups = state.get(key, nested)
        if type(groups) is not list or not groups or type(groups[0]) not in (list, tuple) or not groups[0]:
            raise Refused(f"the file gives an RNN's {key} as something other than lists of weight names")
        if isinstance(groups[0][0], str) and [list(g) if type(g) in (list, tuple) else g for g in groups] != nested:
            raise Refused(f"the file's RNN names other weights in {key} than its hyperparameters make")
    if not isinstance(state.get("_all_weights", state.get("all_weights"))[0][0], str):
        return  # rebuilt by RNNBase.__setstate__ from the checked hyperparameters
    if state.get("_flat_weights_names", names) != names:
        raise Refused("the file's RNN names other weights in _flat_weights_names than its hyperparameters make")
    flat = state.get("_flat_weights")
    if flat is not None and (type(flat) is not list or len(flat) != len(names)
                             or any(w is not parameters[n] for w, n in zip(flat, names))):
        raise Refused("the file's RNN hands its kernel other tensors (_flat_weights) than its parameters")
