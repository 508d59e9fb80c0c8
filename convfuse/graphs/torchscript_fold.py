"""The BatchNorm fold on a frozen TorchScript graph: each norm (``aten::batch_norm``, or a
FrozenBatchNorm2d's decomposed mul/add) with the conv/linear outputs it reads (directly, summed or
concatenated on the channels) or the conv/linear reading it (norm first), described as a
``checks.Candidate`` for the shared table of checks, and folded into new weight constants at
that call site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from convfuse.fold.arithmetic import fold_weights
from convfuse.fold.checks import Candidate
from convfuse.fold.reasons import Combine, Skipped, pair_kind
from convfuse.graphs.pairs import Decomposed, find_feed, fold_norms, match_affine, match_frozen
from convfuse.report import FusedPair

__all__ = ["NORM", "PRODUCERS", "fold_graph", "nodes"]

_CONVS = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution", "aten::convolution"}
_TRANSPOSED_CONVS = {"aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d"}
_LINEAR = "aten::linear"
PRODUCERS = _CONVS | _TRANSPOSED_CONVS | {_LINEAR}
NORM = "aten::batch_norm"
_SHAPE_ONLY = {"aten::dim", "aten::size", "prim::shape"}
"""Uses of a value that read only its shape, which folding does not change (BatchNorm's own
input-rank check)."""

_MISSING = object()


def nodes(block: Any) -> Iterator[Any]:
    """Every node of ``block`` and of the blocks nested in it (if/loop bodies)."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from nodes(inner)


def constant(value: Any) -> Any:
    """The value of a graph constant, or _MISSING where it is computed."""
    if value.node().kind() != "prim::Constant":
        return _MISSING
    return value.toIValue()


class _View:
    """``pairs.GraphView`` of a frozen TorchScript graph."""

    def op(self, value: Any) -> str | None:
        kind = value.node().kind()
        inputs = list(value.node().inputs())
        if kind in PRODUCERS:
            return "producer"
        if kind in ("aten::add", "aten::sub") and len(inputs) == 3 and constant(inputs[2]) == 1:
            return "add" if kind == "aten::add" else "sub"
        if kind == "aten::mul" and len(inputs) == 2:
            return "mul"
        if kind == "aten::rsqrt":
            return "rsqrt"
        if kind in ("aten::reshape", "aten::view") and len(inputs) == 2 and constant(inputs[1]) == [1, -1, 1, 1]:
            return "reshape"
        if kind == "aten::cat" and inputs[0].node().kind() == "prim::ListConstruct":
            return "cat"
        return None

    def operands(self, value: Any) -> list[Any]:
        inputs = list(value.node().inputs())
        kind = self.op(value)
        if kind == "cat":
            return list(inputs[0].node().inputs())
        return inputs[:2] if kind in ("add", "sub", "mul") else inputs[:1]

    def users(self, value: Any) -> int:
        return sum(1 for use in value.uses() if use.user.kind() not in _SHAPE_ONLY)

    def scalar(self, value: Any) -> float | None:
        number = constant(value)
        return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None

    def stored(self, value: Any) -> bool:
        return isinstance(constant(value), Tensor)

    def cat_dim(self, value: Any) -> Any:
        dim = constant(list(value.node().inputs())[1])
        return dim if isinstance(dim, int) else None

    def key(self, value: Any) -> Any:
        return value.unique()

    def tensor(self, value: Any) -> Any:
        stored = constant(value)
        return stored if isinstance(stored, Tensor) else None


@dataclass
class _Norm:
    output: Any  # the value carrying the normalised tensor
    input: Any
    stats: tuple[Any, Any, Any, Any]  # running_mean, running_var, weight, bias values
    eps: Any
    training: Any
    name: str
    cls: str | None
    decomposed: Decomposed | None = None


@dataclass
class _Pair:
    norm: _Norm
    producers: list[Any]  # producer nodes
    combine: str
    first: bool
    between: list[Any]  # values
    output: Any  # the value replacing the norm's output (norm after)
    dim: Any
    names: list[str]
    classes: list[str | None]

    @property
    def producer(self) -> str:
        return (", " if self.combine == Combine.CAT else " + ").join(self.names)

    @property
    def kind(self) -> str:
        if all(self.classes) and self.norm.cls:
            return pair_kind([str(c) for c in self.classes], self.norm.cls, self.combine, self.first)
        classes = [p.kind().removeprefix("aten::") for p in self.producers]
        norm = "batch_norm" if self.norm.decomposed is None else "frozen_batch_norm"
        return pair_kind(classes, norm, self.combine, self.first)


def fold_graph(
    graph: Any, ranks: dict[Any, int], module_of: Callable[[Any, Any], tuple[str, str | None]]
) -> tuple[list[FusedPair], list[Skipped]]:
    """Fold every norm that passes the checks; ``ranks``: the rank of node outputs seen in a run;
    ``module_of(node, stored)``: the module path and class of the call that ran ``node``."""
    view = _View()
    return fold_norms(
        _find_norms(graph, view, module_of),
        [lambda norm: _norm_after(view, norm, module_of), lambda norm: _norm_first(view, norm, module_of)],
        lambda pair: _describe(view, pair, ranks),
        lambda pair: _fold(graph, pair),
    )


def count_norms(graph: Any, module_of: Callable[[Any, Any], tuple[str, str | None]]) -> int:
    """``aten::batch_norm`` ops and FrozenBatchNorm2d layers (decomposed, or as an affine map)."""
    view = _View()
    return sum(
        1 for node in nodes(graph.block())
        if node.kind() == NORM or (node.kind() == "aten::add" and _frozen(view, node, module_of) is not None)
    )


def _find_norms(graph: Any, view: _View, module_of: Callable[[Any, Any], tuple[str, str | None]]) -> list[_Norm]:
    found = []
    for node in list(nodes(graph.block())):
        if node.kind() == NORM:
            # input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled
            inputs = list(node.inputs())
            name, cls = module_of(node, inputs[3])
            stats = (inputs[3], inputs[4], inputs[1], inputs[2])
            found.append(_Norm(node.output(), inputs[0], stats, constant(inputs[7]), constant(inputs[5]), name, cls))
        elif node.kind() == "aten::add" and len(list(node.outputs())) == 1:
            decomposed = _frozen(view, node, module_of)
            if decomposed is not None:
                name, cls = module_of(node, decomposed.running_mean)
                stats = (decomposed.running_mean, decomposed.running_var, decomposed.weight, decomposed.bias)
                found.append(_Norm(node.output(), decomposed.input, stats, decomposed.eps, False, name, cls, decomposed))
    return found


def _frozen(view: _View, node: Any, module_of: Any) -> Decomposed | None:
    """The FrozenBatchNorm2d ending at the addition ``node``: decomposed, or (where freezing or
    tracing computed its scale and shift) an affine map run by a FrozenBatchNorm2d module."""
    decomposed = match_frozen(view, node.output())
    if decomposed is None:
        decomposed = match_affine(view, node.output())
        if decomposed is not None and module_of(node, None)[1] != "FrozenBatchNorm2d":
            return None
    return decomposed


def _stat_values(norm: _Norm) -> list[Any]:
    """running_mean, running_var, weight, bias as constants (_MISSING where computed); an affine
    map's scale and shift as the statistics of a norm that computes it exactly (rsqrt(1 + 0) = 1)."""
    if norm.decomposed is not None and norm.decomposed.affine:
        scale, shift = constant(norm.decomposed.weight).flatten(), constant(norm.decomposed.bias).flatten()
        return [torch.zeros_like(scale), torch.ones_like(scale), scale, shift]
    return [constant(v) for v in norm.stats]


def _norm_after(view: _View, norm: _Norm, module_of: Any) -> _Pair | str:
    feed = find_feed(view, norm.input)
    if isinstance(feed, str):
        return feed
    producers = [value.node() for value in feed.producers]
    where = [module_of(p, list(p.inputs())[1]) for p in producers]
    return _Pair(norm, producers, feed.combine, False, feed.between, feed.output, feed.dim,
                 [w[0] for w in where], [w[1] for w in where])


def _norm_first(view: _View, norm: _Norm, module_of: Any) -> _Pair | None:
    uses = [u for u in norm.output.uses() if u.user.kind() not in _SHAPE_ONLY]
    if len(uses) != 1 or uses[0].user.kind() not in PRODUCERS or uses[0].offset != 0:
        return None
    consumer = uses[0].user
    name, cls = module_of(consumer, list(consumer.inputs())[1])
    return _Pair(norm, [consumer], Combine.DIRECT, True, [norm.output], None, None, [name], [cls])


def _hyper(node: Any) -> tuple[Any, Any]:
    """(transposed, groups) of a producer node, as constants where they are."""
    kind = node.kind()
    if kind == _LINEAR:
        return False, 1
    transposed: Any = kind in _TRANSPOSED_CONVS
    if kind in ("aten::_convolution", "aten::convolution"):
        transposed = constant(node.namedInput("transposed"))
    return transposed, constant(node.namedInput("groups"))


def _describe(view: _View, pair: _Pair, ranks: dict[Any, int]) -> Candidate:
    norm = pair.norm
    weights = []
    for producer in pair.producers:
        inputs = list(producer.inputs())
        weights += [constant(inputs[1]), constant(inputs[2])]
    stats = _stat_values(norm)
    stored = [*weights, *stats]
    tensors = [t for t in stored if isinstance(t, Tensor)]
    hyper = [_hyper(p) for p in pair.producers]
    known = (
        isinstance(norm.eps, float)
        and all(isinstance(t, bool) and isinstance(g, int) for t, g in hyper)
        and all(isinstance(v, Tensor) for v in (*weights[0::2], *stats[:2]))
    )
    running_stats = stats[0] is not None and stats[1] is not None
    linear = pair.producers[0].kind() == _LINEAR
    channels, producer_ranks = [], []
    for producer, (transposed, groups) in zip(pair.producers, hyper):
        weight = constant(list(producer.inputs())[1])
        if not isinstance(weight, Tensor) or not known:
            continue
        producer_ranks.append(2 if producer.kind() == _LINEAR else weight.dim())
        if pair.first:
            channels.append(weight.shape[1] * groups)
        else:
            channels.append(weight.shape[1] * groups if transposed else weight.shape[0])
    rank = ranks.get(norm.input.node())
    if pair.first:
        users = view.users(pair.between[0])
    else:
        users = max(view.users(value) for value in pair.between)
    mean = stats[0] if isinstance(stats[0], Tensor) else None
    return Candidate(
        combine=pair.combine,
        norm_first=pair.first,
        linear=linear,
        users=users,
        # without running statistics BatchNorm's forward passes training=True: that reason first
        training=norm.training is not False and running_stats,
        running_stats=running_stats,
        stored=not any(v is _MISSING for v in stored),
        hyperparameters_known=known,
        floating=all(t.is_floating_point() for t in tensors),
        devices=len({t.device for t in tensors}),
        producer_channels=tuple(channels),
        producer_ranks=tuple(producer_ranks),
        norm_channels=mean.numel() if mean is not None else None,
        norm_checks_rank=not linear and bool(producer_ranks) and producer_ranks[0] != 3,
        input_ranks=(rank,) if rank is not None else None,
        cat_axes=(pair.dim % rank,) if rank and isinstance(pair.dim, int) else None,
        cat_dim=pair.dim,
        zero_padded=pair.first and _zero_padded(pair.producers[0]),
        transposed_after=pair.first and hyper[0][0] is True,
    )


def _zero_padded(conv: Any) -> bool:
    if conv.kind() == _LINEAR:
        return False
    padding = constant(conv.namedInput("padding"))
    if isinstance(padding, str):
        weight = constant(list(conv.inputs())[1])
        return padding != "valid" and (not isinstance(weight, Tensor) or any(k > 1 for k in weight.shape[2:]))
    return not isinstance(padding, list) or any(p != 0 for p in padding)


def _fold(graph: Any, pair: _Pair) -> None:
    norm = pair.norm
    running_mean, running_var, weight, bias = _stat_values(norm)
    producers = []
    for producer in pair.producers:
        inputs = list(producer.inputs())
        transposed, groups = _hyper(producer)
        producers.append((constant(inputs[1]), constant(inputs[2]), transposed, groups))
    folded = fold_weights(
        producers, (running_mean, running_var, float(norm.eps), weight, bias), combine=pair.combine, norm_first=pair.first
    )
    for producer, (old_weight, old_bias, _, _), (new_weight, new_bias) in zip(pair.producers, producers, folded):
        stored_weight = torch.empty_like(old_weight)
        stored_weight.copy_(new_weight)
        like = old_bias if old_bias is not None else old_weight
        with graph.insert_point_guard(producer):
            weight_value = graph.insertConstant(stored_weight)
            bias_value = graph.insertConstant(new_bias.to(dtype=like.dtype, device=like.device))
        producer.replaceInput(1, weight_value)
        producer.replaceInput(2, bias_value)
    norm.output.replaceAllUsesWith(norm.input if pair.first else pair.output)
    if norm.decomposed is not None:
        for value in norm.decomposed.values:
            if not value.uses():
                value.node().destroy()
    elif not norm.output.uses():
        norm.output.node().destroy()
