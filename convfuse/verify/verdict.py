"""The verdict: the float64 proof of the fold and the rounding check in the model's dtype, on
the final outputs, or on the traced parts ("probes") where the final outputs are no evidence
(empty, non-finite, the same for every input) or not continuous in rounding (after NMS, top-k).

Everything outside the probes is unchanged code, so where every fused pair lies inside a probe,
the probes passing on exactly the inputs their originals saw proves the whole. Never prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from convfuse.errors import UsageError, VerificationError, first_line
from convfuse.progress import timed
from convfuse.verify.float64 import float64_outputs
from convfuse.verify.leaves import (
    evidence,
    exact_difference,
    output_dtype,
    paired_floats,
    relative_difference,
    structure_difference,
)
from convfuse.verify.reference import Reference
from convfuse.verify.remainders import Remainders
from convfuse.verify.result import (
    NOISE_FACTOR,
    ROUNDING_FACTOR,
    SKIP_HINT,
    Check,
    Verification,
    tolerance_for,
)
from convfuse.verify.running import call
from convfuse.verify.tally import Rule, Tally

if TYPE_CHECKING:  # pragma: no cover
    from convfuse.report import FuseReport

__all__ = ["PROOF_BATCHES", "compare"]

PROOF_BATCHES = 1
"""Batches the float64 proof runs on (the first of the reference's): a wrong fold shows on any
input, and each float64 pass costs about two passes in the model's dtype."""

_NO_EVIDENCE_FIX = (
    "give inputs on which the model computes something: --input-shape (example_inputs=) or real "
    f"inputs, or skip verification with {SKIP_HINT}"
)


class _Raised(Exception):
    """The fused model raised: verification fails with its message."""


def compare(
    model: nn.Module,
    reference: Reference,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    probes: Sequence[str] | None = None,
    remainders: Remainders | None = None,
) -> Verification:
    """Run the fused ``model`` on the reference batches and judge it.

    ``remainders``: the rounding remainders of the folded weights (kept at fold time); with them
    and the reference's float64 outputs the fold is proven in float64, and the model's own
    dtype is judged by the rounding check (or by ``atol``/``rtol``: ``|fused - original| <= atol
    + rtol * scale``). Without them the fallback rule applies (``NOISE_FACTOR``). ``probes``:
    recorded probe modules that together hold every fused pair; they decide where the final
    outputs are no evidence or not continuous in rounding.
    """
    user_rule = atol is not None or rtol is not None
    if user_rule and ((atol or 0.0) < 0 or (rtol or 0.0) < 0):
        raise UsageError("atol and rtol must not be negative")
    result = Verification(
        passed=False, batches=len(reference.batches), inputs=reference.input_shapes, inputs_inferred=reference.inferred
    )
    if reference.truth_problem == "nondeterministic" and not user_rule:
        result.rule, result.message = "nondeterministic", (
            "the original model gives different outputs on two runs of the same input, so its "
            "outputs cannot be compared (random ops or state that changes between calls?); fix "
            f"the model, give atol=/rtol= (--atol/--rtol), or skip verification with {SKIP_HINT}"
        )
        return result
    why_no_proof = _why_no_proof(reference, remainders)
    result.rule = _rule_name(user_rule, why_no_proof, reference)
    result.compared, no_evidence = evidence([o.final for o in reference.outputs])
    dtype_name = str(output_dtype(reference.outputs[0].final)).removeprefix("torch.")
    try:
        if no_evidence is None:
            proof, rounding = _judge(model, reference, _final_pairs, atol, rtol, remainders, why_no_proof)
            if proof.passed is not False and rounding.passed:
                return _verdict(result, proof, rounding, dtype_name)
            # The final outputs may still be judged through the traced parts that hold every fused
            # pair: where the original's own outputs jump with rounding, or where the float64 proof
            # passed on them (the fold is exact; the dtype's rounding is amplified by unchanged code
            # after the parts, e.g. a detector's proposal selection).
            discontinuous = _discontinuous(reference)
            if not probes or not (discontinuous or proof.passed is True):
                return _verdict(result, proof, rounding, dtype_name)
            first = _failure(proof, rounding, dtype_name)
            note = (f"the final outputs are not continuous in rounding ({first})" if discontinuous else
                    f"the fold is proven exact in float64, and the final outputs amplify the dtype's rounding ({first})")
        else:
            if not probes:
                result.message = f"nothing to compare: {no_evidence}; {_NO_EVIDENCE_FIX}"
                return result
            compared, probe_problem = _probe_evidence(reference, probes)
            if probe_problem is not None:
                result.compared = {**result.compared, **compared}
                result.message = f"nothing to compare: {no_evidence}, and {probe_problem}; {_NO_EVIDENCE_FIX}"
                return result
            note = f"the final outputs are no evidence ({no_evidence})"
            result.compared = {**result.compared, **compared}
        result.probed = list(probes)
        parts = _ProbePairs(probes)
        proof, rounding = _judge(model, reference, parts, atol, rtol, remainders, why_no_proof)
    except _Raised as error:
        result.message = str(error)
        return result
    result.rule += f", at {', '.join(probes)} on their recorded inputs"
    _verdict(result, proof, rounding, dtype_name)
    if result.passed:
        result.message = f"{note}; every fused pair lies in the modules above, which match on the inputs they saw"
    return result


def _why_no_proof(reference: Reference, remainders: Remainders | None) -> str | None:
    if remainders is None:
        return "the folded weights' float64 remainders are not kept for this kind of model"
    if reference.truth is None:
        return reference.truth_problem or "no float64 reference was computed"
    return None


def _rule_name(user_rule: bool, why_no_proof: str | None, reference: Reference) -> str:
    if why_no_proof is None:
        dtype_rule = "user tolerance" if user_rule else f"{ROUNDING_FACTOR:g}x the original's rounding error"
        return f"float64 proof + {dtype_rule}"
    if user_rule:
        return f"user tolerance (no float64 proof: {why_no_proof})"
    if reference.truth is not None:
        return f"{NOISE_FACTOR:g}x the original's rounding error (no float64 proof: {why_no_proof})"
    return f"fixed tolerance (no float64 reference: {why_no_proof})"


Pairs = Iterator[tuple[Any, Any, Any, str]]


def _batch_path(index: int, count: int, path: str) -> str:
    return f"batch {index}: {path}" if count > 1 else path


def _fused_call(module: nn.Module, batch: Any) -> Any:
    try:
        return call(module, batch)
    except Exception as error:
        raise _Raised(f"the fused model raised {type(error).__name__}: {first_line(error)}") from error


def _final_pairs(model: nn.Module, reference: Reference, proof: Remainders | None) -> Pairs:
    """(original, fused, truth, path) per batch; with ``proof`` the fused model runs in float64
    with its folded weights rebuilt, on the proof's batches."""
    count = len(reference.batches)
    truth = reference.truth or [None] * count
    if proof is None:
        for index, batch in enumerate(reference.batches):
            yield reference.outputs[index].final, _fused_call(model, batch), truth[index], _batch_path(index, count, "output")
        return
    fused, problem = float64_outputs(model, reference.batches[:PROOF_BATCHES], proof)
    if fused is None:
        raise _NoFloat64(problem)
    for index, value in enumerate(fused):
        yield reference.outputs[index].final, value, truth[index], _batch_path(index, count, "output")


class _NoFloat64(Exception):
    """The fused model has no float64 run: the proof falls back."""


class _ProbePairs:
    """(original, fused, truth, path) for every recorded call of each probe."""

    def __init__(self, probes: Sequence[str]) -> None:
        self.probes = list(probes)

    def __call__(self, model: nn.Module, reference: Reference, proof: Remainders | None) -> Pairs:
        count = len(reference.batches)
        for name in self.probes:
            module = model.get_submodule(name)
            for index, outputs in enumerate(reference.outputs):
                calls = outputs.probes.get(name, [])
                if proof is not None:
                    if index >= PROOF_BATCHES:
                        break
                    fused, problem = float64_outputs(module, [c.inputs for c in calls], proof)
                    if fused is None:
                        raise _NoFloat64(problem)
                else:
                    fused = [_fused_call(module, c.inputs) for c in calls]
                for number, (c, value) in enumerate(zip(calls, fused)):
                    label = _batch_path(index, count, f"{name}()" + (f" call {number}" if number else ""))
                    yield c.output, value, c.truth, label


def _judge(
    model: nn.Module,
    reference: Reference,
    pairs: Any,
    atol: float | None,
    rtol: float | None,
    remainders: Remainders | None,
    why_no_proof: str | None,
) -> tuple[Check, Tally]:
    """The proof (a Check; not run where impossible) and the dtype check's tally over ``pairs``."""
    user_rule = atol is not None or rtol is not None
    proof_check = Check.not_run(why_no_proof) if why_no_proof else None
    if proof_check is None:
        proof = Tally(Rule.PROOF, rerun_noise=reference.rerun_noise)
        try:
            for original, fused, truth, path in pairs(model, reference, remainders):
                proof.add(original, fused, truth, path)
            proof_check = proof.check(min(PROOF_BATCHES, len(reference.batches)))
            if not proof.passed:
                proof_check.note = proof.message("float64")
        except _NoFloat64 as error:
            why_no_proof = f"the fused model has no float64 run ({error})"
            proof_check = Check.not_run(why_no_proof)
    if user_rule:
        rule = Rule.USER
    else:
        rule = Rule.ROUNDING if why_no_proof is None else Rule.FALLBACK
    rounding = Tally(rule, atol=atol, rtol=rtol, rerun_noise=reference.rerun_noise)
    for original, fused, truth, path in pairs(model, reference, None):
        rounding.add(original, fused, truth, path)
    return proof_check, rounding


def _failure(proof: Check, rounding: Tally, dtype_name: str) -> str:
    if proof.passed is False:
        return proof.note or "the float64 proof failed"
    return rounding.message(dtype_name)


def _verdict(result: Verification, proof: Check, rounding: Tally, dtype_name: str) -> Verification:
    result.proof = proof
    result.rounding = rounding.check(result.batches)
    rounding.into(result)
    if proof.passed is False:  # the proof decided: its output, error and bound
        result.atol, result.rtol, result.worst_output = 0.0, proof.allowed, proof.worst_output
    result.passed = proof.passed is not False and rounding.passed
    if proof.passed is None and result.rule.startswith("float64 proof"):
        result.rule = f"{result.rule.split(' + ', 1)[1]} (no float64 proof: {proof.note})"
        if rounding.rule is Rule.FALLBACK:
            result.rule = f"{NOISE_FACTOR:g}x the original's rounding error (no float64 proof: {proof.note})"
    if not result.passed:
        result.message = _failure(proof, rounding, dtype_name)
    return result


def _probe_evidence(reference: Reference, probes: Sequence[str]) -> tuple[dict[str, int], str | None]:
    compared: dict[str, int] = {}
    for name in probes:
        outputs = [c.output for o in reference.outputs for c in o.probes.get(name, [])]
        found, problem = evidence(outputs)
        for path, count in found.items():
            compared[f"{name}(){path.removeprefix('output')}"] = count
        if problem is not None:
            return compared, f"the outputs of {name} are no evidence either ({problem})"
    return compared, None


def _discontinuous(reference: Reference) -> bool:
    """Whether the original's own final outputs jump with rounding: its runs in its dtype and in
    float64 differ in structure, in an integer output, or by more than rounding could explain.
    Only then may a difference of the fused model's final outputs be put down to rounding."""
    if reference.truth is None:
        return False
    for outputs, truth in zip(reference.outputs, reference.truth):
        if structure_difference(outputs.final, truth, dtypes=False) is not None:
            return True
        if exact_difference(outputs.final, truth) is not None:
            return True
        for _, original, exact in paired_floats(outputs.final, truth):
            if relative_difference(exact, original.double()) > tolerance_for(original.dtype).cap:
                return True
    return False


def verify_fused(
    report: FuseReport,
    model: Any,
    reference: Reference,
    *,
    atol: float | None,
    rtol: float | None,
    probes: list[str] | None = None,
    remainders: Remainders | None = None,
) -> None:
    """Compare the fused ``model`` with the reference into ``report``; VerificationError if it fails.
    ``remainders``: the folded weights' rounding remainders, for the float64 proof."""
    with timed(report.timings, "verify"):
        report.verification = compare(
            model, reference, atol=atol, rtol=rtol, probes=probes, remainders=remainders
        )
    if not report.verification.passed:
        raise VerificationError(f"verification failed: {report.verification.message}", report)
