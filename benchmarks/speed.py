"""Fused-model speed: is a model fused by convfuse as fast as it can be?

For each model (torchvision, weights=None, BN statistics randomised, eval) and batch size, on CPU
with 2 threads, one process times the forward pass of

* original  the model as built;
* convfuse  ``convfuse.fuse(model, x).model``;
* limit     the physical limit of this transformation: a copy of the original in which exactly
            the BatchNorms convfuse folded (``report.fused[i].norm``) are replaced by
            ``nn.Identity``, with the convolutions' weights untouched (it computes something
            else, but no folded model can do less work);
* torch.fx  ``torch.fx.experimental.optimization.fuse(model)`` where it works.

Repetitions are interleaved (A, B, C, D, B, C, D, A, ...: the order rotates every round, so no
variant always runs right after another), after a warm-up of each; the "ms" columns are medians
over the repetitions. The ratios are medians of per-round ratios (each round times
every variant once, so slow drifts of the machine cancel): ``fused/limit`` is the goal's ratio
(DESIGN.md: at most 1.01); ``orig/fused`` is the speed-up convfuse gives; ``torch.fx/limit`` the
same goal for PyTorch's fuser; ``IQR fused/limit`` is the interquartile range of the per-round
fused/limit ratios (noise: a deviation from 1 well inside it means nothing).

Exit status: 1 when convfuse's result gave a wrong output (> 1e-4 of the output's scale), else 0.

    python benchmarks/speed.py [--quick] [--threads 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torchvision
from _common import REL_TOL, difference, emit, fmt_err, header, markdown_table, randomize_bn, short_error
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse

import convfuse

warnings.filterwarnings("ignore")

MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121"]
BATCHES = [1, 8]
QUICK_MODELS = ["resnet50", "mobilenet_v3_large", "regnet_y_400mf"]
QUICK_BATCHES = [1]
GOAL = 1.01


def without_norms(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` with the modules called ``names`` replaced by nn.Identity."""
    limit = copy.deepcopy(model)
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = limit.get_submodule(parent_name) if parent_name else limit
        setattr(parent, attribute, nn.Identity())
    return limit


def _once(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


@dataclass
class Timing:
    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        values = self.times.get(name)
        return statistics.median(values) if values else None

    def paired(self, a: str, b: str) -> list[float]:
        """Per-round ratios a/b (each round times every variant once, so drifts cancel)."""
        if a not in self.times or b not in self.times:
            return []
        return [x / y for x, y in zip(self.times[a], self.times[b])]

    def ratio(self, a: str, b: str) -> float | None:
        ratios = self.paired(a, b)
        return statistics.median(ratios) if ratios else None

    def spread(self, a: str, b: str) -> float | None:
        """Interquartile range of the per-round ratios a/b."""
        ratios = self.paired(a, b)
        if len(ratios) < 4:
            return None
        q = statistics.quantiles(ratios, n=4)
        return q[2] - q[0]


def interleaved(
    variants: dict[str, nn.Module], x: torch.Tensor, budget_s: float, min_reps: int, max_reps: int
) -> Timing:
    """Time the variants round-robin (rotating the order each round) after a warm-up."""
    names = list(variants)
    with torch.no_grad():
        for model in variants.values():  # warm-up: allocator, oneDNN primitives, caches
            for _ in range(3):
                model(x)
        estimate = sum(_once(m, x) for m in variants.values())
        reps = int(max(min_reps, min(max_reps, budget_s / max(estimate, 1e-6))))
        timing = Timing({name: [] for name in names})
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                timing.times[name].append(_once(variants[name], x))
    return timing


@dataclass
class Row:
    model: str
    batch: int
    fused: int = 0
    norms: int = 0
    torch_fused: int | None = None
    timing: Timing | None = None
    error: float | None = None
    torch_error: float | None = None
    wrong: bool = False
    problem: str = ""
    torch_problem: str = ""


def measure(name: str, batch: int, budget_s: float, min_reps: int, max_reps: int) -> Row:
    row = Row(name, batch)
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.get_model(name, weights=None), 0).eval()
    x = torch.randn((batch, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    try:
        result = convfuse.fuse(model, x)
    except Exception as error:  # noqa: BLE001
        row.wrong, row.problem = True, "convfuse: " + short_error(error)
        return row
    fused = result.model
    row.fused = len(result.report.fused)
    row.norms = result.report.norm_layers.before
    with torch.no_grad():
        diff = difference(reference, fused(x))
    row.error = diff.rel_error
    if diff.wrong:
        row.wrong, row.problem = True, diff.problem or f"convfuse output differs by {fmt_err(diff.rel_error)}"
    variants = {
        "original": model,
        "convfuse": fused,
        "limit": without_norms(model, [p.norm for p in result.report.fused]),
    }
    try:
        fx_fused = torch_fuse(model)
        with torch.no_grad():
            fx_diff = difference(reference, fx_fused(x))
        row.torch_error = fx_diff.rel_error
        row.torch_fused = sum(1 for m in model.modules() if convfuse.graphs.fx_pairs.is_norm(m)) - sum(
            1 for m in fx_fused.modules() if convfuse.graphs.fx_pairs.is_norm(m)
        )
        if fx_diff.wrong:
            row.torch_problem = "torch.fx fuse: wrong output"
        variants["torch.fx"] = fx_fused
    except Exception as error:  # noqa: BLE001
        row.torch_problem = "torch.fx fuse: " + short_error(error)
    row.timing = interleaved(variants, x, budget_s, min_reps, max_reps)
    return row


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(rows: list[Row]) -> str:
    columns = [
        "model",
        "batch",
        "BN fused (torch.fx)",
        "original ms",
        "convfuse ms",
        "limit ms",
        "torch.fx ms",
        "fused/limit",
        "orig/fused",
        "torch.fx/limit",
        "IQR fused/limit",
        "reps",
    ]
    table = []
    for row in rows:
        t = row.timing
        if t is None:
            table.append([row.model, row.batch, "-", *["-"] * 8, row.problem])
            continue
        med = {name: t.median(name) for name in ("original", "convfuse", "limit", "torch.fx")}
        spread = t.spread("convfuse", "limit")
        table.append(
            [
                row.model,
                row.batch,
                f"{row.fused}/{row.norms}" + ("" if row.torch_fused is None else f" (fx {row.torch_fused})"),
                _ms(med["original"]),
                _ms(med["convfuse"]),
                _ms(med["limit"]),
                _ms(med["torch.fx"]),
                _ratio(t.ratio("convfuse", "limit")),
                _ratio(t.ratio("original", "convfuse")),
                _ratio(t.ratio("torch.fx", "limit")),
                "-" if spread is None else f"{spread:.3f}",
                len(t.times["limit"]),
            ]
        )
    text = markdown_table(columns, table, "lr" + "r" * (len(columns) - 2))
    notes = [
        f"{r.model} b{r.batch}: {r.problem or r.torch_problem}" for r in rows if r.problem or r.torch_problem
    ]
    errors = [
        f"{r.model} b{r.batch}: convfuse {fmt_err(r.error)}, torch.fx {fmt_err(r.torch_error)}"
        for r in rows
        if r.timing is not None
    ]
    text += (
        f"\nMax relative output error vs the original (wrong above {REL_TOL:g}): " + "; ".join(errors) + "\n"
    )
    if notes:
        text += "\nProblems: " + " | ".join(notes) + "\n"
    ratios = [r.timing.ratio("convfuse", "limit") for r in rows if r.timing is not None]
    if ratios:
        worst = max(ratios)
        text += (
            f"\nWorst fused/limit: {worst:.3f} (goal <= {GOAL}); median over rows "
            f"{statistics.median(ratios):.3f}.\n"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} at batch 1, shorter")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help="torchvision model names (default: %(default)s)"
    )
    parser.add_argument("--batches", nargs="+", type=int, metavar="N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget", type=float, help="seconds of timed forwards per model and batch (default 30, quick 6)"
    )
    parser.add_argument("--output", metavar="FILE.md", help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    budget = args.budget or (6.0 if args.quick else 30.0)
    min_reps, max_reps = (5, 30) if args.quick else (11, 200)

    started = time.perf_counter()
    rows = []
    for name in models:
        for batch in batches:
            row = measure(name, batch, budget, min_reps, max_reps)
            rows.append(row)
            t = row.timing
            print(
                f"[{time.perf_counter() - started:5.0f}s] {name} b{batch}: "
                + (f"fused/limit {_ratio(t.ratio('convfuse', 'limit'))}" if t else row.problem),
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started
    text = header(
        "Fused-model speed: convfuse vs the physical limit",
        f"input 3x224x224, medians of interleaved repetitions, run took {elapsed:.0f} s",
    )
    text += "\n" + render(rows) + "\n"
    emit(text, args.output)
    return 1 if any(r.wrong for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
