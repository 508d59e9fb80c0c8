"""Verification: how close a correct fold stays to the bound, per dtype, and what it costs.

For resnet50 (weights=None, BN statistics randomised) in float32, bfloat16 and float16, on CPU:
the fused model's max relative error against the original (relative to the output's scale), the
bound convfuse's default rule allowed (8x the original's own rounding error plus a floor), their
ratio (a correct fold should sit well below 1), and the time of the reference runs (original,
rerun, float64) and of the comparison, in forward passes of the same batch.

    python benchmarks/verification.py [--quick] [--threads 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from _common import emit, header, markdown_table  # noqa: E402

import convfuse  # noqa: E402
from convfuse.testing import randomize_bn  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 112x112 input instead of 224x224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    size = 112 if args.quick else 224
    rows = []
    for dtype in DTYPES:
        model = randomize_bn(torchvision.models.resnet50()).eval().to(dtype)
        x = torch.randn(2, 3, size, size).to(dtype)
        forward = _forward_seconds(model, x)
        result = convfuse.fuse(model, x, inplace=True)
        v, t = result.report.verification, result.report.timings
        rows.append([
            str(dtype).removeprefix("torch."), f"{v.max_rel_error:.2e}", f"{v.rtol:.2e}",
            f"{v.max_rel_error / v.rtol:.2f}", f"{forward * 1000:.0f}", f"{t['reference'] / forward:.1f}",
            f"{t['verify'] / forward:.1f}", f"{(t['trace'] + t['fold']) / forward:.2f}",
        ])
        print(f"{dtype}: done", file=sys.stderr)
    columns = ["dtype", "max rel error", "allowed", "ratio", "forward ms (batch 2)", "reference / fwd",
               "compare / fwd", "trace+fold / fwd"]
    text = (
        header("Verification on resnet50: error of a correct fold against the bound, and cost",
               f"input 2x3x{size}x{size}")
        + "\n" + markdown_table(columns, rows) + "\n"
    )
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
