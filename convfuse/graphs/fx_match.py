"""Finding folds in fx graphs by data flow: which conv/linear outputs each BatchNorm reads.

For each norm node: the producer feeding it directly, through a sum or a channel concat of
several producers, or through reshapes; else the conv/linear it feeds (norm first). Read-only:
the result is ``Match`` records for ``fx_pairs.skip_reason`` to judge, and a reason for each
norm that has no candidate at all.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from convfuse.fold.reasons import Combine, Reason, Skipped, pair_kind
from convfuse.fold.table import Pattern, find_pattern, is_norm, is_producer, own_hooks
from convfuse.graphs.fx_pairs import Match
from convfuse.graphs.tracing import TracedGraph

__all__ = ["find_matches", "is_add", "real_users", "sum_terms", "through_identities"]

_ADDS = (operator.add, operator.iadd, torch.add)
_CATS = (torch.cat, torch.concat, torch.concatenate)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "contiguous")
_RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten)


@dataclass(frozen=True)
class _Feed:
    """How a value is made from producer outputs."""

    combine: str
    producers: list[fx.Node]
    between: list[fx.Node]  # every node from the producers up to the value, producers included
    dim: int | None = None


def find_matches(
    graphs: list[TracedGraph], model: nn.Module, untraced: Sequence[str] = ()
) -> tuple[list[Match], list[Skipped]]:
    """Every candidate fold in ``graphs``, and a reason for each norm node that has none.

    A norm may get two candidates (what feeds it, and the layer after it); the first is
    preferred. ``untraced``: the modules whose own forward could not be traced; a part below
    one of them is called by code fx never saw. Norms that appear in no graph are the caller's to explain (untraced or never
    called), since it knows whether the model ran.
    """
    matches: list[Match] = []
    skipped: list[Skipped] = []
    for traced in graphs:
        modules = dict(traced.root.named_modules(remove_duplicate=False))
        unseen = bool(traced.prefix) and any(
            name == "(model)" or traced.prefix.startswith(name + ".") for name in untraced
        )
        for node in traced.graph.nodes:
            if node.op == "call_module" and is_norm(modules[node.target]):
                found, (reason, producer) = _candidates(traced, modules, node)
                matches.extend(dataclasses.replace(m, graph=traced.prefix, unseen_callers=unseen) for m in found)
                if not found:
                    skipped.append(Skipped(traced.qualified(node.target), producer, reason))
    return matches, skipped


def _module(modules: dict[str, nn.Module], node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return modules[node.target]
    return None


def _is_producer_node(modules: dict[str, nn.Module], node: object) -> bool:
    module = _module(modules, node)
    return module is not None and is_producer(module)


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS


# torch's own no-op layers, by the forward that makes them one (a subclass that replaces it is not)
_NO_OP_FORWARDS = {
    nn.Identity.forward: False,  # the value: whether the module is a no-op only at eval
    **{cls.forward: True for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                     nn.FeatureAlphaDropout)},
}


def _no_op(module: nn.Module | None, *, hooked: bool = False) -> bool:
    """A module that passes its input through at eval: nn.Identity, a dropout in eval mode, with
    torch's own forward. ``hooked``: also one with hooks of its own (the caller must then judge
    those hooks: they see the value passed through)."""
    if module is None or type(module).__call__ is not nn.Module.__call__:
        return False
    eval_only = _NO_OP_FORWARDS.get(type(module).forward)
    if eval_only is None or (eval_only and module.training):
        return False
    return hooked or not own_hooks(module)


def through_identities(
    modules: dict[str, nn.Module], value: object, between: list[fx.Node], *, hooked: bool = False
) -> object:
    """``value`` with the no-op modules in front of it (nn.Identity, dropout in eval mode) skipped;
    they are added to ``between``. They stay in the model: they still pass values through. One
    with hooks stops the walk (its hooks see the value), unless ``hooked``."""
    while (
        isinstance(value, fx.Node)
        and _no_op(_module(modules, value), hooked=hooked)
        and len(value.args) == 1
        and not value.kwargs
    ):
        between.append(value)
        value = value.args[0]
    return value


def sum_terms(
    modules: dict[str, nn.Module], node: fx.Node, between: list[fx.Node], *, hooked: bool = False
) -> list[object]:
    """The terms of a tree of additions, in order, through nn.Identity calls and without literal
    zeros (``out = 0; out += conv(x)``); the inner nodes are added to ``between``."""
    terms: list[object] = []
    for arg in node.args:
        arg = through_identities(modules, arg, between, hooked=hooked)
        if isinstance(arg, fx.Node) and is_add(arg):
            between.append(arg)
            terms.extend(sum_terms(modules, arg, between, hooked=hooked))
        elif not (isinstance(arg, (int, float)) and not isinstance(arg, bool) and arg == 0):
            terms.append(arg)
    return terms


def _feed(modules: dict[str, nn.Module], value: object) -> _Feed | str:
    """How ``value`` (a norm's input) is made from producer outputs, or why it is not. No-op
    modules with hooks are walked through; the match then names them (``Match.crossed``)."""
    passed: list[fx.Node] = []
    value = through_identities(modules, value, passed, hooked=True)
    if not isinstance(value, fx.Node):
        return Reason.NO_PRODUCER
    if _is_producer_node(modules, value):
        return _Feed(Combine.DIRECT, [value], [value, *passed])
    if is_add(value):
        between: list[fx.Node] = [value, *passed]
        terms = sum_terms(modules, value, between, hooked=True)
        if not all(_is_producer_node(modules, t) for t in terms) or len(set(terms)) != len(terms):
            return Reason.SUM_TERMS
        return _Feed(Combine.SUM, terms, between + terms)  # type: ignore[arg-type]
    if value.op == "call_function" and value.target in _CATS:
        parts = value.args[0] if value.args else value.kwargs.get("tensors")
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return Reason.CAT_TERMS
        parts = [through_identities(modules, part, passed, hooked=True) for part in parts]
        if not all(_is_producer_node(modules, p) for p in parts) or len(set(parts)) != len(parts):
            return Reason.CAT_TERMS
        return _Feed(Combine.CAT, list(parts), [value, *passed, *parts], dim)
    if _is_reshape(value):
        chain = [value]
        source = value.args[0] if value.args else None
        while isinstance(source, fx.Node) and _is_reshape(source):
            chain.append(source)
            source = source.args[0] if source.args else None
        source = through_identities(modules, source, passed, hooked=True)
        if _is_producer_node(modules, source):
            assert isinstance(source, fx.Node)
            return _Feed(Combine.RESHAPE, [source], [*chain, *passed, source])
    return Reason.NO_PRODUCER


_METADATA_METHODS = ("size", "dim")
_METADATA_ATTRIBUTES = ("shape", "ndim", "dtype", "device")
_SHAPE_SOURCE_METHODS = ("reshape_as", "view_as", "expand_as")
_SHAPE_SOURCE_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.empty_like)


def real_users(node: fx.Node) -> int:
    """Users of ``node`` that read its values, not just its shape or dtype (``x.shape``,
    ``x.size()``, ``y.reshape_as(x)``, ``torch.zeros_like(x)``)."""
    count = 0
    for user in node.users:
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        if user.op == "call_method" and user.target in _SHAPE_SOURCE_METHODS and user.args[:1] != (node,):
            continue
        if user.op == "call_function" and user.target is getattr and user.args[1:2] and user.args[1] in _METADATA_ATTRIBUTES:
            continue
        if user.op == "call_function" and user.target in _SHAPE_SOURCE_FUNCTIONS:
            continue
        count += 1
    return count


def _crossed(traced: TracedGraph, nodes: list[fx.Node], pair: set[str]) -> tuple[str, ...]:
    """The modules whose boundary the values from the producers to the norm cross: those that
    hold some of ``nodes`` but not all (a block returning a conv's output to a parent's norm),
    and the no-op modules between. Their hooks see the values a fold changes."""
    stacks = []
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = {value[0] if isinstance(value, tuple) else key for key, value in stack.items()}
        stacks.append({traced.qualified(path) for path in paths if isinstance(path, str)})
    if not stacks:
        return ()
    crossed = set.union(*stacks) - set.intersection(*stacks) - pair
    return tuple(sorted(crossed))


def _candidates(
    traced: TracedGraph, modules: dict[str, nn.Module], norm_node: fx.Node
) -> tuple[list[Match], tuple[str, str | None]]:
    norm = modules[norm_node.target]
    norm_name = traced.qualified(norm_node.target)
    extra = len(norm_node.args) != 1 or bool(norm_node.kwargs)
    found: list[Match] = []
    reason: tuple[str, str | None] = (Reason.NO_PRODUCER, None)

    feed = _feed(modules, norm_node.args[0] if norm_node.args else None)
    if isinstance(feed, str):
        reason = (feed, None)
    else:
        layers = [modules[node.target] for node in feed.producers]
        names = tuple(traced.qualified(node.target) for node in feed.producers)
        reshaped = feed.combine == Combine.RESHAPE
        patterns = [find_pattern(layer, norm, reshaped=reshaped) for layer in layers]
        if any(p is None for p in patterns):
            reason = (Reason.UNSUPPORTED_PAIR, ", ".join(names))
        else:
            found.append(Match(
                producers=names,
                patterns=tuple(p for p in patterns if p is not None),
                norm=norm_name,
                kind=pair_kind([type(p).__name__ for p in layers], type(norm).__name__, feed.combine, False),
                users=max(real_users(node) for node in feed.between),
                extra_arguments=extra,
                combine=feed.combine,
                dim=feed.dim,
                crossed=_crossed(traced, [*feed.between, norm_node], {*names, norm_name}),
            ))

    users = list(norm_node.users)
    consumer = _module(modules, users[0]) if users else None
    if consumer is not None and is_producer(consumer) and users[0].args[:1] == (norm_node,):
        consumer_name = traced.qualified(users[0].target)
        pattern: Pattern | None = find_pattern(norm, consumer)
        if pattern is not None:
            found.append(Match(
                producers=(consumer_name,),
                patterns=(pattern,),
                norm=norm_name,
                kind=pair_kind([type(consumer).__name__], type(norm).__name__, Combine.DIRECT, True),
                users=len(users),
                extra_arguments=extra,
                crossed=_crossed(traced, [norm_node, users[0]], {consumer_name, norm_name}),
            ))
        elif not found and isinstance(consumer, _ConvTransposeNd):
            reason = (Reason.TRANSPOSED_AFTER, consumer_name)
        elif not found and reason[0] == Reason.NO_PRODUCER:
            reason = (Reason.UNSUPPORTED_PAIR, consumer_name)
    return found, reason
