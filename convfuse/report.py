"""The fuse report: what was folded, what was left and why, and how verification went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import nn

from convfuse.fold.reasons import Skipped
from convfuse.graphs.tracing import Untraced
from convfuse.inputs import Batch
from convfuse.verify import Verification

__all__ = ["Checkpoint", "Count", "FuseReport", "FusedPair", "Merged", "FuseResult", "Replaced", "Strict"]


@dataclass(frozen=True)
class FusedPair:
    """A BatchNorm folded into the conv/linear ``producer`` beside it."""

    producer: str
    norm: str
    kind: str


@dataclass(frozen=True)
class Merged:
    """A block of summed conv branches replaced by one conv (``reparam=True``)."""

    module: str
    kind: str
    branches: int
    kernel: tuple[int, ...]


@dataclass(frozen=True)
class Count:
    before: int
    after: int


@dataclass(frozen=True)
class Checkpoint:
    """Where in the input file the fused model lay: what was replaced when it was written back."""

    key: str | None
    """The checkpoint dict's key that held it ("ema", "state_dict"); None: the file held it itself."""
    stored: str
    """'module' (a whole model) or 'state_dict' (weights, filled into --arch)."""
    prefix: str
    """The state_dict key prefix that was stripped (and is written back), e.g. "model."."""
    kept: list[str] = field(default_factory=list)
    """The checkpoint's other keys, written back unchanged."""


@dataclass(frozen=True)
class Strict:
    """The --strict check: it passes when no BatchNorm is left."""

    passed: bool
    left: int


@dataclass(frozen=True)
class Replaced:
    """A module of the fused model that a fresh build of the architecture lacks: the module at
    ``module`` became a ``type`` (with these children, name -> type). What
    ``convfuse.apply_fused_structure`` rebuilds, and checks its rebuild against."""

    module: str
    type: str
    children: dict[str, str] = field(default_factory=dict)


@dataclass
class FuseReport:
    """Everything a user or a CI script needs to know about one fuse; ``to_dict`` is the JSON."""

    fused: list[FusedPair] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    verification: Verification = field(default_factory=Verification.skipped)
    norm_layers: Count = Count(0, 0)
    parameters: Count = Count(0, 0)
    timings: dict[str, float] = field(default_factory=dict)
    reparam: list[Merged] = field(default_factory=list)
    structure: list[Replaced] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    strict: Strict | None = None
    written: str | None = None
    """The path the fused model was written to; None where nothing was written."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON report of DESIGN.md, plus ``timings`` (seconds), ``reparam``, ``structure`` (what
        ``apply_fused_structure`` rebuilds), ``checkpoint`` (where in the input the model lay),
        ``strict`` (the --strict check, or null) and ``written`` (the output's path, or null)."""
        return {
            "fused": [asdict(pair) for pair in self.fused],
            "skipped": [
                {"norm": s.norm, "producer": s.producer, "reason": s.reason, **({"detail": s.detail} if s.detail else {})}
                for s in self.skipped
            ],
            "untraced": [asdict(u) for u in self.untraced],
            "verification": self.verification.to_dict(),
            "norm_layers": asdict(self.norm_layers),
            "parameters": asdict(self.parameters),
            "timings": {name: round(seconds, 4) for name, seconds in self.timings.items()},
            "reparam": [{**asdict(m), "kernel": list(m.kernel)} for m in self.reparam],
            "structure": [asdict(r) for r in self.structure],
            "checkpoint": asdict(self.checkpoint) if self.checkpoint is not None else None,
            "strict": asdict(self.strict) if self.strict is not None else None,
            "written": self.written,
        }

    def summary(self) -> str:
        """One line for the end of a log: what was fused and whether it verified."""
        n = self.norm_layers.before
        text = f"fused {len(self.fused)} of {n} BatchNorm layer{'s' if n != 1 else ''}"
        if self.norm_layers.after:
            text += f", {self.norm_layers.after} left"
        v = self.verification
        if v.rule == "unchanged":
            text += ", model unchanged"
        elif v.passed is None:
            text += ", not verified"
        elif v.passed:
            text += f", verified ({_verified_detail(v)})"
        else:
            text += ", VERIFICATION FAILED"
        return text

    def to_table(self) -> Group:
        """The human report as rich renderables: fused pairs, skipped norms, untraced modules, totals."""
        parts: list[Any] = []
        if self.fused:
            table = Table(title=f"Fused ({len(self.fused)})", title_justify="left")
            table.add_column("producer")
            table.add_column("norm")
            table.add_column("kind")
            for pair in self.fused:
                table.add_row(pair.producer, pair.norm, pair.kind)
            parts.append(table)
        if self.reparam:
            table = Table(title=f"Re-parameterised blocks ({len(self.reparam)})", title_justify="left")
            table.add_column("module")
            table.add_column("kind")
            table.add_column("branches", justify="right")
            table.add_column("merged kernel")
            for m in self.reparam:
                table.add_row(m.module, m.kind, str(m.branches), "x".join(map(str, m.kernel)))
            parts.append(table)
        if self.skipped:
            table = Table(title=f"Left unfused ({len(self.skipped)})", title_justify="left")
            table.add_column("norm")
            table.add_column("producer")
            table.add_column("reason")
            for s in self.skipped:
                reason = f"{s.reason} ({s.detail})" if s.detail else s.reason
                table.add_row(s.norm, s.producer or "-", reason)
            parts.append(table)
        if self.untraced:
            table = Table(title="Not traceable with torch.fx (their children were traced on their own)", title_justify="left")
            table.add_column("module")
            table.add_column("reason")
            for u in self.untraced:
                table.add_row(u.module, u.reason)
            parts.append(table)
        totals = Table(show_header=True, title="Totals", title_justify="left")
        totals.add_column("")
        totals.add_column("before", justify="right")
        totals.add_column("after", justify="right")
        totals.add_row("BatchNorm layers", str(self.norm_layers.before), str(self.norm_layers.after))
        totals.add_row("parameters", f"{self.parameters.before:,}", f"{self.parameters.after:,}")
        parts.append(totals)
        if self.checkpoint is not None:
            parts.append(Text(_checkpoint_text(self.checkpoint)))
        parts.append(_verification_text(self.verification))
        if self.timings:
            timing = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
            parts.append(Text(f"Time: {timing}", style="dim"))
        return Group(*parts)


def _checkpoint_text(c: Checkpoint) -> str:
    what = "model" if c.stored == "module" else "state_dict"
    where = f"the {what} under {c.key!r} of the checkpoint" if c.key is not None else f"the file's {what}"
    prefix = f", keys prefixed {c.prefix!r}" if c.prefix else ""
    kept = f"; other keys kept: {', '.join(c.kept)}" if c.kept else ""
    return f"Checkpoint: fused {where}{prefix}{kept}"


def _verification_text(v: Verification) -> Text:
    if v.passed is None:
        return Text(f"Verification: skipped ({v.message})", style="yellow")
    if not v.passed:
        return Text(f"Verification: FAILED: {v.message}", style="bold red")
    if v.rule == "unchanged":
        return Text(f"Verification: not needed: {v.message}", style="green")
    text = f"Verification: passed on {v.batches} batch{'es' if v.batches != 1 else ''} ({v.rule})"
    for line in _check_lines(v):
        text += f"\n  {line}"
    if v.message:  # e.g. verified at the outputs of traced parts
        text += f"\n  {v.message}"
    return Text(text, style="green")


def _verified_detail(v: Verification) -> str:
    """The summary's numbers: each verdict's error and allowed value, both of its worst output."""
    parts = []
    if v.proof is not None and v.proof.passed:
        parts.append(f"fold exact in float64: {v.proof.error:.2g} <= {v.proof.allowed:.2g}")
    if v.rounding is not None and v.rounding.worst_output is not None:
        parts.append(f"dtype error {v.rounding.error:.2g} of output scale <= {v.rounding.allowed:.2g}")
    return "; ".join(parts) or f"max error {v.max_rel_error:.2g} of output scale"


def _check_lines(v: Verification) -> list[str]:
    """What was compared, and one line per verdict with the error and allowed value of its worst output."""
    lines = []
    if v.inputs:
        shapes = ", ".join("x".join(map(str, shape)) for shape in v.inputs)
        lines.append(f"inputs {shapes} ({'inferred' if v.inputs_inferred else 'given'})")
    if v.compared:
        counts = ", ".join(f"{path} {count:,}" for path, count in v.compared.items())
        lines.append(f"finite elements compared: {counts}" + (f" (probed: {', '.join(v.probed)})" if v.probed else ""))
    proof = v.proof
    if proof is not None and proof.passed is None:
        lines.append(f"float64 proof: not run ({proof.note})")
    elif proof is not None:
        lines.append(
            f"float64 proof: {proof.error:.3g} of output scale at {proof.worst_output} (allowed {proof.allowed:.3g}, "
            f"ratio {proof.ratio:.2g}, {proof.batches} batch{'es' if proof.batches != 1 else ''})"
        )
    rounding = v.rounding
    if rounding is not None and rounding.worst_output is not None:
        own = (
            f", original's own {rounding.original_error:.3g}, {rounding.error / rounding.original_error:.2g}x"
            if rounding.original_error else ""
        )
        lines.append(
            f"check in the model's dtype: {rounding.error:.3g} of output scale at "
            f"{rounding.worst_output}{own} (allowed {rounding.allowed:.3g}, ratio {rounding.ratio:.2g})"
        )
    lines.append(f"max abs error {v.max_abs_error:.3g}, max rel error {v.max_rel_error:.3g} against the original")
    return lines


@dataclass
class FuseResult:
    """The fused model (the user's class) and the report of what was done."""

    model: nn.Module
    report: FuseReport
    example_inputs: Batch | None = None
    """The (args, kwargs) the model was verified on first; None where no inputs were available."""
