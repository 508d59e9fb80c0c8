"""Candidate folds in an ExportedProgram's ATen graph, read-only: each norm (a batch-norm op, or a
FrozenBatchNorm2d's decomposed mul/add) with the conv/linear outputs it reads (directly, summed
or concatenated on the channels) or the conv/linear that reads it (norm first), described as a
``checks.Candidate`` for the shared table of checks.

``rewrite`` arguments are an ``aten_rewrite._Rewrite``: the working copy whose names,
stored tensors, mutations and preserved boundaries the description reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from convfuse.fold.checks import Candidate
from convfuse.fold.reasons import Combine, Reason, pair_kind
from convfuse.graphs.pairs import Decomposed, Feed, find_feed, match_frozen

__all__ = ["Norm", "Pair", "describe", "find_norms", "norm_after", "norm_first"]


def _ops(*names: str) -> frozenset[Any]:
    """The ATen overload packets of ``names`` that this torch build has."""
    return frozenset(p for p in (getattr(torch.ops.aten, name, None) for name in names) if p is not None)


CONVS = _ops("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
TRANSPOSED_CONVS = _ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
LINEARS = _ops("linear")
NORMS = _ops(
    "batch_norm",  # training IR (torch.export.export)
    "_native_batch_norm_legit_no_training",  # inference IR (run_decompositions)
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "native_batch_norm",
    "cudnn_batch_norm",
    "miopen_batch_norm",
)
_ADDS, _SUBS, _MULS = _ops("add"), _ops("sub"), _ops("mul")
_RSQRTS, _RESHAPES, _CATS = _ops("rsqrt"), _ops("reshape", "view", "_unsafe_view"), _ops("cat", "concat")


def packet(node: Any) -> Any:
    is_op = isinstance(node, fx.Node) and node.op == "call_function"
    return node.target.overloadpacket if is_op and isinstance(node.target, torch._ops.OpOverload) else None


def is_norm_op(node: fx.Node) -> bool:
    return packet(node) in NORMS


def is_producer(node: Any) -> bool:
    return packet(node) in CONVS | TRANSPOSED_CONVS | LINEARS


def arguments(node: fx.Node) -> dict[str, Any]:
    """An ATen node's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args) and not argument.kwarg_only:
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def stack(node: fx.Node) -> tuple[str, str] | None:
    """The innermost module that ran ``node``: (its path from the root, its class name)."""
    where = node.meta.get("nn_module_stack")
    if not where:
        return None
    path, cls = list(where.values())[-1]
    path = str(path).removeprefix("L['self'].").removeprefix("L['self']")
    name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, name


class _View:
    """``pairs.GraphView`` of an ATen graph."""

    def __init__(self, rewrite: Any) -> None:
        self.rewrite = rewrite

    def op(self, node: Any) -> str | None:
        kind = packet(node)
        if kind is None:
            return None
        if kind in CONVS | TRANSPOSED_CONVS | LINEARS:
            return "producer"
        if kind in _CATS:
            return "cat"
        if kind in _MULS and len(node.args) == 2 and not node.kwargs:
            return "mul"
        if kind in _ADDS | _SUBS and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            return "add" if kind in _ADDS else "sub"
        if kind in _RSQRTS:
            return "rsqrt"
        if kind in _RESHAPES and list(node.args[1:2]) == [[1, -1, 1, 1]]:
            return "reshape"
        return None

    def operands(self, node: Any) -> list[Any]:
        if self.op(node) == "cat":
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            return list(parts) if isinstance(parts, (list, tuple)) else []
        return list(node.args[:2]) if self.op(node) in ("add", "sub", "mul") else list(node.args[:1])

    def users(self, node: Any) -> int:
        if not isinstance(node, fx.Node):
            return 0
        return len(node.users) + (node.name in self.rewrite.boundaries)

    def scalar(self, value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def stored(self, node: Any) -> bool:
        return self.rewrite.tensor(node) is not None

    def cat_dim(self, node: Any) -> Any:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def key(self, node: Any) -> Any:
        return node

    def tensor(self, node: Any) -> Any:
        return self.rewrite.tensor(node)


@dataclass
class Norm:
    """A normalisation in the graph: what it reads and the node(s) carrying its output."""

    node: fx.Node  # the batch-norm op, or the decomposition's final addition
    input: Any
    stats: dict[str, Any]  # running_mean, running_var, weight, bias: input nodes or None
    eps: Any
    training: Any
    name: str
    decomposed: Decomposed | None = None

    def outputs(self) -> list[fx.Node] | None:
        """The nodes that carry the normalised tensor; None where another output is read."""
        if self.decomposed is not None or len(self.node.target._schema.returns) == 1:
            return [self.node]
        outputs = []
        for user in self.node.users:
            if user.op != "call_function" or user.target is not operator.getitem:
                return None
            if user.args[1] == 0:
                outputs.append(user)
            elif user.users:  # the saved mean or inverse std is read
                return None
        return outputs


@dataclass
class Pair:
    """A candidate fold: a norm and the producers it folds into."""

    norm: Norm
    producers: list[fx.Node]
    combine: str
    first: bool  # norm first: producers[0] reads the norm's output
    between: list[Any]
    output: Any  # what replaces the norm's output: the feed's value (norm after), or None
    dim: Any = None
    names: list[str] = field(default_factory=list)
    kind: str = ""

    @property
    def producer(self) -> str:
        return (", " if self.combine == Combine.CAT else " + ").join(self.names)


def find_norms(rewrite: Any) -> list[Norm]:
    """Every batch-norm op and decomposed FrozenBatchNorm2d of the top graph, in graph order."""
    view = _View(rewrite)
    found = []
    for node in rewrite.graph.nodes:
        if is_norm_op(node):
            args = arguments(node)
            stats = {k: args.get(k) for k in ("running_mean", "running_var", "weight", "bias")}
            norm = Norm(node, args["input"], stats, args.get("eps", args.get("epsilon")), args.get("training", False), "")
        else:
            decomposed = match_frozen(view, node) if view.op(node) == "add" else None
            if decomposed is None:
                continue
            stats = {k: getattr(decomposed, k) for k in ("running_mean", "running_var", "weight", "bias")}
            norm = Norm(node, decomposed.input, stats, decomposed.eps, False, "", decomposed)
        norm.name = _norm_name(rewrite, norm)
        found.append(norm)
    return found


def count_norms(graph: fx.Graph, rewrite: Any = None) -> int:
    view = _View(rewrite) if rewrite is not None else None
    total = 0
    for node in graph.nodes:
        frozen = view is not None and view.op(node) == "add" and match_frozen(view, node) is not None
        total += is_norm_op(node) or frozen
    return total


def norm_after(rewrite: Any, norm: Norm) -> Pair | str:
    """The pair of ``norm`` and the producers whose outputs it reads, or the ``Reason`` there is none."""
    feed = find_feed(_View(rewrite), norm.input)
    if isinstance(feed, str):
        return feed
    return _pair(rewrite, norm, feed)


def _pair(rewrite: Any, norm: Norm, feed: Feed) -> Pair:
    names = [_producer_name(rewrite, p) for p in feed.producers]
    pair = Pair(norm, feed.producers, feed.combine, False, feed.between, feed.output, feed.dim, names)
    pair.kind = _kind(pair, [stack(p) for p in feed.producers], names)
    return pair


def norm_first(rewrite: Any, norm: Norm) -> Pair | str | None:
    """The pair of ``norm`` and the conv/linear reading its output, a ``Reason`` where that layer
    cannot absorb it, or None where no layer reads it."""
    outputs = norm.outputs()
    if not outputs or len(outputs) != 1:
        return None
    users = list(outputs[0].users)
    consumer = users[0] if users else None
    if consumer is None or not is_producer(consumer) or arguments(consumer)["input"] is not outputs[0]:
        return None
    names = [_producer_name(rewrite, consumer)]
    pair = Pair(norm, [consumer], Combine.DIRECT, True, [outputs[0]], None, None, names)
    pair.kind = _kind(pair, [stack(consumer)], names)
    return pair


def transposed(node: fx.Node) -> Any:
    return arguments(node).get("transposed", packet(node) in TRANSPOSED_CONVS)


def groups(node: fx.Node) -> Any:
    return arguments(node).get("groups", 1)


def describe(rewrite: Any, pair: Pair) -> Candidate:
    """``pair`` as the graph-neutral ``Candidate`` that ``convfuse.fold.checks`` judges."""
    norm, view = pair.norm, _View(rewrite)
    flags: dict[str, bool] = {}
    weights = []
    for producer in pair.producers:
        args = arguments(producer)
        weights += [args["weight"], *([args["bias"]] if args.get("bias") is not None else [])]
        for node in (args["weight"], args.get("bias")):
            reason = _weight_use_reason(rewrite, node, producer) if isinstance(node, fx.Node) else None
            if reason is not None:
                flags[reason] = True
    stats = [norm.stats["running_mean"], norm.stats["running_var"]]
    optional = [n for n in (norm.stats["weight"], norm.stats["bias"]) if n is not None]
    tensors = [rewrite.tensor(n) for n in (*weights, *stats, *optional)]
    stored = all(t is not None for t in tensors) and all(s is not None for s in stats)
    floating = [t for t in tensors if isinstance(t, Tensor)]
    outputs = norm.outputs()
    if pair.first:
        users = view.users(pair.between[0])
    else:
        users = max(view.users(node) for node in pair.between)
    hyper = isinstance(norm.eps, (int, float)) and all(
        isinstance(groups(p), int) and isinstance(transposed(p), bool) for p in pair.producers
    )
    channels, ranks = [], []
    for producer in pair.producers:
        weight = rewrite.tensor(arguments(producer)["weight"])
        if weight is None or not hyper:
            continue
        linear = packet(producer) in LINEARS
        ranks.append(2 if linear else weight.dim())
        if pair.first:
            channels.append(weight.shape[1] * (1 if linear else groups(producer)))
        else:
            channels.append(weight.shape[1] * groups(producer) if transposed(producer) else weight.shape[0])
    value = norm.input.meta.get("val") if isinstance(norm.input, fx.Node) else None
    rank = value.dim() if isinstance(value, Tensor) else None
    mean = rewrite.tensor(stats[0]) if stats[0] is not None else None
    return Candidate(
        combine=pair.combine,
        norm_first=pair.first,
        linear=packet(pair.producers[0]) in LINEARS,
        users=users,
        norm_outputs_read=outputs is None,
        called_twice=flags.get(Reason.CALLED_TWICE, False),
        shared_parameter=flags.get(Reason.SHARED_PARAMETER, False),
        direct_access=flags.get(Reason.DIRECT_ACCESS, False),
        # without running statistics BatchNorm's forward passes training=True: that reason first
        training=all(s is not None for s in stats)
        and (norm.training is not False or any(rewrite.target(s) in rewrite.mutated for s in stats)),
        running_stats=all(s is not None for s in stats),
        stored=stored,
        hyperparameters_known=hyper,
        floating=all(t.is_floating_point() for t in floating),
        devices=len({t.device for t in floating}),
        producer_channels=tuple(channels),
        producer_ranks=tuple(ranks),
        norm_channels=mean.numel() if mean is not None else None,
        input_ranks=(rank,) if rank is not None else None,
        cat_axes=(pair.dim % rank,) if rank and isinstance(pair.dim, int) else None,
        cat_dim=pair.dim if isinstance(pair.dim, int) else None,
        zero_padded=pair.first and _zero_padded(rewrite, pair.producers[0]),
        transposed_after=pair.first and hyper and transposed(pair.producers[0]) is True,
    )


def _zero_padded(rewrite: Any, conv: fx.Node) -> bool:
    """Whether the conv adds zeros around its input (its own padding; other modes are ops before it)."""
    if packet(conv) in LINEARS:
        return False
    padding = arguments(conv).get("padding")
    if isinstance(padding, str):
        weight = rewrite.tensor(arguments(conv)["weight"])
        return padding != "valid" and (weight is None or any(k > 1 for k in weight.shape[2:]))
    return not isinstance(padding, (list, tuple)) or any(p != 0 for p in padding)


def _weight_use_reason(rewrite: Any, node: fx.Node, conv: fx.Node) -> str | None:
    """Why the conv's weight/bias input ``node`` must keep its value: something else reads it."""
    others = [u for u in node.users if u is not conv]
    if not others:
        return Reason.SHARED_PARAMETER if rewrite.aliased(node) else None
    if not all(is_producer(u) for u in others):
        return Reason.DIRECT_ACCESS
    here = stack(conv)
    if here is not None and all((stack(u) or ("",))[0] == here[0] for u in others):
        return Reason.CALLED_TWICE
    return Reason.SHARED_PARAMETER


def _norm_name(rewrite: Any, norm: Norm) -> str:
    """The norm's module path, from its statistics' names (``layer1.0.bn1.running_mean``), else the
    module that ran it, else the node's name."""
    for key in ("running_mean", "weight", "running_var", "bias"):
        owner = rewrite.owner(norm.stats.get(key))
        if owner:
            return owner
    where = stack(norm.node)
    return where[0] if where and where[0] else norm.node.name


def _producer_name(rewrite: Any, conv: fx.Node) -> str:
    owner = rewrite.owner(arguments(conv).get("weight"))
    if owner:
        return owner
    where = stack(conv)
    return where[0] if where and where[0] else conv.name


def _kind(pair: Pair, where: list[tuple[str, str] | None], names: list[str]) -> str:
    """``Conv2d+BatchNorm2d`` (as the fx path writes it) where every op ran in those modules' own
    forward, else the op names."""
    norm_where = stack(pair.norm.node)
    if norm_where and norm_where[0] == pair.norm.name and all(w and w[0] == n for w, n in zip(where, names)):
        classes, norm_class = [w[1] for w in where if w], norm_where[1]
    else:
        classes = [p.target.overloadpacket.__name__ for p in pair.producers]
        norm_class = "batch_norm" if pair.norm.decomposed is None else "frozen_batch_norm"
    return pair_kind(classes, norm_class, pair.combine, pair.first)
