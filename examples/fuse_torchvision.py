"""Fuse a torchvision ResNet-18, verify it, and compare its latency with the original's.

Shows the everyday use of convfuse on a standard architecture: every BatchNorm in ResNet-18
follows a convolution, so all 20 of them fold away; verification proves the fused model
computes the same outputs (to rounding); and the fused model runs faster on CPU because it
skips one memory pass per BatchNorm.

Run:  python examples/fuse_torchvision.py

The model is built with ``weights=None`` (nothing is downloaded) and given random BatchNorm
statistics in place of trained ones. Timings are for a 1x3x112x112 input on at most 2 CPU
threads (fewer where OMP_NUM_THREADS says so: on a busy machine one thread times more
steadily); they vary with the machine and its load.
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

import convfuse
from convfuse.testing import randomize_bn

INPUT_SHAPE = (1, 3, 112, 112)
WARMUP, RUNS = 3, 15


def median_latencies(models: list[torch.nn.Module], x: torch.Tensor) -> list[float]:
    """Median wall time of one forward pass of each model, in seconds.

    The models take turns, so a change in the machine's load affects them alike.
    """
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(WARMUP + RUNS):
            for model, samples in zip(models, times):
                start = time.perf_counter()
                model(x)
                if i >= WARMUP:
                    samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(INPUT_SHAPE)

    # The original model is left untouched (inplace=False): result.model is a fused copy.
    result = convfuse.fuse(model, x)
    report, fused = result.report, result.model

    print(f"convfuse: {report.summary()}")
    print(f"fused pairs: {len(report.fused)} (first: {report.fused[0].producer} + {report.fused[0].norm})")
    print(f"BatchNorm layers: {report.norm_layers.before} -> {report.norm_layers.after}")
    print(f"parameters: {report.parameters.before:,} -> {report.parameters.after:,}")
    v = report.verification
    print(
        f"verification: passed={v.passed} on {v.batches} batches, max abs error {v.max_abs_error:.3g}, "
        f"max rel error {v.max_rel_error:.3g} (allowed rtol {v.rtol:.3g}; rule: {v.rule})"
    )

    # Our own check, independent of convfuse's: the logits agree to float32 rounding.
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)

    original_s, fused_s = median_latencies([model, fused], x)
    threads = torch.get_num_threads()
    print(f"latency (median of {RUNS}, {threads} thread{'s' if threads != 1 else ''}, input {tuple(x.shape)}):")
    print(f"  original {original_s * 1e3:7.2f} ms")
    print(f"  fused    {fused_s * 1e3:7.2f} ms")
    print(f"speed-up: {original_s / fused_s:.2f}x")


if __name__ == "__main__":
    main()
