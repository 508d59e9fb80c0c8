"""Parity of the graph formats: BatchNorms removed per format (nn.Module, ExportedProgram,
TorchScript) over the torchvision classification zoo, plus FrozenBatchNorm2d resnet18 and a small
model with BN before a conv, after a sum, after a channel concat and after a Linear.

Every model is built with ``weights=None``, its BatchNorm (and FrozenBatchNorm2d) statistics
randomised, in eval mode, on one 1x3x64x64 input (larger where a model needs it). Each format is
fused with ``convfuse.fuse`` (its own verification on), and its output is also compared here with
the original module's (``_common.REL_TOL`` of the largest magnitude). A format whose conversion
fails (``torch.export.export`` or ``torch.jit.script`` raise) is "n/a" for that model and left out
of the totals; a fuse that raises or an output that differs is "crashed"/"WRONG". Models without
BatchNorm-like layers, and those over 100M parameters (slow to export on two cores), are listed
but not run.

The totals compare, over the models where all three formats converted, the BatchNorms removed in
each graph format with the nn.Module path's.

Exit status: 1 when any format produced a wrong output or crashed, else 0.

    python benchmarks/formats.py [--quick] [--only NAME ...] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import convfuse
from benchmarks._common import REL_TOL, leaves
from convfuse.fold.table import is_norm
from convfuse.testing import randomize_bn
from tests.models import ParityNet

FORMATS = ("module", "exported", "torchscript")
QUICK = (
    "resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x1_0",
)
SIZES = {"inception_v3": 299, "googlenet": 96}
MAX_PARAMETERS = 100_000_000


@dataclass
class Row:
    name: str
    norms: int
    removed: dict[str, int | None] = field(default_factory=dict)  # None: the format is n/a
    status: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _specs() -> list[tuple[str, Callable[[], nn.Module], int]]:
    specs = []
    for name in torchvision.models.list_models(module=torchvision.models):
        specs.append((name, lambda n=name: torchvision.models.get_model(n, weights=None), SIZES.get(name, 64)))
    specs.append(("resnet18 (FrozenBatchNorm2d)",
                  lambda: torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d), 64))
    specs.append(("ParityNet (norm first, sum, concat, Linear, frozen)", ParityNet, 16))
    return specs


def _convert(model: nn.Module, kind: str, x: torch.Tensor):
    if kind == "exported":
        return torch.export.export(model, (x,))
    if kind == "torchscript":
        return torch.jit.script(model)
    return model


def _measure(name: str, build: Callable[[], nn.Module], size: int) -> Row:
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    x = torch.randn(1, 3, size, size)
    row = Row(name, sum(1 for m in model.modules() if is_norm(m)))
    if row.norms == 0 or sum(p.numel() for p in model.parameters()) > MAX_PARAMETERS:
        row.status = dict.fromkeys(FORMATS, "not run")
        return row
    with torch.no_grad():
        expected = model(x)
    start = time.perf_counter()
    for kind in FORMATS:
        try:
            converted = _convert(model, kind, x)
        except Exception as error:  # noqa: BLE001 - a conversion failure only makes the format n/a
            row.removed[kind], row.status[kind] = None, f"n/a ({type(error).__name__})"
            continue
        try:
            result = convfuse.fuse(converted, x)
            fused = result.model.module() if kind == "exported" else result.model
            with torch.no_grad():
                actual = fused(x)
        except Exception as error:  # noqa: BLE001 - reported as a crash
            row.removed[kind], row.status[kind] = 0, f"crashed ({type(error).__name__}: {str(error)[:60]})"
            continue
        error = _relative_error(expected, actual)
        row.removed[kind] = len(result.report.fused)
        row.status[kind] = "ok" if error <= REL_TOL else f"WRONG ({error:.1e})"
    row.seconds = time.perf_counter() - start
    return row


def _relative_error(expected: object, actual: object) -> float:
    """The largest relative difference over the float tensors of two nested outputs (a scripted
    GoogLeNet returns its named tuple where the module returns the logits: the first leaves)."""
    pairs = list(zip(
        [t for _, t in leaves(expected) if isinstance(t, torch.Tensor)],
        [t for _, t in leaves(actual) if isinstance(t, torch.Tensor)],
    ))
    if not pairs:
        return float("inf")
    return max((b - a).abs().max().item() / max(a.abs().max().item(), 1e-30) for a, b in pairs)


def _table(rows: list[Row]) -> str:
    lines = [
        "| model | BatchNorms | nn.Module | ExportedProgram | TorchScript |",
        "|:---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = []
        for kind in FORMATS:
            status = row.status.get(kind, "")
            removed = row.removed.get(kind)
            if removed is None:
                cells.append(status)
            else:
                cells.append(f"{removed}" + ("" if status == "ok" else f" {status}"))
        lines.append(f"| {row.name} | {row.norms} | " + " | ".join(cells) + " |")
    complete = [r for r in rows if all(r.removed.get(k) is not None for k in FORMATS)]
    totals = {k: sum(r.removed[k] or 0 for r in complete) for k in FORMATS}
    base = totals["module"] or 1
    lines.append(
        f"| **total, {len(complete)} models where every format converted** | {sum(r.norms for r in complete)} | "
        + " | ".join(
            f"**{totals[k]}**" + ("" if k == "module" else f" ({100 * totals[k] / base:.1f}%)") for k in FORMATS
        )
        + " |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="six zoo models and the extra cases")
    parser.add_argument("--only", nargs="*", help="only these model names")
    parser.add_argument("--output", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    specs = _specs()
    if args.quick:
        specs = [s for s in specs if s[0] in QUICK or not s[0].islower() or " " in s[0]]
    if args.only:
        specs = [s for s in specs if s[0] in args.only]
    rows = []
    for name, build, size in specs:
        row = _measure(name, build, size)
        print(f"{name}: {row.norms} norms, removed {row.removed}, {row.status} ({row.seconds:.1f} s)", flush=True)
        rows.append(row)
    table = _table(rows)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    bad = any(s.startswith(("WRONG", "crashed")) for r in rows for s in r.status.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
