"""Finding candidate folds in the graph IRs (ATen graphs of an ExportedProgram, frozen TorchScript
graphs) through a small read-only view of each IR, so that both find the same shapes of pair:

- a norm whose input is one producer's output, a sum of producer outputs or a channel
  concatenation of them (``Feed``);
- a norm whose only user is a conv or linear (norm first);
- torchvision's FrozenBatchNorm2d, which both IRs see decomposed into
  ``x * (w * rsqrt(rv + eps)) + (b - rm * scale)`` on ``reshape(1, -1, 1, 1)`` views
  (``Decomposed``).

Values are the IR's own (``fx.Node``, ``torch._C.Value``); the view says what each one is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from convfuse.fold.checks import Candidate, check
from convfuse.fold.reasons import Combine, Reason, Skipped
from convfuse.report import FusedPair

__all__ = ["Decomposed", "Feed", "GraphView", "find_feed", "fold_norms", "match_affine", "match_frozen"]


class GraphView(Protocol):
    """What the matchers need to know about a value of one IR."""

    def op(self, value: Any) -> str | None:
        """``"add"`` (alpha 1), ``"sub"`` (alpha 1), ``"mul"``, ``"rsqrt"``, ``"reshape"``
        (to ``(1, -1, 1, 1)``), ``"cat"``, ``"producer"`` (conv, transposed conv or linear), else None."""

    def operands(self, value: Any) -> list[Any]:
        """The tensor operands of an ``op`` value (a concatenation's parts)."""

    def users(self, value: Any) -> int:
        """How many uses read the values of ``value`` (not only its shape)."""

    def scalar(self, value: Any) -> float | None:
        """A constant number, else None."""

    def stored(self, value: Any) -> bool:
        """Whether ``value`` is a stored tensor (parameter, buffer, constant)."""

    def cat_dim(self, value: Any) -> Any:
        """The axis of a concatenation, as written (an int, else unknown)."""

    def key(self, value: Any) -> Any:
        """A hashable identity of ``value``."""

    def tensor(self, value: Any) -> Any:
        """The stored tensor ``value`` is, else None."""


@dataclass
class Feed:
    """How a norm's input is made from producer outputs."""

    combine: str
    producers: list[Any]
    between: list[Any]  # every value from the producers up to the norm's input, producers included
    output: Any  # the norm's input
    dim: Any = None


def find_feed(view: GraphView, value: Any) -> Feed | str:
    """How ``value`` (a norm's input) is made from producer outputs, or the ``Reason`` it is not."""
    kind = view.op(value)
    if kind == "producer":
        return Feed(Combine.DIRECT, [value], [value], value)
    if kind == "add":
        between: list[Any] = [value]
        terms = _sum_terms(view, value, between)
        if not all(view.op(t) == "producer" for t in terms) or len({view.key(t) for t in terms}) != len(terms):
            return Reason.SUM_TERMS
        return Feed(Combine.SUM, terms, between + terms, value)
    if kind == "cat":
        parts = view.operands(value)
        if not parts or not all(view.op(p) == "producer" for p in parts) or len({view.key(p) for p in parts}) != len(parts):
            return Reason.CAT_TERMS
        return Feed(Combine.CAT, list(parts), [value, *parts], value, view.cat_dim(value))
    return Reason.NO_PRODUCER


def _sum_terms(view: GraphView, value: Any, between: list[Any]) -> list[Any]:
    terms: list[Any] = []
    for operand in view.operands(value):
        if view.op(operand) == "add":
            between.append(operand)
            terms.extend(_sum_terms(view, operand, between))
        else:
            terms.append(operand)
    return terms


@dataclass
class Decomposed:
    """A FrozenBatchNorm2d as the IR sees it: ``output = input * scale + shift``."""

    input: Any
    output: Any
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    eps: float
    values: list[Any] = field(default_factory=list)  # the values computing it, output first
    affine: bool = False  # weight and bias are the stored scale and shift, (1, C, 1, 1); no statistics


def match_frozen(view: GraphView, output: Any) -> Decomposed | None:
    """The decomposed FrozenBatchNorm2d ending at the addition ``output``, else None."""
    if view.op(output) != "add" or len(view.operands(output)) != 2:
        return None
    for product, shift in _orders(view.operands(output)):
        if view.op(product) != "mul" or view.users(product) != 1:
            continue
        for x, scale in _orders(view.operands(product)):
            found = _scale(view, scale)
            if found is None:
                continue
            weight, running_var, eps, scale_values = found
            shifted = _shift(view, shift, scale)
            if shifted is None:
                continue
            bias, running_mean, shift_values = shifted
            if view.users(scale) != 2:  # the input's product and the shift's
                continue
            values = [output, product, *shift_values, scale, *scale_values]
            return Decomposed(x, output, weight, bias, running_mean, running_var, eps, values)
    return None


def match_affine(view: GraphView, output: Any) -> Decomposed | None:
    """``input * scale + shift`` with stored ``(1, C, 1, 1)`` scale and shift ending at the addition
    ``output``: a FrozenBatchNorm2d whose statistics freezing or tracing already computed into two
    constants. Else None."""
    if view.op(output) != "add" or len(view.operands(output)) != 2:
        return None
    for product, shift in _orders(view.operands(output)):
        if view.op(product) != "mul" or view.users(product) != 1:
            continue
        for x, scale in _orders(view.operands(product)):
            scale_tensor, shift_tensor = view.tensor(scale), view.tensor(shift)
            if view.stored(x) or not _per_channel(scale_tensor) or not _per_channel(shift_tensor):
                continue
            if scale_tensor.shape == shift_tensor.shape:
                return Decomposed(x, output, scale, shift, None, None, 0.0, [output, product], affine=True)
    return None


def _per_channel(tensor: Any) -> bool:
    shape = getattr(tensor, "shape", None)
    return shape is not None and len(shape) == 4 and shape[0] == 1 and tuple(shape[2:]) == (1, 1)


def _orders(operands: list[Any]) -> list[tuple[Any, Any]]:
    if len(operands) != 2:
        return []
    first, second = operands
    return [(first, second), (second, first)]


def _stored_channels(view: GraphView, value: Any) -> Any:
    """The stored tensor behind ``reshape(t, (1, -1, 1, 1))`` read only there, else None."""
    if view.op(value) != "reshape" or view.users(value) != 1:
        return None
    (source,) = view.operands(value)[:1] or (None,)
    return source if source is not None and view.stored(source) else None


def _scale(view: GraphView, scale: Any) -> tuple[Any, Any, float, list[Any]] | None:
    """``w * rsqrt(rv + eps)``: (w, rv, eps, the values between)."""
    if view.op(scale) != "mul":
        return None
    for weight_view, root in _orders(view.operands(scale)):
        weight = _stored_channels(view, weight_view)
        if weight is None or view.op(root) != "rsqrt" or view.users(root) != 1:
            continue
        (total,) = view.operands(root)[:1] or (None,)
        if view.op(total) != "add" or view.users(total) != 1:
            continue
        for var_view, eps_value in _orders(view.operands(total)):
            running_var, eps = _stored_channels(view, var_view), view.scalar(eps_value)
            if running_var is not None and eps is not None:
                return weight, running_var, eps, [root, total, weight_view, var_view]
    return None


def _shift(view: GraphView, shift: Any, scale: Any) -> tuple[Any, Any, list[Any]] | None:
    """``b - rm * scale``: (b, rm, the values between)."""
    if view.op(shift) != "sub" or view.users(shift) != 1:
        return None
    operands = view.operands(shift)
    if len(operands) != 2:
        return None
    bias_view, product = operands
    bias = _stored_channels(view, bias_view)
    if bias is None or view.op(product) != "mul" or view.users(product) != 1:
        return None
    for mean_view, other in _orders(view.operands(product)):
        running_mean = _stored_channels(view, mean_view)
        if running_mean is not None and view.key(other) == view.key(scale):
            return bias, running_mean, [shift, product, bias_view, mean_view]
    return None


def fold_norms(
    norms: Sequence[Any],
    finders: Sequence[Callable[[Any], Any]],
    describe: Callable[[Any], Candidate],
    fold: Callable[[Any], None],
) -> tuple[list[FusedPair], list[Skipped]]:
    """Fold every norm that passes the checks, as the module path does: each norm is first tried
    with the layers feeding it, then the norms left with the layer reading them (one finder each).

    A finder gives a pair (with ``norm``, ``producer``, ``kind``), a reason string where nothing can
    pair with the norm that way, or None where that way does not apply. The report keeps, per norm,
    the first reason a real pair was refused with, else why nothing fed it.
    """
    fused: dict[int, FusedPair] = {}
    first_reason: dict[int, Skipped] = {}
    no_pair: dict[int, Skipped] = {}  # why nothing feeds the norm: shown where no layer reads it either
    for find in finders:
        for index, norm in enumerate(norms):
            if index in fused:
                continue
            pair = find(norm)
            if pair is None:
                continue
            if isinstance(pair, str):
                no_pair.setdefault(index, Skipped(norm.name, None, pair))
                continue
            why = check(describe(pair))
            if why is not None:
                first_reason.setdefault(index, Skipped(norm.name, pair.producer, why[0], why[1]))
                continue
            fold(pair)
            fused[index] = FusedPair(pair.producer, norm.name, pair.kind)
    skipped = [
        first_reason.get(i) or no_pair.get(i) or Skipped(norm.name, None, Reason.NO_PRODUCER)
        for i, norm in enumerate(norms) if i not in fused
    ]
    return [fused[i] for i in sorted(fused)], skipped
