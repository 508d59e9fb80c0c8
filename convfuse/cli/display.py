"""What the command shows while it runs and when it ends: the consoles, the progress of each step,
the report's tables and the one-line summary."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from convfuse.report import FuseReport

if TYPE_CHECKING:  # pragma: no cover
    pass


def console(stream: Any) -> Console:
    console = Console(file=stream, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    return console


def finish(
    out: Console, report: FuseReport, timings: dict[str, float], options: dict[str, Any], quiet: bool, *, failed: bool
) -> None:
    report.timings = {"load": timings["load"], **report.timings, **({"save": timings["save"]} if "save" in timings else {})}
    if options["report"] is not None:
        from convfuse.files import write_text

        write_text(options["report"], json.dumps(report.to_dict(), indent=2) + "\n")
    if not quiet:
        out.print(report.to_table())
    summary = f"convfuse: {report.summary()}"
    if report.written is not None:
        summary += f"; wrote {report.written}"
    elif failed:
        summary += "; nothing written"
    elif options["dry_run"]:
        summary += "; dry run, nothing written"
    out.print(summary, markup=False, highlight=False, soft_wrap=True)


_STEPS = {
    "load": "Loading the model",
    "copy": "Copying the model",
    "trace": "Tracing",
    "reference": "Running the original model",
    "fold": "Folding",
    "reparam": "Merging branches",
    "verify": "Verifying the fused model",
    "save": "Saving",
}


class Progress:
    """Each step of a run as it goes: at a terminal a spinner with the step and its elapsed time;
    elsewhere (a CI log) one line per step as it ends, with its seconds. Both on stdout, before the
    tables and the summary: stderr stays for the one-line error."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.step, self.since = "load", time.perf_counter()

    def started(self, step: str) -> None:
        self.step, self.since = step, time.perf_counter()

    def finished(self, step: str, seconds: float) -> None:
        if not self.out.is_terminal:
            self.out.print(f"convfuse: {step} done ({seconds:.2f}s)", markup=False, highlight=False, soft_wrap=True)

    def spinner(self) -> Any:
        return self.out.status(self) if self.out.is_terminal else nullcontext()

    def __rich__(self) -> Text:  # rendered at every refresh of the spinner
        return Text(f"{_STEPS.get(self.step, self.step)} ({time.perf_counter() - self.since:.0f}s)")
