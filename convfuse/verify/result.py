"""What verification concluded (``Verification``, one ``Check`` per verdict) and the bounds it
applies per dtype."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "NOISE_FACTOR",
    "PROOF_ULPS",
    "ROUNDING_FACTOR",
    "Check",
    "Tolerance",
    "Verification",
    "proof_bound",
    "tolerance_for",
]

SKIP_HINT = "verify=False (--no-verify)"

ROUNDING_FACTOR = 8.0
"""The rounding check: the fused model's error against float64 may be this many times the
original's own error against float64 (plus the dtype's floor). A correct fold measures 0.7-1.3x on
resnets, but 6.7x on timm regnety_016 (random weights, float32, its fold proven exact in float64):
2x would refuse it. Whether the fold is right is the float64 proof's verdict; this check bounds
what rounding the saved weights adds."""

PROOF_ULPS = 256.0
"""The float64 proof: the fused model (folded weights at float64 precision) may differ from the
original in float64 by this many float64 epsilons, times the model's amplification of rounding
(the original's own error in its dtype over that dtype's epsilon, at least 1), of the output's
scale: 5.7e-14 for a model that does not amplify rounding."""

NOISE_FACTOR = 8.0
"""The fallback rule, where no float64 proof can be run: how many times the original's own
rounding error a fused output may differ from the original's by (capped per dtype)."""


@dataclass(frozen=True)
class Tolerance:
    """Default tolerances of one dtype, relative to an output's scale."""

    floor: float  # always allowed: a few units of rounding
    cap: float  # the fallback rule never allows more, however noisy the original is
    fixed: float  # the fallback rule, where no float64 reference could be computed


def _tolerance(dtype: torch.dtype, floor_ulps: float, cap: float, fixed: float) -> Tolerance:
    return Tolerance(floor=floor_ulps * torch.finfo(dtype).eps, cap=cap, fixed=fixed)


_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: _tolerance(torch.float64, 64, 1e-9, 1e-10),
    torch.float32: _tolerance(torch.float32, 16, 1e-3, 5e-5),
    torch.float16: _tolerance(torch.float16, 4, 5e-2, 1e-2),
    torch.bfloat16: _tolerance(torch.bfloat16, 4, 1e-1, 5e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The default tolerances for outputs of ``dtype`` (float32's for other floating types)."""
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


def proof_bound(dtype: torch.dtype, own_error: float) -> float:
    """The float64 proof's allowed difference relative to an output's scale, for an output of
    ``dtype`` whose original has ``own_error`` (relative) against float64 in that dtype."""
    eps = torch.finfo(dtype).eps if dtype in _TOLERANCES else torch.finfo(torch.float32).eps
    amplification = max(1.0, own_error / eps)
    return PROOF_ULPS * torch.finfo(torch.float64).eps * amplification


@dataclass
class Check:
    """One verdict: ``error`` and ``allowed`` (relative to the output's scale) both belong to
    ``worst_output``, the output with the largest error / allowed ratio. ``passed`` None: not run
    (``note`` says why)."""

    passed: bool | None
    error: float = 0.0
    allowed: float = 0.0
    ratio: float = 0.0
    worst_output: str | None = None
    original_error: float | None = None  # the rounding check: the original's own error there
    batches: int = 0
    note: str | None = None

    @classmethod
    def not_run(cls, why: str) -> Check:
        return cls(passed=None, note=why)


@dataclass
class Verification:
    """The outcome of comparing the fused model with the original; ``passed`` is None if not run.

    ``max_abs_error``/``max_rel_error``: largest |fused - original| in the model's dtype over all
    compared outputs, absolute and relative to the output's scale; ``atol``/``rtol``: the
    tolerance applied at the worst output (``worst_output``) of the check that decided;
    ``rule``: how the tolerance was set. ``proof``: the float64 proof of the fold; ``rounding``:
    the check in the model's dtype. ``inputs``: the shapes of the first batch's tensors,
    ``inputs_inferred``: whether convfuse chose them; ``compared``: finite elements compared
    per output (all batches); ``probed``: the traced parts whose outputs were compared instead
    of (or besides) the final outputs.
    """

    passed: bool | None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    worst_output: str | None = None
    batches: int = 0
    rule: str = "skipped"
    message: str | None = None
    proof: Check | None = None
    rounding: Check | None = None
    inputs: list[list[int]] = field(default_factory=list)
    inputs_inferred: bool | None = None
    compared: dict[str, int] = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)

    @classmethod
    def skipped(cls, why: str = "verification was turned off") -> Verification:
        return cls(passed=None, message=why)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
