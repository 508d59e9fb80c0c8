"""Folding each match of an fx graph into the user's module tree: the weights from the fold
arithmetic (``convfuse.fold``) written into the producer's own parameters, the norm replaced by
``nn.Identity`` (or what its forward does after normalising), and a reason for every norm left.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convfuse.fold.arithmetic import fold_weights, split_stats
from convfuse.fold.norms import NormNotFoldable, analyse_norm
from convfuse.fold.proofs import norm_proven, producer_proven
from convfuse.fold.reasons import Reason, Skipped
from convfuse.fold.table import is_norm, overrides_forward
from convfuse.graphs.fx_pairs import Facts, Match, why_skipped
from convfuse.report import FusedPair
from convfuse.verify import remainders


def fold_all(matches: list[Match], facts: Facts) -> tuple[list[FusedPair], list[Skipped]]:
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
    producers = [facts.modules[name] for name in match.producers]
    stats = (fold.running_mean, fold.running_var, fold.eps, fold.weight, fold.bias)
    folded = fold_weights(
        # a weight an earlier fold of this pass wrote is read at float64 precision (no double rounding)
        [(remainders.exact(p.weight), remainders.exact(p.bias), pattern.transpose, getattr(p, "groups", 1))
         for p, pattern in zip(producers, match.patterns)],
        stats, combine=match.combine, norm_first=match.norm_first,
    )
    sizes = [_out_channels(producer) for producer in producers]
    updates = []
    for index, (name, pattern, producer, (weight, bias)) in enumerate(
        zip(match.producers, match.patterns, producers, folded)
    ):
        if overrides_forward(producer, pattern.producer) and not producer_proven(
            producer, split_stats(stats, index, match.combine, sizes), weight, bias,
            norm_first=match.norm_first, shape=_seen_shape(facts, name),
        ):
            return Skipped(match.norm, match.producer, Reason.NOT_PROVEN)
        updates.append((producer, weight, bias))
    for producer, weight, bias in updates:
        _write(producer, weight, bias)
    _replace(facts, match.norm, fold.remainder)
    return None


def _out_channels(producer: nn.Module) -> int:
    return producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels


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
    set_submodule(facts.modules[""], name, replacement)
    facts.modules[name] = replacement


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _seen_shape(facts: Facts, name: str) -> tuple[int, ...] | None:
    seen = facts.observation.input_shapes.get(name) if facts.observation else None
    return seen[0] if seen else None


def left_unfused(
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
