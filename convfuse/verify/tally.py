"""Comparing outputs leaf by leaf under one rule, keeping the worst leaf: the float64 proof, the
rounding check in the model's dtype, a user's atol/rtol, or the fallback rule where no float64
proof could run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from convfuse.verify.leaves import (
    exact_difference,
    leaves,
    max_difference,
    paired_floats,
    scale,
    structure_difference,
)
from convfuse.verify.result import NOISE_FACTOR, ROUNDING_FACTOR, SKIP_HINT, Check, proof_bound, tolerance_for

__all__ = ["Rule", "Tally"]


class Rule(Enum):
    PROOF = "float64 proof"
    ROUNDING = "rounding check"
    USER = "user tolerance"
    FALLBACK = "fallback"


def _is_truth(truth: Any, like: Tensor) -> bool:
    return isinstance(truth, Tensor) and truth.dtype == torch.float64 and truth.shape == like.shape


def _own_error(original: Tensor, truth: Any, size: float) -> float | None:
    """The original's own rounding error against float64, relative to ``size``; None if unknown."""
    if not _is_truth(truth, original):
        return None
    difference = max_difference(original, truth)
    if math.isinf(difference):
        return None
    return difference / size if size > 0 else 0.0


def _ratio(error: float, allowed: float) -> float:
    if error == 0.0:
        return 0.0
    return error / allowed if allowed > 0 else math.inf


@dataclass
class Tally:
    """Running result of one rule over one set of outputs (final, or probes).

    ``add(original, fused, truth, path)``: ``original`` is the original's output in its dtype,
    ``fused`` the fused model's (in float64 for the proof), ``truth`` the original's in float64.
    """

    rule: Rule
    atol: float | None = None
    rtol: float | None = None
    rerun_noise: float = 0.0
    problem: str | None = None  # a structural or exact mismatch: fails outright
    max_abs: float = 0.0  # |fused - original| in the model's dtype (not for the proof)
    max_rel: float = 0.0
    ratio: float = -1.0  # error / allowed at the worst leaf
    error: float = 0.0  # relative error at the worst leaf
    allowed: float = 0.0  # relative allowed error there
    own: float | None = None  # the original's own error there
    worst: str | None = None
    worst_atol: float = 0.0
    worst_rtol: float = 0.0
    capped: bool = False  # the fallback rule: the cap, not the noise, set the bar at the worst leaf

    @property
    def passed(self) -> bool:
        return self.problem is None and self.ratio <= 1.0

    def add(self, original: Any, fused: Any, truth: Any, path: str) -> None:
        """Compare one output (possibly nested) of the fused model."""
        if self.problem is not None:
            return
        expected = truth if self.rule is Rule.PROOF else original
        self.problem = structure_difference(expected, fused, path) or exact_difference(expected, fused, path)
        if self.problem is not None:
            return
        truths = dict(leaves(truth, path)) if truth is not None else {}
        originals = dict(leaves(original, path))
        for where, _, value in paired_floats(expected, fused, path):
            self._leaf(where, originals.get(where), value, truths.get(where))

    def _leaf(self, where: str, original: Any, fused: Tensor, truth: Any) -> None:
        if not isinstance(original, Tensor):  # a Python float leaf
            original = torch.tensor(float(original))
        size = scale(truth) if _is_truth(truth, original) else scale(original)
        own = _own_error(original, truth, size)
        if own is not None:
            own = max(own, self.rerun_noise)
        atol = rtol = 0.0
        capped = False
        if self.rule is Rule.PROOF:
            difference = max_difference(truth, fused)
            rtol = proof_bound(original.dtype, own or 0.0)
        else:
            against_original = max_difference(original, fused)
            self.max_abs = max(self.max_abs, against_original)
            self.max_rel = max(self.max_rel, _ratio(against_original, size) if size > 0 else _ratio(against_original, 0))
            tolerance = tolerance_for(original.dtype)
            if self.rule is Rule.ROUNDING and own is not None:
                difference = max_difference(truth, fused)
                rtol = ROUNDING_FACTOR * own + tolerance.floor
                if original.dtype == torch.float64:  # its own truth: float64 rounding, as in the proof
                    rtol = max(rtol, proof_bound(torch.float64, own))
            elif self.rule is Rule.USER:
                difference = against_original
                atol, rtol = self.atol or 0.0, self.rtol or 0.0
            else:  # the fallback rule, also where this output has no float64 truth
                difference = against_original
                if own is None:
                    rtol = tolerance.fixed
                else:
                    rtol = min(NOISE_FACTOR * own + tolerance.floor, tolerance.cap)
                    capped = NOISE_FACTOR * own + tolerance.floor > tolerance.cap
        allowed = atol + rtol * size
        ratio = _ratio(difference, allowed)
        if ratio > self.ratio:
            self.ratio, self.worst, self.own, self.capped = ratio, where, own, capped
            self.error = difference / size if size > 0 else (0.0 if difference == 0 else math.inf)
            self.allowed = allowed / size if size > 0 else allowed
            self.worst_atol, self.worst_rtol = atol, rtol

    def check(self, batches: int, note: str | None = None) -> Check:
        ratio = max(self.ratio, 0.0)
        return Check(
            passed=self.passed, error=self.error, allowed=self.allowed, ratio=ratio, worst_output=self.worst,
            original_error=self.own if self.rule is not Rule.PROOF else None, batches=batches,
            note=self.problem if self.problem is not None else note,
        )

    def message(self, dtype_name: str) -> str:
        """Why this rule failed, with the error and the allowed value of the same output."""
        if self.problem is not None:
            return self.problem
        if math.isinf(self.error):
            error = "non-finite values (NaN or inf where the original has none, or the reverse)"
        else:
            error = f"{self.error:.3g} of the output's scale"
        if self.rule is Rule.PROOF:
            return (
                f"the fold is wrong: in float64 the fused model (its folded weights at float64 "
                f"precision) differs from the original at {self.worst} by {error}; float64 rounding "
                f"allows {self.allowed:.3g}"
            )
        if self.rule is Rule.ROUNDING and self.own is None:  # judged by the fixed tolerance there
            return (
                f"the fused model differs from the original at {self.worst} by {error}, which has no "
                f"float64 truth to measure rounding against; allowed: {self.allowed:.3g}; give atol=/rtol= "
                "(--atol/--rtol) to accept it"
            )
        if self.rule is Rule.ROUNDING:
            return (
                f"the fused model's {dtype_name} rounding error at {self.worst} is {error} against "
                f"float64, {self.error / self.own if self.own else math.inf:.3g}x the original's own "
                f"{self.own:.3g}; allowed: {self.allowed:.3g} ({ROUNDING_FACTOR:g}x plus "
                f"{tolerance_for(_dtype(dtype_name)).floor:.3g}); give atol=/rtol= (--atol/--rtol) to accept it"
            )
        if self.capped:
            return (
                f"cannot verify: the original model's own {dtype_name} rounding error is already "
                f"{self.own:.3g} of the output's scale at {self.worst} (measured against float64), too "
                f"large to tell a correct fold from a wrong one without the float64 proof (the fused "
                f"model differs by {error}); accept a difference with rtol=/atol= (--rtol/--atol), or "
                f"skip verification with {SKIP_HINT}"
            )
        if self.rule is Rule.USER:
            allowed = f"atol={self.worst_atol:.3g} + rtol={self.worst_rtol:.3g} x scale ({self.allowed:.3g} of it)"
        else:
            allowed = f"{self.allowed:.3g} of the output's scale"
        return f"the fused model differs from the original at {self.worst} by {error}; allowed: {allowed}"

    def into(self, result: Any) -> Any:
        """Fill the Verification's DESIGN.md keys from this rule's worst leaf."""
        if self.rule is not Rule.PROOF:
            result.max_abs_error, result.max_rel_error = self.max_abs, self.max_rel
        result.atol, result.rtol, result.worst_output = self.worst_atol, self.worst_rtol, self.worst
        return result


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name, torch.float32)
