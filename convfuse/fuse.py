"""The fusion pass: trace -> match -> check -> fold -> rewrite, and the ``fuse`` API around it.

This is the only module that changes a model. It rewrites the user's own module tree: the
producer gets the folded weight and bias (written into its existing parameters), and the
BatchNorm is replaced by ``nn.Identity`` (or, for a norm that also activates, by what its
forward does after normalising). The model keeps its class, names and methods.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from convfuse import verify as verification
from convfuse.errors import TrainingModeError, UsageError, VerificationError
from convfuse.fold.arithmetic import fuse_bn_conv_weights, fuse_conv_bn_weights
from convfuse.fold.norms import NormFold, NormNotFoldable, analyse_norm
from convfuse.fold.proofs import Stats, norm_proven, producer_proven
from convfuse.fold.reasons import Combine, Reason, Skipped
from convfuse.fold.table import Pattern, is_norm, is_producer, overrides_forward
from convfuse.graphs.fx_match import find_matches
from convfuse.graphs.fx_pairs import Facts, Match, Observation, why_skipped
from convfuse.graphs.reparam import plan_merges
from convfuse.graphs.tracing import Tracing, trace_model
from convfuse.inputs import candidate_batches
from convfuse.report import Count, FusedPair, FuseReport, Merged, timed
from convfuse.verify import remainders

__all__ = ["FuseResult", "fuse", "fuse_pass"]


@dataclass
class FuseResult:
    """The fused model (the user's class) and the report of what was done."""

    model: nn.Module
    report: FuseReport
    example_inputs: verification.Batch | None = None
    """The (args, kwargs) the model was verified on first; None where no inputs were available."""


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    reparam: bool = False,
) -> FuseResult:
    """Fold every BatchNorm that can be folded exactly into the conv/linear layer beside it.

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: inputs of one forward call: a tensor, a tuple of positional arguments,
            or a dict of keyword arguments. Without them, inputs are inferred from the first
            layer (its channels or features). Used to verify the result and to learn shapes.
        verify: compare the fused model's outputs with the original's and raise if they differ.
        atol, rtol: tolerances for verification, relative to each output's largest magnitude;
            by default they are derived from the model's own rounding error.
        inplace: fuse ``model`` itself (saves memory) rather than a copy. With ``inplace`` a
            failed verification leaves the model fused; without it ``model`` is never touched.
        reparam: also replace blocks that sum conv branches on one input (RepVGG, MobileOne)
            by a single conv. Changes the module structure more deeply: those blocks become
            an ``nn.Conv2d`` (or a Sequential of it and the block's activation).

    Returns:
        FuseResult with ``.model`` (same class as ``model``) and ``.report``.

    Raises:
        TrainingModeError: the model is in training mode.
        InputError: verification needs inputs and none could be built, or the model rejected them.
        VerificationError: the fused model's outputs differ (``.report`` says where).
    """
    if isinstance(model, torch.export.ExportedProgram):
        from convfuse.graphs.aten import fuse_exported

        if reparam:
            raise UsageError("reparam is supported for nn.Module models, not ExportedPrograms")
        return fuse_exported(model, example_inputs, verify=verify, atol=atol, rtol=rtol)
    if isinstance(model, torch.jit.ScriptModule):
        from convfuse.graphs.torchscript import fuse_scripted

        if reparam:
            raise UsageError("reparam is supported for nn.Module models, not TorchScript")
        return fuse_scripted(model, example_inputs, verify=verify, atol=atol, rtol=rtol, inplace=inplace)
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
    if not reparam and not find_matches(tracing.graphs, model, [u.module for u in tracing.untraced])[0]:
        return _unchanged(model, example_inputs, timings, tracing, verify)
    with timed(timings, "reference"):
        if verify:
            parts = _probe_candidates(tracing)
            reference = verification.record_reference(model, example_inputs, probes=parts)
            batch, observation = reference.batches[0], reference.observation
        else:
            batch, observation = verification.observe(model, example_inputs, _probe_candidates(tracing))
    with remainders.recording() as kept:  # the folds' float64 rounding remainders, for the proof
        report = fuse_pass(model, observation, timings, tracing=tracing)
        if reparam:
            with timed(timings, "reparam"):
                _reparameterise(model, report, observation)
    if verify:
        probes = _probes_holding(tracing, report.fused)
        if probes and not all(_has_submodule(model, name) for name in probes):
            probes = None  # a probed part was merged away by reparam
        verify_fused(report, model, reference, atol=atol, rtol=rtol, probes=probes, remainders=kept)
    return FuseResult(model, report, batch)


def _unchanged(model: nn.Module, example_inputs: Any, timings: dict[str, float], tracing: Tracing, verify: bool) -> FuseResult:
    """The result where no BatchNorm has a foldable neighbour: the report says why for each,
    and nothing needs running, since nothing changes."""
    report = fuse_pass(model, None, timings, tracing=tracing)
    assert not report.fused
    if verify:
        report.verification = verification.Verification(
            passed=True, rule="unchanged", message="nothing was fused: the model is unchanged"
        )
    candidates = candidate_batches(model, example_inputs) if example_inputs is not None else []
    return FuseResult(model, report, candidates[0] if candidates else None)


def verify_fused(
    report: FuseReport,
    model: Any,
    reference: verification.Reference,
    *,
    atol: float | None,
    rtol: float | None,
    probes: list[str] | None = None,
    remainders: verification.Remainders | None = None,
) -> None:
    """Compare the fused ``model`` with the reference into ``report``; VerificationError if it fails.
    ``remainders``: the folded weights' rounding remainders, for the float64 proof."""
    with timed(report.timings, "verify"):
        report.verification = verification.compare(
            model, reference, atol=atol, rtol=rtol, probes=probes, remainders=remainders
        )
    if not report.verification.passed:
        raise VerificationError(f"verification failed: {report.verification.message}", report)


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
        _set_submodule(model, merge.module, merge.replacement)
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
) -> FuseReport:
    """Trace, match, check, fold and rewrite ``model`` in place; verification is the caller's.

    ``observation`` (calls and input shapes from a real forward pass) lets the checks see
    what tracing cannot: a module called again from untraced code, a Linear's input rank.
    ``tracing``: the model's graphs where the caller traced it already.
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
        matches, unmatched = find_matches(tracing.graphs, model, [u.module for u in tracing.untraced])
        facts = Facts.gather(model, tracing.graphs, observation, tracing.uses)
        fused, rejected = _fold_all(matches, facts)
    report.fused = fused
    report.untraced = tracing.untraced
    report.skipped = _left_unfused(model, facts, fused, rejected + unmatched, tracing.untraced)
    report.norm_layers = Count(report.norm_layers.before, _count_norms(model))
    report.parameters = Count(report.parameters.before, _count_parameters(model))
    report.timings = timings
    return report


def _fold_all(matches: list[Match], facts: Facts) -> tuple[list[FusedPair], list[Skipped]]:
    """Fold each norm into its first candidate that passes every check.

    A norm's candidate after its producer is preferred to the one before the next layer: all
    after-candidates are tried first. (A conv may absorb a norm on each side; the two folds
    scale different axes of its weight and commute.)
    """
    candidates: dict[str, list[Match]] = {}
    for match in matches:
        candidates.setdefault(match.norm, []).append(match)
    fused: dict[str, FusedPair] = {}
    first_reason: dict[str, Skipped] = {}
    for norm_first in (False, True):
        for norm_name, options in candidates.items():
            if norm_name in fused:
                continue
            for match in options:
                if match.norm_first != norm_first:
                    continue
                outcome = _try_fold(match, facts)
                if outcome is None:
                    fused[norm_name] = FusedPair(match.producer, match.norm, match.kind)
                    break
                first_reason.setdefault(norm_name, outcome)
    rejected = [skip for name, skip in first_reason.items() if name not in fused]
    order = {m.norm: i for i, m in enumerate(matches)}
    return sorted(fused.values(), key=lambda pair: order[pair.norm]), rejected


def _try_fold(match: Match, facts: Facts) -> Skipped | None:
    """Fold one match into the model, or say why not (the model is then unchanged)."""
    why = why_skipped(match, facts)
    if why is not None:
        return Skipped(match.norm, match.producer, *why)
    norm = facts.modules[match.norm]
    norm_custom = overrides_forward(norm, match.pattern.norm)
    try:
        fold = analyse_norm(norm, norm_custom)
    except NormNotFoldable as error:
        return Skipped(match.norm, match.producer, Reason.NORM_FORWARD, str(error))
    if match.norm_first and not fold.normalises_only:
        return Skipped(match.norm, match.producer, Reason.NORM_DOES_MORE_BEFORE)
    if norm_custom and not norm_proven(norm, fold, _seen_shape(facts, match.norm)):
        return Skipped(match.norm, match.producer, Reason.NOT_PROVEN)
    updates = []
    for index, (name, pattern) in enumerate(zip(match.producers, match.patterns)):
        producer = facts.modules[name]
        stats = _stats_for(match, index, fold, facts)
        weight, bias = _folded_weights(match, pattern, producer, stats)
        if overrides_forward(producer, pattern.producer) and not producer_proven(
            producer, stats, weight, bias, norm_first=match.norm_first, shape=_seen_shape(facts, name)
        ):
            return Skipped(match.norm, match.producer, Reason.NOT_PROVEN)
        updates.append((producer, weight, bias))
    for producer, weight, bias in updates:
        _write(producer, weight, bias)
    _replace(facts, match.norm, fold.remainder)
    return None


def _stats_for(match: Match, index: int, fold: NormFold, facts: Facts) -> Stats:
    """The part of the norm that producer ``index`` absorbs.

    A sum's terms are all scaled, but only the first takes the shift; a concatenation's parts
    each take their own channel slice.
    """
    stats = (fold.running_mean, fold.running_var, fold.eps, fold.weight, fold.bias)
    if match.combine == Combine.SUM and index > 0:
        return torch.zeros_like(fold.running_mean), fold.running_var, fold.eps, fold.weight, None
    if match.combine == Combine.CAT:
        sizes = [_out_channels(facts.modules[name]) for name in match.producers]
        start = sum(sizes[:index])
        part = slice(start, start + sizes[index])
        return tuple(t[part] if isinstance(t, Tensor) else t for t in stats)  # type: ignore[return-value]
    return stats


def _out_channels(producer: nn.Module) -> int:
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels


def _folded_weights(match: Match, pattern: Pattern, producer: nn.Module, stats: Stats) -> tuple[Tensor, Tensor]:
    groups = getattr(producer, "groups", 1)
    # a weight an earlier fold of this pass wrote is read at float64 precision (no double rounding)
    weight, bias = remainders.exact(producer.weight), remainders.exact(producer.bias)
    if match.norm_first:
        return fuse_bn_conv_weights(weight, bias, *stats, groups=groups)
    return fuse_conv_bn_weights(weight, bias, *stats, transpose=pattern.transpose, groups=groups)


def _write(producer: nn.Module, weight: Tensor, bias: Tensor) -> None:
    """Store float64 ``weight``/``bias`` in the producer's own dtype, device and memory layout."""
    with torch.no_grad():
        producer.weight.copy_(weight)
        if producer.bias is None:
            reference = producer.weight
            producer.bias = nn.Parameter(
                bias.to(dtype=reference.dtype, device=reference.device), requires_grad=reference.requires_grad
            )
        else:
            producer.bias.copy_(bias)
    remainders.keep(producer.weight, weight)
    remainders.keep(producer.bias, bias)


def _replace(facts: Facts, name: str, replacement: nn.Module) -> None:
    replacement.training = facts.modules[name].training  # its own flag; the act modules keep theirs
    _set_submodule(facts.modules[""], name, replacement)
    facts.modules[name] = replacement


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _seen_shape(facts: Facts, name: str) -> tuple[int, ...] | None:
    seen = facts.observation.input_shapes.get(name) if facts.observation else None
    return seen[0] if seen else None


def _left_unfused(
    model: nn.Module,
    facts: Facts,
    fused: list[FusedPair],
    skipped: list[Skipped],
    untraced: list,
) -> list[Skipped]:
    """One entry per BatchNorm still in the model: the reason found, else why none was found."""
    done = {pair.norm for pair in fused}
    by_norm: dict[str, Skipped] = {}
    for skip in skipped:
        if skip.norm not in done:
            by_norm.setdefault(skip.norm, skip)
    result = []
    untraced_names = [u.module for u in untraced]
    for name, module in model.named_modules():
        if not is_norm(module) or name in done:
            continue
        if name in by_norm:
            result.append(by_norm[name])
        elif facts.observation is not None and facts.observation.calls[name] == 0:
            result.append(Skipped(name, None, Reason.NOT_CALLED))
        else:
            owner = next((u for u in untraced_names if u == "(model)" or name.startswith(u + ".")), None)
            if owner is None:  # traced code never calls it
                result.append(Skipped(name, None, Reason.NOT_CALLED))
            else:
                result.append(Skipped(name, None, Reason.NOT_TRACED, f"called from {owner}"))
    return result
