"""One run of the command: check the options, load, fuse, verify, save; the library does the work."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from convfuse import progress
from convfuse.errors import CheckFailed, StrictError, TrainingModeError, UsageError
from convfuse.progress import timed
from convfuse.report import Checkpoint, FuseReport, Strict

if TYPE_CHECKING:  # pragma: no cover
    from convfuse.files import Loaded

from convfuse.cli.display import Progress, finish

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


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


def run(options: dict[str, Any], out: Console) -> None:
    from convfuse import files
    from convfuse.api import fuse
    from convfuse.files.formats import check_format
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
    shown = None if quiet else Progress(out)
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
            finish(out, failure.report, timings, options, quiet, failed=True)
        raise failure
    finish(out, report, timings, options, quiet, failed=False)


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
