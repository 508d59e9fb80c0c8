"""The table of foldable pairs, finding them in fx graphs, and why a pair is not folded.

Everything here reads; nothing mutates a model. ``find_matches`` walks the graphs and
returns every pair the table covers plus a reason for each BatchNorm that is in no pair;
``skip_reason`` decides whether one pair is safe to fold.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from convfuse.tracing import TracedGraph

try:  # detection backbones use torchvision's frozen BatchNorm
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency, but the math needs only torch

    class FrozenBatchNorm2d(nn.Module):  # type: ignore[no-redef]
        """Stand-in so the table stays valid without torchvision."""


__all__ = [
    "PATTERNS",
    "Facts",
    "Match",
    "Observation",
    "Pattern",
    "Reason",
    "Skipped",
    "find_matches",
    "is_norm",
    "is_producer",
    "overrides_forward",
    "skip_reason",
]


@dataclass(frozen=True)
class Pattern:
    """One foldable pair of layer types: ``producer`` then ``norm``, or ``norm`` then ``producer``."""

    producer: type[nn.Module]
    norm: type[nn.Module]
    norm_first: bool = False

    @property
    def transpose(self) -> bool:
        return issubclass(self.producer, _ConvTransposeNd)

    @property
    def linear(self) -> bool:
        return issubclass(self.producer, nn.Linear)


_SYNC = nn.SyncBatchNorm
_FROZEN = FrozenBatchNorm2d

PATTERNS: tuple[Pattern, ...] = (
    # A conv or linear layer, then the norm that reads its output.
    Pattern(nn.Conv1d, nn.BatchNorm1d),
    Pattern(nn.Conv1d, _SYNC),
    Pattern(nn.Conv2d, nn.BatchNorm2d),
    Pattern(nn.Conv2d, _SYNC),
    Pattern(nn.Conv2d, _FROZEN),
    Pattern(nn.Conv3d, nn.BatchNorm3d),
    Pattern(nn.Conv3d, _SYNC),
    Pattern(nn.ConvTranspose1d, nn.BatchNorm1d),
    Pattern(nn.ConvTranspose1d, _SYNC),
    Pattern(nn.ConvTranspose2d, nn.BatchNorm2d),
    Pattern(nn.ConvTranspose2d, _SYNC),
    Pattern(nn.ConvTranspose2d, _FROZEN),
    Pattern(nn.ConvTranspose3d, nn.BatchNorm3d),
    Pattern(nn.ConvTranspose3d, _SYNC),
    Pattern(nn.Linear, nn.BatchNorm1d),
    Pattern(nn.Linear, _SYNC),
    # A norm, then the conv or linear layer that reads its output (exact without zero padding).
    Pattern(nn.Conv1d, nn.BatchNorm1d, norm_first=True),
    Pattern(nn.Conv1d, _SYNC, norm_first=True),
    Pattern(nn.Conv2d, nn.BatchNorm2d, norm_first=True),
    Pattern(nn.Conv2d, _SYNC, norm_first=True),
    Pattern(nn.Conv2d, _FROZEN, norm_first=True),
    Pattern(nn.Conv3d, nn.BatchNorm3d, norm_first=True),
    Pattern(nn.Conv3d, _SYNC, norm_first=True),
    Pattern(nn.Linear, nn.BatchNorm1d, norm_first=True),
    Pattern(nn.Linear, _SYNC, norm_first=True),
)

# The methods whose code defines what a layer computes; a subclass that replaces any of them
# computes something else until proven otherwise.
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding")


class Reason:
    """Why a BatchNorm was left unfused: fixed strings, shown to users and asserted by tests."""

    NO_PRODUCER = "its input is not the output of a conv or linear layer"
    UNSUPPORTED_PAIR = "no fold is defined for this pair of layer types"
    NOT_TRACED = "it runs in code that torch.fx could not trace"
    NOT_CALLED = "it is never called"
    OTHER_USERS = "the producer's output is also used elsewhere"
    NORM_OUTPUT_USERS = "the norm's output is also used elsewhere"
    EXTRA_ARGUMENTS = "a layer of the pair is called with extra arguments"
    CALLED_TWICE = "a module of the pair is called more than once"
    SHARED_NAMES = "a module of the pair is registered under more than one name"
    SHARED_PARAMETER = "a parameter of the pair is shared with another module"
    DIRECT_ACCESS = "the forward reads a parameter or buffer of the pair directly"
    HOOKS = "a module of the pair has hooks"
    GLOBAL_HOOKS = "global module hooks are registered"
    PARAMETRIZED = "a module of the pair has parametrizations"
    TRAINING = "the norm is in training mode"
    NO_RUNNING_STATS = "the norm has no running statistics (track_running_stats=False)"
    LAZY = "a module of the pair is not initialised (lazy)"
    NOT_FLOATING = "a module of the pair is not floating point"
    DEVICES = "the modules of the pair are on different devices"
    LINEAR_NOT_2D = "the norm does not normalise the linear layer's features (its input is not 2-D)"
    NOT_CHANNELS = "the norm does not normalise the conv's channels (unbatched input or other channel count)"
    SHAPE_UNKNOWN = "the norm's input shape is unknown (give example inputs)"
    ZERO_PADDING = "the conv after the norm pads with zeros, so the fold would not be exact"
    TRANSPOSED_AFTER = "a transposed conv after the norm cannot absorb it exactly"
    NORM_DOES_MORE_BEFORE = "the norm does more than normalise before the next layer (e.g. an activation)"
    NORM_FORWARD = "the norm subclass's forward could not be reduced to one BatchNorm"
    NOT_PROVEN = "the subclass overrides forward and the fold could not be proven on probe inputs"
    # Graph formats (ExportedProgram, TorchScript), where the pair is a pair of ops:
    COMPUTED_WEIGHT = "a weight or statistic of the pair is computed in the graph, not stored"
    IN_SUBGRAPH = "it runs inside a control-flow branch (torch.cond, torch.map), which is not rewritten"


@dataclass(frozen=True)
class Match:
    """A candidate pair found in a graph. ``producer`` is the conv/linear, whichever runs first."""

    pattern: Pattern
    producer: str
    norm: str
    kind: str
    users: int  # users of the first layer's output
    extra_arguments: bool

    @property
    def norm_first(self) -> bool:
        return self.pattern.norm_first


@dataclass(frozen=True)
class Skipped:
    """A BatchNorm left in place, and why."""

    norm: str
    producer: str | None
    reason: str
    detail: str | None = None


@dataclass
class Observation:
    """What one real forward pass showed: calls per module and the input shapes each saw."""

    calls: Counter[str] = field(default_factory=Counter)
    input_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    direct_reads: set[str] = field(default_factory=set)  # modules whose tensors others read


@dataclass
class Facts:
    """What the checks need to know about the model beyond one pair."""

    modules: dict[str, nn.Module]
    names: dict[int, list[str]]
    graph_calls: Counter[str]
    direct_reads: set[str]
    shared_parameters: set[int]
    observation: Observation | None = None

    @classmethod
    def gather(cls, model: nn.Module, graphs: list[TracedGraph], observation: Observation | None) -> Facts:
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
        return cls(
            modules=dict(model.named_modules(remove_duplicate=False)),
            names=names,
            graph_calls=graph_calls,
            direct_reads=direct_reads,
            shared_parameters={pid for pid, count in owners.items() if count > 1},
            observation=observation,
        )


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm-like layer that convfuse counts and tries to fold."""
    return isinstance(module, (_BatchNorm, _FROZEN))


def is_producer(module: nn.Module) -> bool:
    """A layer that can absorb a BatchNorm: a conv, transposed conv or linear."""
    return isinstance(module, (_ConvNd, nn.Linear))


def overrides_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module``'s class replaces code that defines what ``base`` computes."""
    cls = type(module)
    return any(
        getattr(cls, name) is not getattr(base, name) for name in _FORWARD_METHODS if hasattr(base, name)
    )


def find_pattern(first: nn.Module, second: nn.Module) -> Pattern | None:
    """The table row for ``first`` feeding ``second``, if any (subclasses match their bases)."""
    for pattern in PATTERNS:
        producer, norm = (second, first) if pattern.norm_first else (first, second)
        if isinstance(producer, pattern.producer) and isinstance(norm, pattern.norm):
            return pattern
    return None


def _kind(first: nn.Module, second: nn.Module) -> str:
    return f"{type(first).__name__}+{type(second).__name__}"


def find_matches(graphs: list[TracedGraph], model: nn.Module) -> tuple[list[Match], list[Skipped]]:
    """Every table pair in ``graphs``, by data flow, and a reason for each BatchNorm in none.

    A norm may get two candidates (its producer, and the layer after it); the earlier one is
    preferred. Norms that appear in no graph are reported as untraced or never called by the
    caller, which knows whether the model ran.
    """
    matches: list[Match] = []
    skipped: list[Skipped] = []
    for traced in graphs:
        modules = dict(traced.root.named_modules(remove_duplicate=False))
        for node in traced.graph.nodes:
            if node.op != "call_module" or not is_norm(modules[node.target]):
                continue
            found, reason = _candidates(traced, modules, node)
            matches.extend(found)
            if not found:
                skipped.append(Skipped(traced.qualified(node.target), reason[1], reason[0]))
    return matches, skipped


def _called_module(modules: dict[str, nn.Module], node: object) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        return modules[node.target]
    return None


def _candidates(
    traced: TracedGraph, modules: dict[str, nn.Module], norm_node: fx.Node
) -> tuple[list[Match], tuple[str, str | None]]:
    norm = modules[norm_node.target]
    norm_name = traced.qualified(norm_node.target)
    norm_extra = len(norm_node.args) != 1 or bool(norm_node.kwargs)
    found: list[Match] = []
    reason: tuple[str, str | None] = (Reason.NO_PRODUCER, None)

    source = norm_node.args[0] if norm_node.args else None
    producer = _called_module(modules, source)
    if producer is not None and is_producer(producer):
        assert isinstance(source, fx.Node)
        pattern = find_pattern(producer, norm)
        if pattern is None:
            reason = (Reason.UNSUPPORTED_PAIR, traced.qualified(source.target))
        else:
            found.append(
                Match(pattern, traced.qualified(source.target), norm_name, _kind(producer, norm),
                      users=len(source.users), extra_arguments=norm_extra)
            )

    users = list(norm_node.users)
    consumer = _called_module(modules, users[0]) if users else None
    if consumer is not None and is_producer(consumer) and users[0].args[:1] == (norm_node,):
        consumer_name = traced.qualified(users[0].target)
        pattern = find_pattern(norm, consumer)
        if pattern is not None:
            found.append(
                Match(pattern, consumer_name, norm_name, _kind(norm, consumer),
                      users=len(users), extra_arguments=norm_extra)
            )
        elif not found and isinstance(consumer, _ConvTransposeNd):
            reason = (Reason.TRANSPOSED_AFTER, consumer_name)
        elif not found and reason[0] == Reason.NO_PRODUCER:
            reason = (Reason.UNSUPPORTED_PAIR, consumer_name)
    return found, reason


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
        or getattr(module, "_backward_pre_hooks", None)
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


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


def _channel_reason(match: Match, producer: nn.Module, norm: nn.Module, observed: Observation | None) -> str | None:
    """Why the norm might not normalise the producer's channel axis, or None.

    A norm normalises axis 1 of its input. That is the producer's channel axis only for a
    batched input: BatchNorm1d after an unbatched Conv1d (C, L), or after a Linear on (B, N, C),
    normalises something else. BatchNorm2d/3d and FrozenBatchNorm2d reject other ranks
    themselves; BatchNorm1d and SyncBatchNorm need the observed input rank.
    """
    wrong = Reason.LINEAR_NOT_2D if match.pattern.linear else Reason.NOT_CHANNELS
    if isinstance(producer, nn.Linear):
        channels, rank = (producer.in_features if match.norm_first else producer.out_features), 2
    else:
        channels = producer.in_channels if match.norm_first else producer.out_channels
        rank = len(producer.kernel_size) + 2
    if norm.running_mean.numel() != channels:
        return wrong
    shapes = observed.input_shapes.get(match.norm) if observed else None
    if shapes:
        return wrong if any(len(shape) != rank for shape in shapes) else None
    if match.pattern.linear or isinstance(norm, (nn.BatchNorm1d, nn.SyncBatchNorm)):
        return Reason.SHAPE_UNKNOWN
    return None


def skip_reason(match: Match, facts: Facts) -> str | None:
    """Why ``match`` must not be folded, or None where every check passes.

    The subclass checks that need running or tracing the layers (custom forwards) are made
    by the fuse pass after this says yes.
    """
    producer, norm = facts.modules[match.producer], facts.modules[match.norm]
    pair = (match.producer, match.norm)
    observed = facts.observation
    if _global_hooks():
        return Reason.GLOBAL_HOOKS
    if any(len(facts.names[id(facts.modules[name])]) > 1 for name in pair):
        return Reason.SHARED_NAMES
    if any(facts.graph_calls[name] > 1 or (observed and observed.calls[name] > 1) for name in pair):
        return Reason.CALLED_TWICE
    if any(_has_hooks(facts.modules[name]) for name in pair):
        return Reason.HOOKS
    if any(parametrize.is_parametrized(facts.modules[name]) for name in pair):
        return Reason.PARAMETRIZED
    if any(id(p) in facts.shared_parameters for p in producer.parameters(recurse=False)):
        return Reason.SHARED_PARAMETER
    if match.users > 1:
        return Reason.NORM_OUTPUT_USERS if match.norm_first else Reason.OTHER_USERS
    if match.extra_arguments:
        return Reason.EXTRA_ARGUMENTS
    read = facts.direct_reads | (observed.direct_reads if observed else set())
    if match.producer in read or match.norm in read:
        return Reason.DIRECT_ACCESS
    if norm.training:
        return Reason.TRAINING
    if getattr(norm, "running_mean", None) is None or getattr(norm, "running_var", None) is None:
        return Reason.NO_RUNNING_STATS
    tensors = [*producer.parameters(recurse=False), *norm.parameters(recurse=False), *norm.buffers(recurse=False)]
    if any(isinstance(t, UninitializedParameter) for t in tensors):
        return Reason.LAZY
    if not producer.weight.is_floating_point() or not norm.running_var.is_floating_point():
        return Reason.NOT_FLOATING
    if len({t.device for t in tensors if t.is_floating_point()}) > 1:
        return Reason.DEVICES
    reason = _channel_reason(match, producer, norm, observed)
    if reason is not None:
        return reason
    if match.norm_first and _zero_padded(producer):
        return Reason.ZERO_PADDING
    if observed is not None and (observed.calls[match.producer] == 0 or observed.calls[match.norm] == 0):
        return Reason.NOT_CALLED
    return None
