"""The fixed reasons a BatchNorm is left unfused, and how a norm's input is made from its producers:
shared words of every graph kind (fx, TorchScript, ATen)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Combine", "Reason", "Skipped", "pair_kind"]


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
    HELD_ELSEWHERE = "a module of the pair is also held outside the module tree (e.g. in a plain list)"
    TENSOR_HELD_ELSEWHERE = "a parameter or buffer of the pair is also held outside the module tree"
    SHARED_PARAMETER = "a parameter of the pair is shared with another module"
    DIRECT_ACCESS = "the forward reads a parameter or buffer of the pair directly"
    HOOKS = "a module of the pair has hooks"
    HOOKS_BETWEEN = "a module between the pair has hooks"
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
    SUM_TERMS = "its input is a sum with a term that is not a conv or linear output used only there"
    CAT_TERMS = "its input is a concatenation of parts that are not all conv or linear outputs used only there"
    CAT_AXIS = "its input is a concatenation along an axis other than the channels"
    RESHAPE_AXIS = "the reshapes between the layer and the norm do not keep the channel axis"
    OUTSIDE_PART = "a module of the pair is called from outside the part where the pair was traced"
    REACHED = "code outside the part where the pair was traced can use a module of the pair directly"
    NO_SOURCE = "the pair is in a part used by code whose source cannot be read"
    UNOBSERVED = "the pair is in a part called from untraceable code, which is only seen with example inputs"
    # Graph formats (ExportedProgram, TorchScript), where the pair is a pair of ops:
    COMPUTED_WEIGHT = "a weight or statistic of the pair is computed in the graph, not stored"
    IN_SUBGRAPH = "it runs inside a control-flow branch (torch.cond, torch.map), which is not rewritten"


class Combine:
    """How a norm's input is made from its producers' outputs."""

    DIRECT = "direct"  # norm(producer(x)), or producer(norm(x)) for a norm-first pattern
    SUM = "sum"  # norm(producer_a(x) + producer_b(y) + ...)
    CAT = "cat"  # norm(torch.cat([producer_a(x), producer_b(y), ...], dim=1))
    RESHAPE = "reshape"  # norm(producer(x).flatten(0, 1)), the channel axis kept


def pair_kind(producers: Sequence[str], norm: str, combine: str, first: bool) -> str:
    """The report's ``kind`` of a pair, the same words in every graph kind: ``Conv2d+BatchNorm2d``,
    ``BatchNorm2d+Conv2d`` (norm first), ``(Conv2d + Conv2d)+BatchNorm2d``, ``cat(Conv2d, Conv2d)+BatchNorm2d``,
    ``Linear+reshape+BatchNorm1d``."""
    if first:
        return f"{norm}+{producers[0]}"
    if combine == Combine.SUM:
        return f"({' + '.join(producers)})+{norm}"
    if combine == Combine.CAT:
        return f"cat({', '.join(producers)})+{norm}"
    if combine == Combine.RESHAPE:
        return f"{producers[0]}+reshape+{norm}"
    return f"{producers[0]}+{norm}"


@dataclass(frozen=True)
class Skipped:
    """A BatchNorm left in place, and why."""

    norm: str
    producer: str | None
    reason: str
    detail: str | None = None
