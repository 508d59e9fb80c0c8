"""Fuse a model that torch.fx cannot trace as a whole: what is fused, and what the report says.

The root's forward branches on data (``if x.mean() > 0:``), which torch.fx cannot trace. convfuse
does not give up: it traces each child of the root on its own and folds the pairs it finds there.
Layers called directly from the untraceable forward (``stem``/``stem_bn`` below) are outside every
graph, so their BatchNorm stays, with the reason in the report. To get it fused, move such a pair
into a child module (an ``nn.Sequential``) that the root calls.

Run:  python examples/untraceable_model.py
"""

from __future__ import annotations

import torch
from torch import nn

import convfuse
from convfuse.testing import randomize_bn


class GatedNet(nn.Module):
    """A branch on the data, a conv-BN stem called from the root's forward, a feature block, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.features = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(16, 10), nn.BatchNorm1d(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this forward
            x = x.flip(-1)
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(GatedNet()).eval()
    x = torch.randn(2, 3, 16, 16)

    report = convfuse.fuse(model, x).report
    print(f"convfuse: {report.summary()}")
    print("untraced modules (their children were traced on their own):")
    for part in report.untraced:
        print(f"  {part.module}: {part.reason}")
    print("fused inside the children:")
    for pair in report.fused:
        print(f"  {pair.producer} + {pair.norm} ({pair.kind})")
    print("left unfused:")
    for skip in report.skipped:
        detail = f" ({skip.detail})" if skip.detail else ""
        print(f"  {skip.norm}: {skip.reason}{detail}")
    # Verification runs the example input and two batches drawn like it, so it checks the
    # branches those inputs take; here every branch runs the same layers.
    v = report.verification
    print(f"verification passed={v.passed} on {v.batches} batches (max rel error {v.max_rel_error:.2g})")


if __name__ == "__main__":
    main()
