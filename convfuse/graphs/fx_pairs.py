"""The fx front-end's records: a match found in a traced graph, what is known about the model
(``Facts``) and what a real run showed (``Observation``), and the match stated as a
``Candidate`` for the shared table of checks.

Everything here reads; nothing mutates a model. ``convfuse.graphs.fx_match.find_matches`` walks the
graphs and produces ``Match`` records; ``describe`` states one as a ``Candidate`` and
``skip_reason`` / ``why_skipped`` run the checks (``convfuse.fold.checks``) over it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from convfuse.fold.checks import Candidate, check
from convfuse.fold.reasons import Combine, Reason
from convfuse.fold.table import (
    Pattern,
    global_hooks,
    is_norm,
    is_producer,
    own_hooks,
)
from convfuse.graphs.held import held_objects, module_contents
from convfuse.graphs.tracing import TracedGraph
from convfuse.graphs.untraced import READ, UNREADABLE, CodeUse, first_reach


@dataclass(frozen=True)
class Match:
    """A candidate fold found in a graph: one norm and the conv/linear layers it folds into.

    ``producers`` (qualified names) are the layers whose weights change; ``patterns`` the table
    row of each. ``users`` is the largest number of users of any value between them and the
    norm (more than one: the value is used elsewhere too).
    """

    producers: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    norm: str
    kind: str
    users: int
    extra_arguments: bool
    combine: str = Combine.DIRECT
    dim: int | None = None  # the concatenation axis as written, for Combine.CAT
    graph: str = ""  # the traced part it was found in ("" for the model's own graph)
    unseen_callers: bool = False  # that part has an ancestor whose forward could not be traced
    crossed: tuple[str, ...] = ()  # modules whose boundary the values between the pair cross

    @property
    def pattern(self) -> Pattern:
        return self.patterns[0]

    @property
    def producer(self) -> str:
        """The producers as shown in reports."""
        return (", " if self.combine == Combine.CAT else " + ").join(self.producers)

    @property
    def norm_first(self) -> bool:
        return self.pattern.norm_first


@dataclass
class Observation:
    """What one real forward pass showed: calls per module and the input shapes each saw."""

    calls: Counter[str] = field(default_factory=Counter)
    input_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    output_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    direct_reads: set[str] = field(default_factory=set)  # modules whose tensors others read
    inside: dict[str, list[frozenset[str]]] = field(default_factory=dict)  # traced parts running at each call


@dataclass
class Facts:
    """What the checks need to know about the model beyond one pair."""

    modules: dict[str, nn.Module]
    names: dict[int, list[str]]
    graph_calls: Counter[str]
    direct_reads: set[str]
    shared_parameters: set[int]
    observation: Observation | None = None
    held_elsewhere: set[int] = field(default_factory=set)  # ids of modules also in plain containers
    tensors_held_elsewhere: set[int] = field(default_factory=set)  # ids of modules whose tensors are
    uses: CodeUse | None = None  # what untraced code does with the model's modules

    @classmethod
    def gather(
        cls,
        model: nn.Module,
        graphs: list[TracedGraph],
        observation: Observation | None,
        uses: CodeUse | None = None,
    ) -> Facts:
        names: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            names.setdefault(id(module), []).append(name)
        owners: Counter[int] = Counter()
        for module in {id(m): m for m in model.modules()}.values():
            for param in module.parameters(recurse=False):
                owners[id(param)] += 1
        graph_calls: Counter[str] = Counter()
        direct_reads: set[str] = set()
        for traced in graphs:
            for node in traced.graph.nodes:
                if node.op == "call_module":
                    graph_calls[traced.qualified(node.target)] += 1
                elif node.op == "get_attr":
                    owner, _, _ = traced.qualified(node.target).rpartition(".")
                    direct_reads.add(owner)
        held, tensors_held = _held_in_containers(model)
        return cls(
            modules=dict(model.named_modules(remove_duplicate=False)),
            names=names,
            graph_calls=graph_calls,
            direct_reads=direct_reads,
            shared_parameters={pid for pid, count in owners.items() if count > 1},
            observation=observation,
            held_elsewhere=held,
            tensors_held_elsewhere=tensors_held,
            uses=uses,
        )


def _held_in_containers(model: nn.Module) -> tuple[set[int], set[int]]:
    """Modules that something besides the module tree also holds, and modules whose tensors (or
    views of their storage) are held so: code that uses them from there would still see the
    original norm, or read weights the fold changed in place.

    Every instance attribute of every module is walked, except nn.Module's own bookkeeping
    (parameters, buffers, children, hooks): plain containers of any kind and depth, plain
    objects' attributes, closures, bound methods, partials, weak references, and modules outside
    the tree (their children too), once each.
    """
    tree = {id(m): m for m in model.modules()}
    storages: dict[int, int] = {}
    for module in tree.values():
        if is_norm(module) or is_producer(module):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                key = _storage(tensor)
                if key is not None:
                    storages.setdefault(key, id(module))
    held: set[int] = set()
    tensors_held: set[int] = set()
    roots = [value for module in tree.values() for value in module_contents(module, plain_only=True)]
    for value in held_objects(roots, inside=lambda m: id(m) in tree):
        if isinstance(value, nn.Module):
            held.add(id(value))
        else:
            owner = storages.get(_storage(value))
            if owner is not None:
                tensors_held.add(owner)
    return held, tensors_held


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse)
        return None


def _zero_padded(conv: nn.Module) -> bool:
    """Whether ``conv`` adds zeros around its input (``padding_mode='zeros'`` and some padding)."""
    if not isinstance(conv, _ConvNd):
        return False
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return False
        return any(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    return any(conv.padding)


def _keeps_channels(made: tuple[int, ...], seen: tuple[int, ...], linear: bool) -> bool:
    """Whether row-major reshapes from ``made`` to ``seen`` leave the channels on the norm's axis 1.

    A Linear's features are its output's last axis: the norm must see (rows, features). A conv's
    channels are axis 1: the reshapes must keep the leading (batch, channels) axes.
    """
    if linear:
        return len(seen) == 2 and made[-1] == seen[-1]
    return len(seen) >= 2 and len(made) >= 2 and made[:2] == seen[:2]


def skip_reason(match: Match, facts: Facts) -> str | None:
    """Why ``match`` must not be folded, or None where every check passes."""
    why = why_skipped(match, facts)
    return why[0] if why is not None else None


def why_skipped(match: Match, facts: Facts) -> tuple[str, str | None] | None:
    """Why ``match`` must not be folded (a ``Reason`` and a detail or None), or None where every
    check passes: ``convfuse.fold.checks.check`` over the match as a ``Candidate``.

    The subclass checks that need running or tracing the layers (custom forwards) are made
    by the fuse pass after this says yes.
    """
    return check(describe(match, facts))


def describe(match: Match, facts: Facts) -> Candidate:
    """``match`` as the graph-neutral ``Candidate`` that ``convfuse.fold.checks`` judges."""
    producers = [facts.modules[name] for name in match.producers]
    norm = facts.modules[match.norm]
    names = (*match.producers, match.norm)
    layers = [facts.modules[name] for name in names]
    observed = facts.observation
    use = first_reach(facts.uses, names, match.graph)
    reached = None
    if use is not None:
        reached = {UNREADABLE: Reason.NO_SOURCE, READ: Reason.DIRECT_ACCESS}.get(use.kind, Reason.REACHED), use.detail
    read = facts.direct_reads | (observed.direct_reads if observed else set())
    tensors = [t for layer in layers for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))]
    lazy = any(isinstance(t, UninitializedParameter) for t in tensors)
    stats = getattr(norm, "running_mean", None) is not None and getattr(norm, "running_var", None) is not None
    floating = lazy or not stats or (
        all(p.weight.is_floating_point() for p in producers) and norm.running_var.is_floating_point()
    )
    sides = [_channels_and_rank(p, match.norm_first) for p in producers] if stats and not lazy else []
    shapes = observed.input_shapes.get(match.norm) if observed else None
    keeps = None
    if match.combine == Combine.RESHAPE:
        made = observed.output_shapes.get(match.producers[0]) if observed else None
        if shapes and made:
            keeps = all(_keeps_channels(a, b, match.pattern.linear) for a, b in zip(made, shapes))
    return Candidate(
        combine=match.combine,
        norm_first=match.norm_first,
        linear=match.pattern.linear,
        reached=reached,
        users=match.users,
        extra_arguments=match.extra_arguments,
        called_twice=any(
            facts.graph_calls[name] > 1 or (observed is not None and observed.calls[name] > 1) for name in names
        ),
        not_called=observed is not None and any(observed.calls[name] == 0 for name in names),
        unobserved=match.unseen_callers and observed is None,
        outside_part=match.unseen_callers and observed is not None and any(
            match.graph not in inside for name in names for inside in observed.inside.get(name, [])
        ),
        global_hooks=global_hooks(),
        shared_names=any(len(facts.names[id(layer)]) > 1 for layer in layers),
        held_elsewhere=any(id(layer) in facts.held_elsewhere for layer in layers),
        tensors_held_elsewhere=any(id(layer) in facts.tensors_held_elsewhere for layer in layers),
        hooks=any(own_hooks(layer) for layer in layers),
        hooks_between=any(own_hooks(facts.modules[name]) for name in match.crossed if name in facts.modules),
        parametrized=any(parametrize.is_parametrized(layer) for layer in layers),
        shared_parameter=any(
            id(p) in facts.shared_parameters for producer in producers for p in producer.parameters(recurse=False)
        ),
        direct_access=any(name in read for name in names),
        training=norm.training,
        running_stats=stats,
        lazy=lazy,
        floating=floating,
        devices=len({t.device for t in tensors if t.is_floating_point()}) if not lazy else 1,
        producer_channels=tuple(c for c, _ in sides),
        producer_ranks=tuple(r for _, r in sides),
        norm_channels=norm.running_mean.numel() if stats and not lazy else None,
        norm_checks_rank=not isinstance(norm, (nn.BatchNorm1d, nn.SyncBatchNorm)),
        input_ranks=tuple(len(shape) for shape in shapes) if shapes else None,
        cat_axes=tuple((match.dim or 0) % len(shape) for shape in shapes) if shapes else None,
        cat_dim=match.dim,
        reshape_keeps_channels=keeps,
        zero_padded=match.norm_first and _zero_padded(producers[0]),
    )


def _channels_and_rank(producer: nn.Module, norm_first: bool) -> tuple[int, int]:
    """The producer's channels on the norm's side, and the rank of its batched input/output."""
    if isinstance(producer, nn.Linear):
        return (producer.in_features if norm_first else producer.out_features), 2
    return (producer.in_channels if norm_first else producer.out_channels), len(producer.kernel_size) + 2
