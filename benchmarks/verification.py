"""Verification: the smallest mis-fold it catches per dtype, how close a correct fold stays to
the bounds, and what it costs.

Resolution: torchvision resnet18 (weights=None, BN statistics randomised), input 1x3x96x96, in
float32, float16 and bfloat16. One mid-network layer (layer2.1.conv1) is folded wrongly by d,
relative to the layer's own magnitude: its folded weight scaled by (1 + d), or its folded bias
shifted by d x max|bias|. Injected in the fold arithmetic (the float64 result of
``fuse_conv_bn_weights``, before it is rounded and written) and at the write step (after the
fold was written, the layer's parameter overwritten with the rounding of the perturbed float64
value: a bug in writing or in the rewrite). d runs down from 1e-1 by decades to 1e-10; each cell
is the smallest d caught, with "(all)" where every d was caught. At the write step an injection
may vanish in rounding to the dtype (the written tensor is then bit-identical to a correct one:
nothing to catch); the column counts the d's whose error survived rounding and how many of them
were caught.

Correct fold: resnet50, 2x3x224x224 (112 with --quick): the float64 proof's error against its
bound, the rounding check's ratio (the fused model's error against float64 over the original's
own), and the cost of the reference runs and of the comparison in forward passes of the same
batch in the model's dtype.

    python benchmarks/verification.py [--quick] [--threads 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import importlib
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

arithmetic = importlib.import_module("convfuse.fold.arithmetic")  # the fold math
fx_fold = importlib.import_module("convfuse.graphs.fx_fold")  # the write step

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DELTAS = tuple(10.0 ** -k for k in range(1, 11))
TARGET = "layer2.1.conv1"


def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _perturbed(weight: torch.Tensor, bias: torch.Tensor, what: str, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    if what == "weight":
        return weight * (1 + d), bias
    return weight, bias + d * bias.abs().max()


def _caught(dtype: torch.dtype, where: str, what: str, d: float, x: torch.Tensor) -> tuple[bool, bool]:
    """(caught, survived rounding) for one injection."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18()).eval().to(dtype)
    target = model.get_submodule(TARGET)
    survived = [where == "arithmetic"]
    original_fold, original_write = arithmetic.fuse_conv_bn_weights, fx_fold._write

    def wrong_fold(conv_w, *args, **kwargs):
        weight, bias = original_fold(conv_w, *args, **kwargs)
        return _perturbed(weight, bias, what, d) if conv_w is target.weight else (weight, bias)

    def wrong_write(producer, weight, bias):
        original_write(producer, weight, bias)
        if producer is target:
            w, b = _perturbed(weight, bias, what, d)
            with torch.no_grad():
                before = (producer.weight.clone(), producer.bias.clone())
                producer.weight.copy_(w)
                producer.bias.copy_(b)
            survived[0] = not (torch.equal(before[0], producer.weight) and torch.equal(before[1], producer.bias))

    arithmetic.fuse_conv_bn_weights = wrong_fold if where == "arithmetic" else original_fold
    fx_fold._write = wrong_write if where == "write" else original_write
    try:
        convfuse.fuse(model, x.to(dtype), inplace=True)
        caught = False
    except convfuse.VerificationError:
        caught = True
    finally:
        arithmetic.fuse_conv_bn_weights, fx_fold._write = original_fold, original_write
    return caught, survived[0]


def _resolution(dtype: torch.dtype, deltas: tuple[float, ...]) -> list[str]:
    x = torch.randn(1, 3, 96, 96)
    cells = []
    for where in ("arithmetic", "write"):
        for what in ("weight", "bias"):
            smallest, survivors, caught_survivors, missed = None, 0, 0, []
            for d in deltas:
                caught, survived = _caught(dtype, where, what, d, x)
                if survived:
                    survivors += 1
                    caught_survivors += caught
                    if caught:
                        smallest = d if smallest is None else min(smallest, d)
                    else:
                        missed.append(d)
            text = f"{smallest:.0e}" if smallest is not None else "none"
            if where == "arithmetic":
                text += " (all)" if not missed else f" (missed {', '.join(f'{m:.0e}' for m in missed)})"
            else:
                text += f" ({caught_survivors}/{survivors} survived caught)"
            cells.append(text)
    print(f"{dtype}: resolution done", file=sys.stderr)
    return cells


def _correct(dtype: torch.dtype, size: int) -> list[str]:
    model = randomize_bn(torchvision.models.resnet50()).eval().to(dtype)
    x = torch.randn(2, 3, size, size).to(dtype)
    forward = _forward_seconds(model, x)
    result = convfuse.fuse(model, x, inplace=True)
    v, t = result.report.verification, result.report.timings
    proof, rounding = v.proof, v.rounding
    print(f"{dtype}: correct fold done", file=sys.stderr)
    return [
        str(dtype).removeprefix("torch."), f"{proof.error:.2e}", f"{proof.allowed:.2e}", f"{proof.ratio:.3f}",
        f"{rounding.error:.2e}", f"{rounding.original_error:.2e}", f"{rounding.error / rounding.original_error:.2f}",
        f"{rounding.ratio:.2f}", f"{forward * 1000:.0f}", f"{t['reference'] / forward:.1f}",
        f"{t['verify'] / forward:.1f}", f"{(t['reference'] + t['verify']) / forward:.1f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 112x112 input for resnet50, and d = 1e-2, 1e-4, 1e-6, 1e-8 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    size = 112 if args.quick else 224
    deltas = DELTAS[1:8:2] if args.quick else DELTAS
    resolution = [[str(dtype).removeprefix("torch."), *_resolution(dtype, deltas)] for dtype in DTYPES]
    correct = [_correct(dtype, size) for dtype in DTYPES]
    text = (
        header(
            "Verification: the smallest mis-fold caught, and a correct fold against the bounds",
            f"resolution: resnet18 1x3x96x96, {TARGET} folded wrongly by d = {', '.join(f'{d:.0e}' for d in deltas)}; "
            f"correct fold: resnet50 2x3x{size}x{size}",
        )
        + "\n"
        + markdown_table(
            ["dtype", "arithmetic: weight x (1+d)", "arithmetic: bias + d max|b|", "write: weight x (1+d)",
             "write: bias + d max|b|"],
            resolution,
        )
        + "\n\n"
        + markdown_table(
            ["dtype", "proof error", "proof bound", "proof ratio", "fused error vs f64", "original's own",
             "fused / original", "rounding ratio", "forward ms", "reference / fwd", "compare / fwd", "total / fwd"],
            correct,
        )
        + "\n"
    )
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
