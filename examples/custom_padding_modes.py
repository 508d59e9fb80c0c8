"""Fuse convolutions that pad with reflect, replicate or circular, and 'same' padding.

Shows that folding keeps each conv's hyperparameters: the fused convs are the model's own
``nn.Conv2d`` objects with their ``padding_mode``, ``padding``, ``dilation`` and ``stride``
unchanged; only their weight and bias change. It also shows a BatchNorm folded *forward* into
the conv after it: exact when that conv pads by copying input values (reflect, replicate,
circular), because the per-channel scale and shift then apply to the padding too. In front of a
zero-padded conv it is not exact (the zeros would not be normalised), and convfuse leaves it,
with the reason in the report.

Run:  python examples/custom_padding_modes.py
"""

from __future__ import annotations

import torch
from torch import nn

import convfuse
from convfuse.testing import randomize_bn


class PaddedNet(nn.Module):
    """Four conv-BN pairs with different padding, then a BN before a reflect-padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_reflect = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn_reflect = nn.BatchNorm2d(8)
        self.conv_replicate = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="replicate", bias=False)
        self.bn_replicate = nn.BatchNorm2d(8)
        self.conv_circular = nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular", groups=2)
        self.bn_circular = nn.BatchNorm2d(8)
        self.conv_same = nn.Conv2d(8, 8, 4, padding="same", padding_mode="reflect")  # even kernel: asymmetric
        self.bn_same = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        # After a ReLU, this BN reads no conv's output; it folds into the conv that follows it.
        self.bn_before = nn.BatchNorm2d(8)
        self.conv_head = nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_reflect(self.conv_reflect(x)))
        x = self.relu(self.bn_replicate(self.conv_replicate(x)))
        x = self.relu(self.bn_circular(self.conv_circular(x)))
        x = self.relu(self.bn_same(self.conv_same(x)))
        return self.conv_head(self.bn_before(x))


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(PaddedNet()).eval()
    x = torch.randn(2, 3, 16, 16)

    result = convfuse.fuse(model, x)
    fused = result.model
    print(f"convfuse: {result.report.summary()}")

    print("fused convs (class, padding_mode and padding as the original's):")
    for pair in result.report.fused:
        before, after = model.get_submodule(pair.producer), fused.get_submodule(pair.producer)
        assert (after.padding_mode, after.padding) == (before.padding_mode, before.padding)
        print(
            f"  {pair.producer:15} <- {pair.norm:13} {type(after).__name__} "
            f"padding_mode={after.padding_mode!r} padding={after.padding!r} dilation={after.dilation} "
            f"stride={after.stride}"
        )
    print(f"BatchNorm layers left: {[n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]}")

    with torch.no_grad():
        expected, actual = model(x), fused(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    print(f"outputs equal: max abs difference {(actual - expected).abs().max().item():.2g} "
          f"(output scale {expected.abs().max().item():.2g})")

    # The contrast: a BN before a conv that pads with zeros stays, and the report says why.
    zero_padded = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    skipped = convfuse.fuse(zero_padded, torch.randn(2, 3, 8, 8)).report.skipped
    for s in skipped:
        print(f"zero padding: BN {s.norm!r} before conv {s.producer!r} left unfused: {s.reason}")


if __name__ == "__main__":
    main()
