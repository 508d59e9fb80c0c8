"""The fused module structure, rebuilt on a fresh model of the same architecture from the report.

Fused weights do not fit the unfused architecture: the folded BatchNorms are gone, producers
without a bias gained one, a norm subclass that also activates became a Sequential of what it does
after normalising, and re-parameterised blocks became one conv. Loading them into the original
model with ``strict=False`` would silently compute something else; ``apply_fused_structure`` makes a
freshly built model take them with ``strict=True``. It replays the fuse's changes from the report,
rebuilding each replacement from the fresh model's own modules, and checks the rebuild against what
the report recorded (``structure``). Nothing changes unless the whole report fits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse.errors import UsageError
from convfuse.fold.norms import NormNotFoldable, analyse_norm
from convfuse.fold.table import PATTERNS, is_norm, is_producer, overrides_forward
from convfuse.report import FuseReport, Replaced

__all__ = ["apply_fused_structure", "describe_structure"]

_REPARAM_KIND = "reparam:"
_NORM_BASES = tuple(dict.fromkeys(pattern.norm for pattern in PATTERNS))


@dataclass
class _Change:
    """One change to make: ``apply`` does it, once every change of the report has been checked."""

    module: str
    apply: Callable[[], None]


def apply_fused_structure(model: nn.Module, report: FuseReport | Mapping[str, Any] | str | os.PathLike[str]) -> nn.Module:
    """Give a freshly built ``model`` the structure of its fused version, so that it takes the fused
    state_dict with ``load_state_dict(strict=True)``.

    Args:
        model: the architecture the report was made for, freshly built (any weights).
        report: the fuse's report: a ``FuseReport``, its ``to_dict()``, or the path of the JSON
            report (``convfuse ... --report report.json``).

    Returns:
        ``model``, changed in place: folded norms replaced (``nn.Identity``, or a Sequential of what
        a norm subclass does after normalising), a zero bias added to producers without one, merged
        blocks replaced by their conv.

    Raises:
        UsageError: the report does not fit the model (a module it names is missing or of another
            kind, or a rebuilt module differs from the one recorded); the model is then unchanged.
    """
    data = _as_dict(report)
    recorded = {entry["module"]: entry for entry in data.get("structure", [])}
    changes: list[_Change] = []
    merged = _planned_merges(model, data.get("reparam", []), recorded, changes)
    modules = dict(model.named_modules())
    for pair in data.get("fused", []):
        if pair["kind"].startswith(_REPARAM_KIND):
            continue
        if any(pair["norm"].startswith(block + ".") for block in merged):
            continue
        for producer in _producer_names(pair):
            changes.append(_bias_change(modules, producer, pair))
        changes.append(_norm_change(modules, pair, recorded))
    for change in changes:
        change.apply()
    return model


def describe_structure(model: nn.Module, report: FuseReport) -> list[Replaced]:
    """What each module the fuse replaced became in the fused ``model``, for ``report.structure``."""
    names = [pair.norm for pair in report.fused if not pair.kind.startswith(_REPARAM_KIND)]
    names += [merge.module for merge in report.reparam]
    modules = dict(model.named_modules())
    return [_replaced(name, modules[name]) for name in names if name in modules]


def _replaced(name: str, module: nn.Module) -> Replaced:
    return Replaced(name, type(module).__name__, {child: type(m).__name__ for child, m in module.named_children()})


def _as_dict(report: FuseReport | Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    if isinstance(report, FuseReport):
        return report.to_dict()
    if isinstance(report, Mapping):
        return report
    path = Path(report)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: cannot be read as a convfuse JSON report ({error})") from error
    if not isinstance(data, dict) or "fused" not in data:
        raise UsageError(f"{path}: not a convfuse JSON report (it has no 'fused' list)")
    return data


def _misfit(module: str, what: str) -> UsageError:
    return UsageError(
        f"the report does not fit this model: {what} (at {module}); build the architecture the report was made "
        "for, freshly (a model that already took the fused structure cannot take it again)"
    )


def _producer_names(pair: Mapping[str, Any]) -> list[str]:
    """The producers of a fused pair as the report joins them: ``a + b`` (a sum), ``a, b`` (a concat)."""
    return [name.strip() for part in pair["producer"].split(" + ") for name in part.split(", ")]


def _bias_change(modules: dict[str, nn.Module], name: str, pair: Mapping[str, Any]) -> _Change:
    producer = modules.get(name)
    if producer is None or not is_producer(producer):
        raise _misfit(name, f"{pair['norm']} was folded into {name}, which is not a conv or linear layer here")
    if producer.bias is not None:
        return _Change(name, lambda: None)
    weight = producer.weight
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels

    def add_bias() -> None:
        if producer.bias is None:  # a producer of two folds gets one bias
            producer.bias = nn.Parameter(torch.zeros(channels, dtype=weight.dtype, device=weight.device),
                                         requires_grad=weight.requires_grad)

    return _Change(name, add_bias)


def _norm_change(modules: dict[str, nn.Module], pair: Mapping[str, Any], recorded: Mapping[str, Any]) -> _Change:
    name = pair["norm"]
    norm = modules.get(name)
    if norm is None or not is_norm(norm):
        found = "no such module" if norm is None else f"a {type(norm).__name__}, not a BatchNorm"
        raise _misfit(name, f"the report folded the norm {name}, but the model has {found}")
    base = next((cls for cls in _NORM_BASES if isinstance(norm, cls)), None)
    if base is None:
        raise _misfit(name, f"the norm {name} is a {type(norm).__name__}, which convfuse does not fold")
    try:
        replacement = analyse_norm(norm, overrides_forward(norm, base)).remainder
    except NormNotFoldable as error:
        raise _misfit(name, f"the norm's forward cannot be reduced to one BatchNorm here ({error})") from error
    replacement.training = norm.training
    _check_recorded(name, replacement, recorded)
    return _Change(name, lambda: _set_submodule(modules[""], name, replacement))


def _planned_merges(
    model: nn.Module, merges: list[Mapping[str, Any]], recorded: Mapping[str, Any], changes: list[_Change]
) -> list[str]:
    """The re-parameterised blocks, rebuilt from the fresh model's own convs (weights do not matter:
    the state_dict overwrites them); their changes are appended to ``changes``."""
    if not merges:
        return []
    from convfuse.graphs.reparam import plan_merges

    with _eval(model):  # branches are merged from eval-mode norms
        plans = {plan.module: plan for plan in plan_merges(model, None)}
    for merge in merges:
        name = merge["module"]
        plan = plans.get(name)
        if plan is None or plan.replacement is None:
            raise _misfit(name, f"the report merged the branches of {name} ({merge['kind']}), which this model "
                                "has no mergeable block for")
        if (plan.kind, plan.branches, list(plan.kernel)) != (merge["kind"], merge["branches"], list(merge["kernel"])):
            raise _misfit(name, f"the report merged a {merge['kind']} of {merge['branches']} branches, this model "
                                f"has a {plan.kind} of {plan.branches}")
        replacement = plan.replacement
        replacement.train(model.get_submodule(name).training)
        _check_recorded(name, replacement, recorded)
        changes.append(_Change(name, lambda n=name, r=replacement: _set_submodule(model, n, r)))
    return [merge["module"] for merge in merges]


def _check_recorded(name: str, replacement: nn.Module, recorded: Mapping[str, Any]) -> None:
    entry = recorded.get(name)
    if entry is None:
        return
    rebuilt = _replaced(name, replacement)
    if (rebuilt.type, rebuilt.children) != (entry["type"], dict(entry.get("children", {}))):
        raise _misfit(name, f"the fused model has a {_shown(entry['type'], entry.get('children', {}))} there, "
                            f"this model would get a {_shown(rebuilt.type, rebuilt.children)}")


def _shown(type_name: str, children: Mapping[str, str]) -> str:
    inner = ", ".join(f"{child}: {kind}" for child, kind in children.items())
    return f"{type_name}({inner})" if inner else type_name


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the ``with`` block; every module's own training flag restored after."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)

