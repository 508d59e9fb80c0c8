"""torch.fx graphs of a model: the whole model where it traces, its largest traceable parts where not."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from convfuse.errors import first_line
from convfuse.graphs.untraced import CodeUse, Reader

__all__ = ["TracedGraph", "Tracing", "Untraced", "trace_model"]


@dataclass(frozen=True)
class TracedGraph:
    """The graph of one module's forward; node targets are relative to ``prefix``."""

    prefix: str
    root: nn.Module
    graph: fx.Graph

    def qualified(self, target: str) -> str:
        """The name, from the model's root, of a ``call_module``/``get_attr`` target."""
        return f"{self.prefix}.{target}" if self.prefix else target


@dataclass(frozen=True)
class Untraced:
    """A module whose own forward torch.fx could not trace: pairs inside it are found in its children."""

    module: str
    reason: str


@dataclass(frozen=True)
class Tracing:
    graphs: list[TracedGraph]
    untraced: list[Untraced]
    uses: CodeUse | None = None
    """What the untraced forwards do with the modules below them (read from their code)."""


class _Tracer(fx.Tracer):
    """An fx tracer that keeps ``keep`` modules (and any named in ``opaque``) as call_module
    leaves, and remembers the innermost module whose forward raised."""

    def __init__(self, keep: Callable[[nn.Module], bool], opaque: set[str]) -> None:
        super().__init__()
        # Reads of buffers (running_mean, ...) become get_attr nodes, not baked-in constants,
        # so that a forward reading a BatchNorm's statistics directly is seen.
        self.proxy_buffer_attributes = True
        self._keep = keep
        self._opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            self._keep(m)
            or module_qualified_name in self._opaque
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the exception first
                self.failed_in = self.path_of_module(m)
            raise


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error, 200)}"


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def trace_model(model: nn.Module, keep: Callable[[nn.Module], bool]) -> Tracing:
    """Trace ``model`` with torch.fx, falling back to its parts where the whole does not trace.

    Modules for which ``keep(module)`` is true stay single ``call_module`` nodes. When a
    child's forward fails to trace inside its parent, the child becomes a leaf of the parent's
    graph and is traced on its own; when a module's own forward fails, its code is read
    (``convfuse.graphs.untraced``) and each of its children is traced on its own. An ``nn.Sequential``
    whose elements that code calls one by one (``for m in self.model: x = m(x)``) is not one part:
    its elements are. Never raises for a tracing failure: the module and the reason are
    returned in ``Tracing.untraced``.
    """
    state = _State(keep, [], [], Reader(model))
    with _attributes_restored(model):
        _trace_part(model, "", state)
    return Tracing(state.graphs, state.untraced, state.reader.uses)


@dataclass
class _State:
    keep: Callable[[nn.Module], bool]
    graphs: list[TracedGraph]
    untraced: list[Untraced]
    reader: Reader


@contextmanager
def _attributes_restored(model: nn.Module) -> Iterator[None]:
    """Put every module's attributes back after tracing: forward code that caches values on
    the module (torchvision's MultiScaleRoIAlign keeps its scales) would otherwise keep proxies."""
    saved = []
    for module in {id(m): m for m in model.modules()}.values():
        state = {key: copy.copy(value) if type(value) in (list, dict, set) else value
                 for key, value in module.__dict__.items()}
        saved.append((module, state))
    try:
        yield
    finally:
        for module, state in saved:
            module.__dict__.clear()
            module.__dict__.update(state)


def _trace_part(module: nn.Module, prefix: str, state: _State) -> None:
    if state.keep(module) or not _has_forward(module):
        # A leaf layer needs no graph; a container without forward (ModuleList) holds parts.
        if not state.keep(module):
            _trace_children(module, prefix, state)
        return
    opaque: set[str] = set()
    while True:
        tracer = _Tracer(state.keep, opaque)
        try:
            graph = tracer.trace(module)
            break
        except Exception as error:  # any failure only limits what is found
            failed = tracer.failed_in
            if failed is None or failed in opaque or failed == "":
                state.untraced.append(Untraced(prefix or "(model)", _describe(error)))
                state.reader.read_forward(prefix)
                _trace_children(module, prefix, state)
                return
            opaque.add(failed)
    state.graphs.append(TracedGraph(prefix, module, graph))
    for name in sorted(opaque):
        _trace_part(module.get_submodule(name), _join(prefix, name), state)


def _trace_children(module: nn.Module, prefix: str, state: _State) -> None:
    """Trace each child of a module whose forward is not traced, or which has none."""
    for name, child in module.named_children():
        path = _join(prefix, name)
        if isinstance(child, nn.Sequential) and state.reader.uses.calls_below(path):
            # Code outside it takes its elements one by one: they are what runs, so they are the
            # parts. Where that code also calls it whole, its forward is code outside them too.
            if state.reader.uses.called(path):
                state.reader.read_forward(path)
            _trace_children(child, path, state)
        else:
            _trace_part(child, path, state)
