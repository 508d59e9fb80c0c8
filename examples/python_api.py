"""Use convfuse from Python: fuse, read the report, handle a failed verification, save and load.

Shows:
1. ``convfuse.fuse(model, example_inputs)`` returns a fused copy (the model's own class) and a
   report; the input model is left untouched.
2. The report: ``fused`` pairs, ``skipped`` BatchNorms with the reason, ``untraced`` modules,
   ``verification`` numbers, and ``to_dict()``: the same JSON the command line writes.
3. ``convfuse.VerificationError``: raised, with the report attached, when the fused model's
   outputs cannot be shown equal to the original's. Nothing is returned then.
4. ``convfuse.save`` / ``convfuse.load``: the same atomic saving and safe loading as the CLI.

Run:  python examples/python_api.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import convfuse
from convfuse.testing import randomize_bn


class ApiNet(nn.Module):
    """Two conv-BN pairs that fold, and one BN that must stay (its conv's output is used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.head_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = self.branch(x)
        x = self.branch_bn(y) + y  # y is read twice: folding branch_bn into branch would change the sum
        return self.head_bn(self.head(x.mean(dim=(2, 3))))


class CountingNet(nn.Module):
    """A model whose output changes from call to call (state updated in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.conv(x)) * self.calls


def show_report(report: convfuse.FuseReport) -> None:
    print(f"summary: {report.summary()}")
    for pair in report.fused:
        print(f"  fused    {pair.norm} into {pair.producer} ({pair.kind})")
    for skip in report.skipped:
        print(f"  skipped  {skip.norm} (producer {skip.producer}): {skip.reason}")
    for part in report.untraced:
        print(f"  untraced {part.module}: {part.reason}")
    if not report.untraced:
        print("  untraced: none (torch.fx traced the whole model)")
    v = report.verification
    print(f"  verification passed={v.passed}: max abs error {v.max_abs_error:.3g}, "
          f"max rel error {v.max_rel_error:.3g}, allowed rtol {v.rtol:.3g} ({v.rule})")


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(ApiNet()).eval()
    x = torch.randn(2, 3, 16, 16)

    # 1-2. Fuse and read the report.
    result = convfuse.fuse(model, x)
    show_report(result.report)
    assert type(result.model) is ApiNet and isinstance(model.stem_bn, nn.BatchNorm2d)  # a copy was fused
    print("report.to_dict() as JSON:")
    print(json.dumps(result.report.to_dict(), indent=2))

    # 3. A failed verification raises VerificationError; catch it and read its report.
    #    Both cases below do raise (checked against convfuse 0.1.0):
    #    - CountingNet: two runs of the original on the same input differ, so no comparison can
    #      prove anything, whatever the fold did. (Dropout left in training mode would NOT raise:
    #      convfuse reseeds the random generator before every run, so random ops repeat.)
    #    - rtol=0, atol=0: the fold is correct, but the folded float32 weights round differently
    #      from conv-then-BN, so outputs differ by about 1e-7 of their scale. Zero tolerance
    #      rejects even that; the default tolerance, set from the model's own float32 rounding
    #      error (measured against a float64 run), accepts it.
    failing = [
        ("a model whose output changes between calls", randomize_bn(CountingNet()).eval(), {}),
        ("a correct fold with zero tolerance", model, {"rtol": 0.0, "atol": 0.0}),
    ]
    for what, candidate, tolerance in failing:
        try:
            convfuse.fuse(candidate, x, **tolerance)
        except convfuse.VerificationError as error:
            v = error.report.verification
            print(f"VerificationError for {what}:")
            print(f"  passed={v.passed}, rule={v.rule!r}, max rel error {v.max_rel_error:.3g}")
            print(f"  {v.message}")
        else:
            raise AssertionError(f"expected a VerificationError for {what}")

    # 4. Save the fused model and load it back. ApiNet lives in this script's __main__, which the
    #    safe loader never imports on a file's say-so (a class in an installed package would load
    #    with allow=["that_package"]); this file is our own, so we trust it.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fused.pt"
        convfuse.save(result.model, path)
        loaded = convfuse.load(path, trust=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
        print(f"saved and loaded {type(loaded).__name__} from {path.name}: outputs match the original's")


if __name__ == "__main__":
    main()
