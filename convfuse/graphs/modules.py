"""The nn.Module front-end: trace -> match -> check -> fold -> rewrite on the user's own module tree,
between the reference run of the original and the verification of the result.

The fold and the rewrite of each match are in ``fx_fold`` (the only code that changes a model):
the producer gets the folded weight and bias (written into its existing parameters), and the
BatchNorm is replaced by ``nn.Identity`` (or, for a norm that also activates, by what its
forward does after normalising). The model keeps its class, names and methods.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from convfuse import verify as verification
from convfuse.errors import TrainingModeError, UsageError
from convfuse.fold.reasons import Skipped
from convfuse.fold.table import is_norm, is_producer
from convfuse.graphs.fx_fold import fold_all, left_unfused, set_submodule
from convfuse.graphs.fx_match import find_matches
from convfuse.graphs.fx_pairs import Facts, Match, Observation
from convfuse.graphs.reparam import plan_merges
from convfuse.graphs.tracing import Tracing, trace_model
from convfuse.inputs import candidate_batches
from convfuse.progress import timed
from convfuse.report import Count, FusedPair, FuseReport, FuseResult, Merged
from convfuse.verify import remainders
from convfuse.verify.verdict import verify_fused

__all__ = ["fuse_module", "fuse_pass"]


def fuse_module(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    reparam: bool = False,
) -> FuseResult:
    """``convfuse.fuse`` on an ``nn.Module``: arguments, result and errors as there."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"convfuse.fuse expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode, where BatchNorm normalises with batch "
            "statistics and folding would change what it computes; call model.eval() first "
            "(on the command line: --eval)"
        )
    timings: dict[str, float] = {}
    if not inplace:
        with timed(timings, "copy"):
            model = copy.deepcopy(model)
    with verification.buffers_kept(model):
        return _fuse_module(model, example_inputs, timings, verify=verify, atol=atol, rtol=rtol, reparam=reparam)


def _fuse_module(
    model: nn.Module,
    example_inputs: Any,
    timings: dict[str, float],
    *,
    verify: bool,
    atol: float | None,
    rtol: float | None,
    reparam: bool,
) -> FuseResult:
    """``fuse`` on an eval-mode module that is convfuse's to change."""
    with timed(timings, "trace"):
        tracing = _trace(model)
    found = find_matches(tracing.graphs, model, [u.module for u in tracing.untraced])  # read-only: once per fuse
    if not reparam and not found[0]:
        return _unchanged(model, example_inputs, timings, tracing, found, verify)
    with timed(timings, "reference"):
        if verify:
            parts = _probe_candidates(tracing)
            reference = verification.record_reference(model, example_inputs, probes=parts)
            batch, observation = reference.batches[0], reference.observation
        else:
            batch, observation = verification.observe(model, example_inputs, _probe_candidates(tracing))
    with remainders.recording() as kept:  # the folds' float64 rounding remainders, for the proof
        report = fuse_pass(model, observation, timings, tracing=tracing, found=found)
        if reparam:
            with timed(timings, "reparam"):
                _reparameterise(model, report, observation)
    if verify:
        probes = _probes_holding(tracing, report.fused)
        if probes and not all(_has_submodule(model, name) for name in probes):
            probes = None  # a probed part was merged away by reparam
        verify_fused(report, model, reference, atol=atol, rtol=rtol, probes=probes, remainders=kept)
    return FuseResult(model, report, batch)


def _unchanged(
    model: nn.Module, example_inputs: Any, timings: dict[str, float], tracing: Tracing,
    found: tuple[list[Match], list[Skipped]], verify: bool
) -> FuseResult:
    """The result where no BatchNorm has a foldable neighbour: the report says why for each,
    and nothing needs running, since nothing changes."""
    report = fuse_pass(model, None, timings, tracing=tracing, found=found)
    assert not report.fused
    if verify:
        report.verification = verification.Verification(
            passed=True, rule="unchanged", message="nothing was fused: the model is unchanged"
        )
    candidates = candidate_batches(model, example_inputs) if example_inputs is not None else []
    return FuseResult(model, report, candidates[0] if candidates else None)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _reparameterise(model: nn.Module, report: FuseReport, observation: Observation | None) -> None:
    """Replace every block of summed conv branches by one conv, and say so in the report."""
    merges = plan_merges(model, observation)
    for merge in merges:
        set_submodule(model, merge.module, merge.replacement)
        report.reparam.append(Merged(merge.module, merge.kind, merge.branches, merge.kernel))
        report.fused.extend(FusedPair(f"{merge.module} (merged conv)", norm, f"reparam:{merge.kind}") for norm in merge.norms)
    gone = tuple(f"{merge.module}." for merge in merges)
    report.skipped = [s for s in report.skipped if not s.norm.startswith(gone)] if gone else report.skipped
    report.norm_layers = Count(report.norm_layers.before, _count_norms(model))
    report.parameters = Count(report.parameters.before, _count_parameters(model))


def _trace(model: nn.Module) -> Tracing:
    return trace_model(model, keep=lambda m: is_norm(m) or is_producer(m))


def _probe_candidates(tracing: Tracing) -> list[str]:
    """Root modules of the traced parts below the model's root: their outputs are continuous
    tensors even where the model's final outputs (after NMS, top-k) are not."""
    return [traced.prefix for traced in tracing.graphs if traced.prefix]


def _probes_holding(tracing: Tracing, fused: list[FusedPair]) -> list[str] | None:
    """The probes that hold the fused pairs, or None where some pair lies in the root's graph."""
    folded = {pair.norm for pair in fused}
    probes, covered = [], set()
    for traced in tracing.graphs:
        inside = {traced.qualified(n.target) for n in traced.graph.nodes if n.op == "call_module"} & folded
        if inside and not traced.prefix:
            return None
        if inside:
            probes.append(traced.prefix)
            covered |= inside
    return probes if covered == folded and probes else None


def _count_norms(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_norm(m))


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fuse_pass(
    model: nn.Module,
    observation: Observation | None,
    timings: dict[str, float] | None = None,
    *,
    tracing: Tracing | None = None,
    found: tuple[list[Match], list[Skipped]] | None = None,
) -> FuseReport:
    """Trace, match, check, fold and rewrite ``model`` in place; verification is the caller's.

    ``observation`` (calls and input shapes from a real forward pass) lets the checks see
    what tracing cannot: a module called again from untraced code, a Linear's input rank.
    ``tracing``: the model's graphs where the caller traced it already; ``found``: what
    ``find_matches`` gave on them, where the caller looked already.
    """
    timings = {} if timings is None else timings
    report = FuseReport(
        norm_layers=Count(_count_norms(model), 0),
        parameters=Count(_count_parameters(model), 0),
    )
    if tracing is None:
        with timed(timings, "trace"):
            tracing = _trace(model)
    with timed(timings, "fold"):
        matches, unmatched = found or find_matches(tracing.graphs, model, [u.module for u in tracing.untraced])
        facts = Facts.gather(model, tracing.graphs, observation, tracing.uses)
        fused, rejected = fold_all(matches, facts)
    report.fused = fused
    report.untraced = tracing.untraced
    report.skipped = left_unfused(model, facts, fused, rejected + unmatched, tracing.untraced)
    report.norm_layers = Count(report.norm_layers.before, _count_norms(model))
    report.parameters = Count(report.parameters.before, _count_parameters(model))
    report.timings = timings
    return report
