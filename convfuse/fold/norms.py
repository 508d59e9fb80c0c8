"""What a BatchNorm layer computes at eval: its statistics, and what its forward does after them.

Plain BatchNorm layers (and subclasses that keep their base's forward) normalise and nothing
else. A subclass that overrides forward (e.g. timm's BatchNormAct2d: normalise, drop, activate)
is traced on its own with torch.fx; if its forward applies exactly one batch_norm to its input
with its own statistics, followed by a chain of its own submodules or known activations, the
statistics can be folded into the producer and the norm replaced by that chain.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormFold", "NormNotFoldable", "analyse_norm", "as_sequence", "as_step"]


@dataclass(frozen=True)
class NormFold:
    """A norm's eval-time statistics, and the module that replaces it once they are folded."""

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    remainder: nn.Module

    @property
    def normalises_only(self) -> bool:
        return isinstance(self.remainder, nn.Identity)


class NormNotFoldable(Exception):
    """The norm's forward does something convfuse cannot reduce to one BatchNorm; says what."""


def analyse_norm(norm: nn.Module, custom_forward: bool) -> NormFold:
    """The statistics of ``norm`` and what replaces it; raises NormNotFoldable with a reason."""
    if not custom_forward:
        return NormFold(
            running_mean=norm.running_mean,
            running_var=norm.running_var,
            eps=float(norm.eps),
            weight=getattr(norm, "weight", None),
            bias=getattr(norm, "bias", None),
            remainder=nn.Identity(),
        )
    graph = _trace_norm(norm)
    bn_node = _single_batch_norm(graph)
    bound = inspect.signature(F.batch_norm).bind(*bn_node.args, **bn_node.kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if arguments["input"] is not placeholders[0]:
        raise NormNotFoldable("batch_norm is not applied to the layer's input")
    if arguments["training"] is not False:
        raise NormNotFoldable("batch_norm uses batch statistics")
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = arguments[name]
        if value is None and name in ("weight", "bias"):
            continue  # a non-affine batch_norm, whatever the module holds
        if not (isinstance(value, fx.Node) and value.op == "get_attr" and value.target == name):
            raise NormNotFoldable(f"batch_norm's {name} is not the layer's own {name}")
    eps = arguments["eps"]
    if not isinstance(eps, (int, float)):
        raise NormNotFoldable("batch_norm's eps is computed in forward")
    return NormFold(
        running_mean=norm.running_mean,
        running_var=norm.running_var,
        eps=float(eps),
        weight=getattr(norm, "weight", None) if arguments["weight"] is not None else None,
        bias=getattr(norm, "bias", None) if arguments["bias"] is not None else None,
        remainder=_remainder(norm, graph, bn_node, placeholders[0]),
    )


class _NormTracer(fx.Tracer):
    """Traces one norm module's forward, keeping each of its submodules as a single node."""

    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace_norm(norm: nn.Module) -> fx.Graph:
    # _BatchNorm._check_input_dim branches on the input's rank, which fx cannot trace; it only
    # raises for a wrong rank, which the real model (verified later) would do as well.
    had_check = "_check_input_dim" in norm.__dict__
    if hasattr(norm, "_check_input_dim") and not had_check:
        norm.__dict__["_check_input_dim"] = lambda input: None
    try:
        return _NormTracer().trace(norm)
    except Exception as error:  # the forward is not traceable: nothing can be proven
        raise NormNotFoldable(f"its forward cannot be traced ({type(error).__name__})") from error
    finally:
        if not had_check:
            norm.__dict__.pop("_check_input_dim", None)


def _is_batch_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def _single_batch_norm(graph: fx.Graph) -> fx.Node:
    found = [node for node in graph.nodes if _is_batch_norm(node)]
    if len(found) != 1:
        raise NormNotFoldable(f"its forward applies {len(found)} batch_norm operations, not one")
    if found[0].target is not F.batch_norm:
        raise NormNotFoldable("its forward calls torch.batch_norm directly")
    return found[0]


_ASSERTS = (torch._assert, getattr(torch, "_assert_async", torch._assert))


def _module_for(fn: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module | None:
    """The activation module equivalent to a functional call, or None for an unknown function."""
    if fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
        return nn.Identity() if kwargs.get("training") is False else None
    table: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
        F.relu: (nn.ReLU, ("inplace",)),
        torch.relu: (nn.ReLU, ()),
        F.relu6: (nn.ReLU6, ("inplace",)),
        F.silu: (nn.SiLU, ("inplace",)),
        F.hardswish: (nn.Hardswish, ("inplace",)),
        F.hardsigmoid: (nn.Hardsigmoid, ("inplace",)),
        F.mish: (nn.Mish, ("inplace",)),
        F.gelu: (nn.GELU, ("approximate",)),
        F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")),
        F.elu: (nn.ELU, ("alpha", "inplace")),
        torch.sigmoid: (nn.Sigmoid, ()),
        F.sigmoid: (nn.Sigmoid, ()),
        torch.tanh: (nn.Tanh, ()),
        F.tanh: (nn.Tanh, ()),
    }
    if fn not in table:
        return None
    cls, allowed = table[fn]
    if set(kwargs) - set(allowed):
        return None
    return cls(**kwargs)


_METHODS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu_": lambda: nn.ReLU(inplace=True),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def as_step(owner: nn.Module, node: fx.Node) -> tuple[str, nn.Module] | None:
    """A one-input node of ``owner``'s graph as a (name, module) link of a chain: a submodule
    called on one argument, or a known activation function; None for anything else."""
    if node.op == "call_module":
        if node.kwargs or len(node.args) != 1:
            return None
        return node.target.replace(".", "_"), owner.get_submodule(node.target)
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
        return node.target.rstrip("_"), _METHODS[node.target]()
    if node.op == "call_function":
        fn = node.target
        try:
            bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            kwargs = dict(list(bound.arguments.items())[1:])
        except (TypeError, ValueError):  # builtins without a Python signature
            kwargs = {} if len(node.args) == 1 and not node.kwargs else {"?": None}
        if not any(isinstance(v, fx.Node) for v in kwargs.values()):
            module = _module_for(fn, kwargs)
            if module is not None:
                return getattr(fn, "__name__", "act"), module
    return None


def as_sequence(steps: list[tuple[str, nn.Module]]) -> nn.Module:
    """A chain of modules as one: Identity for none, else an nn.Sequential with readable names.
    nn.Identity links are dropped: they compute nothing and would only cost a call."""
    steps = [(name, module) for name, module in steps if type(module) is not nn.Identity]
    if not steps:
        return nn.Identity()
    names = [name for name, _ in steps]
    if len(set(names)) != len(names):
        steps = [(f"{i}_{name}", module) for i, (name, module) in enumerate(steps)]
    return nn.Sequential(OrderedDict(steps))


def _remainder(norm: nn.Module, graph: fx.Graph, bn_node: fx.Node, input_node: fx.Node) -> nn.Module:
    """What ``norm``'s forward does after its batch_norm, as Identity or a Sequential."""
    bn_node.replace_all_uses_with(input_node)
    graph.erase_node(bn_node)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _ASSERTS:
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # drop what only the asserts used
        if node.op not in ("placeholder", "output") and not node.users:
            graph.erase_node(node)
    steps: list[tuple[str, nn.Module]] = []
    current = input_node
    for node in graph.nodes:
        if node.op == "placeholder":
            if node is not input_node and node.users:
                raise NormNotFoldable("its forward uses more than one input")
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise NormNotFoldable("its output is not the end of a chain of layers")
            break
        if len(node.all_input_nodes) != 1 or node.args[:1] != (current,) or len(current.users) != 1:
            raise NormNotFoldable(f"its forward does more than a chain of layers after normalising ({node.name})")
        step = as_step(norm, node)
        if step is None:
            raise NormNotFoldable(f"its forward applies {node.format_node()} after normalising")
        steps.append(step)
        current = node
    return as_sequence(steps)
