"""One description of a candidate fold (``Candidate``) and one table of checks over it (``CHECKS``),
run by every graph kind: torch.fx graphs of an nn.Module, frozen TorchScript graphs and the ATen
graphs of an ExportedProgram.

Each front-end fills a ``Candidate`` from its own IR; a field that does not apply to an IR keeps
its default, which is the known-safe value (a TorchScript graph has no hooks, a module tree has no
computed weights). ``check`` then returns the first failing check's ``Reason``, the same string
for the same unsafe pattern in every IR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from convfuse.fold.reasons import Combine, Reason

__all__ = ["CHECKS", "Candidate", "Check", "check"]


@dataclass(frozen=True)
class Candidate:
    """What is known about one candidate fold: a norm and the conv/linear layers it folds into.

    Defaults are the values that make a check pass: "not applicable in this IR" or "known safe".
    """

    # the pair's shape
    combine: str = Combine.DIRECT
    norm_first: bool = False  # producer(norm(x)) rather than norm(producer(x))
    linear: bool = False  # the producers are Linear layers (features on the last axis)
    # calls and users
    reached: tuple[str, str | None] | None = None  # untraced code uses a module of the pair: (reason, detail)
    users: int = 1  # most users of any value between the producers and the norm
    norm_outputs_read: bool = False  # an output of the norm op besides the normalised tensor is read
    extra_arguments: bool = False
    called_twice: bool = False
    not_called: bool = False
    unobserved: bool = False  # called from untraced code, and no run showed how
    outside_part: bool = False  # a run showed a call from outside the traced part
    # how the modules and their tensors are held
    global_hooks: bool = False
    shared_names: bool = False
    held_elsewhere: bool = False
    tensors_held_elsewhere: bool = False
    hooks: bool = False
    hooks_between: bool = False
    parametrized: bool = False
    shared_parameter: bool = False
    direct_access: bool = False
    # the norm's state and the stored weights
    training: bool = False
    running_stats: bool = True
    stored: bool = True  # every weight and statistic is a stored tensor, not computed in the graph
    hyperparameters_known: bool = True  # groups, eps, transposed are constants
    lazy: bool = False
    floating: bool = True
    devices: int = 1
    # channels and ranks
    producer_channels: tuple[int, ...] = ()  # each producer's channels on the norm's side
    producer_ranks: tuple[int, ...] = ()  # the rank of each producer's batched input/output
    norm_channels: int | None = None  # the norm's statistics' length
    norm_checks_rank: bool = False  # the norm rejects other ranks itself (BatchNorm2d/3d modules)
    input_ranks: tuple[int, ...] | None = None  # the ranks the norm's input was seen with (None: unknown)
    cat_axes: tuple[int, ...] | None = None  # a concatenation's axis, normalised by each seen rank
    cat_dim: int | None = None  # a concatenation's axis as written
    reshape_keeps_channels: bool | None = None  # through reshapes: None where not shown by a run
    zero_padded: bool = False  # the conv after a norm (norm first) pads with zeros
    transposed_after: bool = False  # the layer after a norm (norm first) is a transposed conv


@dataclass(frozen=True)
class Check:
    """One row of the table: the ``Reason`` given where ``fails`` says yes."""

    reason: str
    fails: Callable[[Candidate], bool]


def _channel_reason(c: Candidate) -> str | None:
    """Why the norm might not normalise the producers' channel axis (axis 1 of its input).

    That is the producer's channel axis only for a batched input: BatchNorm1d after an unbatched
    Conv1d (C, L), or after a Linear on (B, N, C), normalises something else.
    """
    wrong = Reason.LINEAR_NOT_2D if c.linear else Reason.NOT_CHANNELS
    if not c.producer_channels:
        return None
    if c.combine == Combine.CAT:
        dim = c.cat_dim or 0
        if c.cat_axes and any(axis != 1 for axis in c.cat_axes):
            return Reason.CAT_AXIS
        if not c.cat_axes and dim != 1:
            return Reason.SHAPE_UNKNOWN if dim < 0 else Reason.CAT_AXIS
    expected = sum(c.producer_channels) if c.combine == Combine.CAT else c.producer_channels[0]
    if c.norm_channels is not None and c.norm_channels != expected:
        return wrong
    if len(set(c.producer_ranks)) > 1:
        return wrong
    if c.combine == Combine.SUM and len(set(c.producer_channels)) > 1:
        return wrong
    if c.combine == Combine.RESHAPE:
        if c.reshape_keeps_channels is None:
            return Reason.SHAPE_UNKNOWN
        return None if c.reshape_keeps_channels else Reason.RESHAPE_AXIS
    if c.input_ranks:
        return wrong if any(rank != c.producer_ranks[0] for rank in c.input_ranks) else None
    if c.linear or not c.norm_checks_rank:
        return Reason.SHAPE_UNKNOWN
    return None


def _flag(reason: str, field: str) -> Check:
    return Check(reason, lambda c: bool(getattr(c, field)))


# The order decides which reason is shown where several apply: who else can see the pair first,
# then the norm's state, then whether the math fits the shapes.
CHECKS: tuple[Check, ...] = (
    _flag(Reason.GLOBAL_HOOKS, "global_hooks"),
    _flag(Reason.SHARED_NAMES, "shared_names"),
    _flag(Reason.HELD_ELSEWHERE, "held_elsewhere"),
    _flag(Reason.TENSOR_HELD_ELSEWHERE, "tensors_held_elsewhere"),
    _flag(Reason.CALLED_TWICE, "called_twice"),
    _flag(Reason.HOOKS, "hooks"),
    _flag(Reason.HOOKS_BETWEEN, "hooks_between"),
    _flag(Reason.PARAMETRIZED, "parametrized"),
    _flag(Reason.SHARED_PARAMETER, "shared_parameter"),
    Check(Reason.NORM_OUTPUT_USERS, lambda c: c.users > 1 and c.norm_first),
    Check(Reason.OTHER_USERS, lambda c: c.users > 1),
    _flag(Reason.NORM_OUTPUT_USERS, "norm_outputs_read"),
    _flag(Reason.EXTRA_ARGUMENTS, "extra_arguments"),
    _flag(Reason.UNOBSERVED, "unobserved"),
    _flag(Reason.OUTSIDE_PART, "outside_part"),
    _flag(Reason.DIRECT_ACCESS, "direct_access"),
    _flag(Reason.TRAINING, "training"),
    Check(Reason.NO_RUNNING_STATS, lambda c: not c.running_stats),
    Check(Reason.COMPUTED_WEIGHT, lambda c: not c.stored),
    Check(Reason.UNSUPPORTED_PAIR, lambda c: not c.hyperparameters_known),
    _flag(Reason.LAZY, "lazy"),
    Check(Reason.NOT_FLOATING, lambda c: not c.floating),
    Check(Reason.DEVICES, lambda c: c.devices > 1),
    _flag(Reason.NOT_CALLED, "not_called"),  # before the shape checks: a norm never run has no shape
    _flag(Reason.TRANSPOSED_AFTER, "transposed_after"),
)

_AFTER_CHANNELS: tuple[Check, ...] = (_flag(Reason.ZERO_PADDING, "zero_padded"),)


def check(candidate: Candidate) -> tuple[str, str | None] | None:
    """Why ``candidate`` must not be folded (a ``Reason`` and a detail or None), or None where
    every check passes."""
    if candidate.global_hooks:
        return Reason.GLOBAL_HOOKS, None
    if candidate.reached is not None:
        return candidate.reached
    for row in CHECKS:
        if row.fails(candidate):
            return row.reason, None
    reason = _channel_reason(candidate)
    if reason is not None:
        return reason, None
    for row in _AFTER_CHANNELS:
        if row.fails(candidate):
            return row.reason, None
    return None
