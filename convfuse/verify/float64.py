"""Running a model in float64 without a second copy of it: each module's parameters and buffers
are converted while it runs (or, where a forward reads another module's tensors, all at once),
and put back exactly after. With ``Remainders``, folded parameters are rebuilt at float64
precision (their value plus the rounding remainder kept at fold time): the float64 proof."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from convfuse.errors import first_line
from convfuse.inputs import Batch, map_tensors
from convfuse.verify.remainders import Remainders
from convfuse.verify.running import call, reserve_hook_ids

__all__ = ["float64_outputs", "float64_while_running", "in_float64", "to_float64"]


def _widened(param: Tensor, remainders: Remainders | None) -> Tensor:
    return remainders.exact(param) if remainders is not None else param.data.double()


@contextmanager
def in_float64(model: nn.Module, remainders: Remainders | None = None) -> Iterator[None]:
    """Convert every floating parameter and buffer to float64 in place; restore exactly after.

    float32/float16/bfloat16 -> float64 -> back is lossless, so the model ends bit-identical,
    with the same Parameter objects; it is never held twice. A parameter rebuilt from its
    remainder keeps its own data aside, to be put back as it was.
    """
    params: dict[int, tuple[nn.Parameter, torch.dtype, Tensor | None]] = {}
    buffers: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            for param in module._parameters.values():
                if param is not None and param.is_floating_point() and id(param) not in params:
                    rebuilt = remainders is not None and param in remainders
                    params[id(param)] = (param, param.dtype, param.data if rebuilt else None)
                    param.data = _widened(param, remainders)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    buffers.append((module, name, buffer))
                    module._buffers[name] = buffer.double()
        yield
    finally:
        for param, dtype, data in params.values():
            param.data = data if data is not None else param.data.to(dtype)
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def to_float64(batch: Batch) -> Batch:
    def convert(value: Tensor) -> Tensor:
        return value.double() if value.is_floating_point() else value

    return map_tensors(batch[0], convert), map_tensors(batch[1], convert)


def float64_outputs(
    module: nn.Module, batches: list[Batch], remainders: Remainders | None = None
) -> tuple[list[Any] | None, str | None]:
    """The module's outputs in float64: converting each submodule just while it runs (little
    extra memory), else, where a forward reads another module's tensors, all at once. (None,
    why) where neither runs (e.g. an op without a float64 kernel on this device)."""
    problem = None
    for convert in (float64_while_running, in_float64):
        try:
            with convert(module, remainders):
                return [call(module, to_float64(b)) for b in batches], None
        except Exception as error:  # e.g. an op without a float64 kernel on this device
            problem = f"the float64 run raised {type(error).__name__}: {first_line(error)}"
    return None, problem


@contextmanager
def float64_while_running(model: nn.Module, remainders: Remainders | None = None) -> Iterator[None]:
    """Give each module float64 parameters and buffers from the start to the end of its forward.

    Peak extra memory is what the modules on the call stack hold directly, not the model. A
    tensor shared by several modules is converted once while any of them runs (counted).
    Raises (and restores everything) where a forward uses a tensor of a module that is not
    running, which is then still in its own dtype.
    """
    counts: dict[int, int] = {}
    originals: dict[int, Tensor] = {}
    saved_buffers: dict[tuple[int, str], Tensor] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        for param in module._parameters.values():
            if param is not None and param.is_floating_point():
                if counts.get(id(param), 0) == 0:
                    originals[id(param)] = param.data
                    param.data = _widened(param, remainders)
                counts[id(param)] = counts.get(id(param), 0) + 1
        for name, buffer in module._buffers.items():
            key = (id(module), name)
            if buffer is not None and buffer.is_floating_point() and key not in saved_buffers:
                saved_buffers[key] = buffer
                module._buffers[name] = buffer.double()

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        for param in module._parameters.values():
            if param is not None and id(param) in counts:
                counts[id(param)] -= 1
                if counts[id(param)] == 0:
                    param.data = originals.pop(id(param))
        for name in module._buffers:
            key = (id(module), name)
            if key in saved_buffers:
                module._buffers[name] = saved_buffers.pop(key)

    params = {id(p): p for p in model.parameters()}
    modules = {id(m): m for m in model.modules()}.values()
    handles = []
    reserve_hook_ids(model)
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for pid, data in originals.items():
            params[pid].data = data
        for module in modules:
            for name in list(module._buffers):
                key = (id(module), name)
                if key in saved_buffers:
                    module._buffers[name] = saved_buffers.pop(key)
