"""The ``convfuse`` command: parse, call the library, render the report, map errors to exit codes.

Exit codes (DESIGN.md): 0 success (also "nothing to fuse"); 1 the model failed a check
(verification or --strict), nothing written; 2 the user must fix something, nothing written;
3 an internal error (a bug of convfuse).
The report goes to stdout, errors and warnings to stderr; colour and spinners only on a terminal
(NO_COLOR is honoured), elsewhere one progress line on stdout per finished step (-q: none), before
the tables; the last line of stdout is always a one-line summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from convfuse import __version__, progress
from convfuse.errors import CheckFailed, ConvfuseError, StrictError, TrainingModeError, UsageError
from convfuse.report import Checkpoint, FuseReport, Strict, timed

if TYPE_CHECKING:  # pragma: no cover
    from convfuse.files import Loaded

app = typer.Typer(
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"convfuse {__version__} (torch {torch.__version__})")
        raise typer.Exit(0)


def parse_shape(text: str) -> tuple[int, ...]:
    """``'1,3,224,224'`` (or ``1x3x224x224``) as a tuple of positive ints; UsageError otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224")
    return shape


@app.command(no_args_is_help=True)
def convfuse(
    input: Annotated[
        Optional[Path],
        typer.Argument(
            help="Model file: torch.save of a whole model or of a state_dict (with --arch), a training "
            "framework's checkpoint holding either (ultralytics, Lightning, timm, a training loop's dict), "
            "a safetensors file (with --arch), a TorchScript archive, or an ExportedProgram (.pt2). Omit it with --arch to fuse "
            "a freshly built architecture (a demo: its BatchNorm statistics are randomised, as "
            "trained ones would be, so that folding them shows).",
            show_default=False,
            metavar="INPUT",
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Where to write the fused model.", show_default=False, metavar="OUTPUT")
    ] = None,
    input_shape: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input-shape",
            metavar="SHAPE",
            help="Shape of a positional input, e.g. 1,3,224,224; repeat for several inputs. "
            "Default: inferred from the first layer.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(help="dtype of the generated inputs (float32, float16, bfloat16, float64). Default: the model's.",
                     show_default=False),
    ] = None,
    atol: Annotated[
        Optional[float], typer.Option(help="Absolute tolerance for verification. Default: from the model's own rounding error.",
                                      show_default=False)
    ] = None,
    rtol: Annotated[
        Optional[float],
        typer.Option(help="Tolerance relative to each output's largest magnitude. Default: from the model's own rounding error.",
                     show_default=False),
    ] = None,
    report: Annotated[
        Optional[Path], typer.Option("--report", metavar="PATH.json", help="Write the JSON report here.", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Analyse and verify; write no model.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 1) when any BatchNorm is left unfused.")] = False,
    arch: Annotated[
        Optional[str],
        typer.Option(help="Architecture for a state_dict: a torchvision model name (resnet50), timm:NAME (any "
                     "timm.create_model name) or package.module:factory.", show_default=False),
    ] = None,
    prefix: Annotated[
        Optional[str],
        typer.Option("--prefix", metavar="PREFIX",
                     help="The state_dict's key prefix to strip, e.g. model. (its other keys are kept as they are). "
                     "Default: module., _orig_mod. or model. where all keys have it and that makes them fit --arch.",
                     show_default=False),
    ] = None,
    allow: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow",
            metavar="PACKAGE",
            envvar="CONVFUSE_ALLOW",
            help="Let the file name classes of this installed package too (besides torch, torchvision, timm); "
            "repeatable. Environment: CONVFUSE_ALLOW (packages separated by spaces or commas).",
            show_default=False,
        ),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Load anything: any pickle, TorchScript, any .pt2. This runs code from the file. "
                     "Only for files you trust."),
    ] = False,
    format: Annotated[
        Optional[str],
        typer.Option("--format", help="Output format: pickle (the model, or the checkpoint it came in), torchscript, "
                     "exported, state_dict or safetensors (the fused weights alone). Default: the input's; a .pt2, "
                     ".safetensors or .ts output name implies its format.", show_default=False),
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification (the report says so).")] = False,
    reparam: Annotated[
        bool,
        typer.Option("--reparam", help="Also merge blocks that sum conv branches on one input (RepVGG, MobileOne) "
                     "into one conv; changes those blocks' structure."),
    ] = False,
    eval_mode: Annotated[
        bool, typer.Option("--eval", help="Put a model saved in training mode into eval mode before fusing.")
    ] = False,
    overwrite_input: Annotated[
        bool, typer.Option("--overwrite-input", help="Allow OUTPUT to be the INPUT file (it is replaced atomically).")
    ] = False,
    device: Annotated[
        Optional[str], typer.Option(help="Run on this device, e.g. cuda (default: cpu).", show_default=False)
    ] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the one-line summary.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Fold BatchNorm into the conv/linear layers beside it, verify the outputs, and save.

    Exit codes: 0 success (also nothing to fuse); 1 the model failed a check (verification or
    --strict), nothing written; 2 a problem to fix (usage, unreadable or unsafe input,
    unwritable output), nothing written; 3 an internal error (a bug of convfuse:
    CONVFUSE_DEBUG=1 shows the traceback), nothing written.
    """
    out = _console(sys.stdout)
    err = _console(sys.stderr)
    try:
        _main(locals(), out)
    except CheckFailed as error:
        err.print(f"convfuse: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except ConvfuseError as error:
        err.print(f"convfuse: error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        err.print("convfuse: interrupted; nothing written", markup=False)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except SystemExit as error:  # the model's own code (its forward, a class it imports) exited
        err.print(
            f"convfuse: error: the model's code called sys.exit({error.code!r}) while convfuse ran it; "
            "nothing written",
            markup=False, highlight=False, soft_wrap=True,
        )
        raise typer.Exit(2) from None
    except Exception as error:  # a bug of ours: say so plainly, no traceback unless asked
        if os.environ.get("CONVFUSE_DEBUG"):
            raise
        err.print(
            f"convfuse: internal error: {type(error).__name__}: {error}. This is a bug in convfuse; "
            "please report it (set CONVFUSE_DEBUG=1 for the traceback).",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(3) from None


def _console(stream: Any) -> Console:
    console = Console(file=stream, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    return console


def _main(options: dict[str, Any], out: Console) -> None:
    from convfuse import files
    from convfuse.files.formats import check_format
    from convfuse.fuse import fuse
    from convfuse.verify import InputSpec

    source: Path | None = options["input"]
    target: Path | None = options["output"]
    quiet: bool = options["quiet"]
    if source is None and options["arch"] is None:
        raise UsageError("give a model file, or --arch NAME to fuse a freshly built architecture")
    if source is None and options["prefix"] is not None:
        raise UsageError("--prefix is for a state_dict file; give the file")
    if target is None and not options["dry_run"]:
        raise UsageError("give the output file with -o/--output (or --dry-run to write nothing)")
    shapes = tuple(parse_shape(s) for s in options["input_shape"] or ())
    dtype = _dtype(options["dtype"])
    output_format = options["format"]
    if output_format is not None and output_format not in files.FORMATS:
        raise UsageError(f"--format {output_format}: use one of {', '.join(files.FORMATS)}")
    for name in ("atol", "rtol"):
        if options[name] is not None and options[name] < 0:
            raise UsageError(f"--{name} must not be negative")
    writing = target is not None and not options["dry_run"]
    if writing:
        if source is not None and _same_file(source, target) and not options["overwrite_input"]:
            raise UsageError(f"{target}: is the input file; choose another output, or pass --overwrite-input")
        files.output_format(target, output_format)  # a name convfuse does not write: before any work
        files.check_writable(target)
    if options["report"] is not None:
        for other, role in ((source, "input model"), (target, "output model")):
            if other is not None and _same_file(options["report"], other):
                raise UsageError(f"--report {options['report']}: is the {role} file; choose another report path")
        files.check_writable(options["report"])

    timings: dict[str, float] = {}
    shown = None if quiet else _Progress(out)
    failure: CheckFailed | None = None
    with progress.listening(shown), shown.spinner() if shown is not None else nullcontext():
        with timed(timings, "load"):
            loaded = _load(source, options)
        model = loaded.model
        if writing:
            output_format = files.output_format(target, output_format, loaded.format)
            check_format(model, output_format)
        if options["device"]:
            model = _to_device(model, options["device"])
        if getattr(model, "training", False):
            if not options["eval_mode"]:
                raise TrainingModeError(
                    f"the model in {source} was saved in training mode, where BatchNorm uses batch statistics; "
                    "pass --eval to fuse it in eval mode (the output is saved in eval mode)"
                )
            model.eval()

        example = InputSpec(shapes or None, dtype)
        try:
            result = fuse(
                model, example, verify=not options["no_verify"], atol=options["atol"], rtol=options["rtol"],
                inplace=True, reparam=options["reparam"],
            )
            report = result.report
            _describe(report, result.model, loaded)
            if options["strict"]:
                report.strict = Strict(passed=not report.norm_layers.after, left=report.norm_layers.after)
                if not report.strict.passed:
                    raise StrictError(
                        f"--strict: {report.norm_layers.after} BatchNorm layer(s) left unfused (see the report); "
                        "nothing written",
                        report,
                    )
            if writing:
                with timed(timings, "save"):
                    files.save(result.model, target, format=output_format,
                                       example_inputs=result.example_inputs, like=loaded)
                report.written = str(target)
        except CheckFailed as error:
            failure = error
    if failure is not None:  # the report of a failed check is shown too, once the spinner is gone
        if failure.report is not None:
            failure.report.checkpoint = failure.report.checkpoint or _checkpoint(loaded)
            _finish(out, failure.report, timings, options, quiet, failed=True)
        raise failure
    _finish(out, report, timings, options, quiet, failed=False)


def _load(source: Path | None, options: dict[str, Any]) -> Loaded:
    """The input's model, and where in the file it lay."""
    from convfuse import files
    from convfuse.files.architectures import build_arch

    if source is None:  # the demo: fresh weights, BatchNorm statistics drawn as trained ones would be
        from convfuse.testing import randomize_bn

        return files.Loaded(randomize_bn(build_arch(options["arch"])))
    allow = [name for value in options["allow"] or () for name in value.replace(",", " ").split()]
    return files.load_file(source, arch=options["arch"], trust=options["trust"], allow=allow, prefix=options["prefix"])


def _describe(report: FuseReport, model: Any, loaded: Loaded) -> None:
    """The report's records of where the model lay and which modules a fresh build lacks."""
    import torch

    from convfuse.structure import describe_structure

    report.checkpoint = _checkpoint(loaded)
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        report.structure = describe_structure(model, report)


def _checkpoint(loaded: Loaded) -> Checkpoint | None:
    """Where in the file the model lay; None where the file held the model itself."""
    if loaded.container is None and loaded.stored == "module":
        return None
    return Checkpoint(key=loaded.key, stored=loaded.stored, prefix=loaded.prefix, kept=loaded.kept)


def _finish(
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


class _Progress:
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


def _dtype(text: str | None) -> Any:
    if text is None:
        return None
    import torch

    name = _DTYPES.get(text.lower().removeprefix("torch."))
    if name is None:
        raise UsageError(f"--dtype {text}: use one of float32, float16, bfloat16, float64")
    return getattr(torch, name)


def _to_device(model: Any, device: str) -> Any:
    import torch

    try:
        target = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device}: {error}") from error
    if target.type == "meta":  # holds no values: nothing could be verified or saved
        raise UsageError(f"--device {device}: a device without data; use cpu or an accelerator such as cuda")
    try:
        if isinstance(model, torch.export.ExportedProgram):
            from torch.export.passes import move_to_device_pass

            return move_to_device_pass(model, torch.device(device))
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError, AttributeError) as error:
        raise UsageError(f"--device {device}: {error}") from error


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def main() -> None:
    """Entry point of the ``convfuse`` script and ``python -m convfuse``."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
    app(prog_name="convfuse")
