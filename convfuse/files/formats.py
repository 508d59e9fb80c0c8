"""The formats convfuse reads and writes: which one a file is (as torch decides it, by its first bytes),
which one an output name implies, and the one-line messages of a refused or noisy read."""

from __future__ import annotations

import logging
import os
import stat
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from convfuse.errors import LoadError, SaveError, UnsafeFileError, UsageError
from convfuse.files.archives import ZIP_MAGIC, ArchiveError, open_archive
from convfuse.files.safetensors import is_safetensors
from convfuse.files.trust import Refused, Unimportable

FORMATS = ("pickle", "torchscript", "exported", "state_dict", "safetensors")
"""What convfuse writes: a whole model (or the checkpoint it came in), TorchScript, an ExportedProgram,
or the fused weights alone (``torch.save`` of the state_dict, or safetensors)."""


_PICKLE_NAMES = ("", ".pt", ".pth", ".pkl", ".bin", ".ckpt", ".tar")


EXTENSIONS = {
    "pickle": _PICKLE_NAMES,
    "state_dict": _PICKLE_NAMES,
    "torchscript": (".ts", ".torchscript", ".jit", "", ".pt", ".pth"),
    "exported": (".pt2", "", ".pt"),
    "safetensors": (".safetensors",),
}
"""The output file names (by extension) each format is written under; the first implies the format
where it is the only one that takes it (.ts, .pt2, .safetensors)."""


TRUST_HINT = "pass --trust (convfuse.load(..., trust=True)) only if you trust the file"


def refusal(path: Path, error: Refused) -> LoadError:
    """The one-line error for a file the policy refused, with the flag that would admit it (a
    LoadError where an allowed class's module cannot be imported: that is the installation's)."""
    if isinstance(error, Unimportable):
        return LoadError(f"{path}: {error}")
    package = error.allow
    if package and package not in sys.stdlib_module_names and package != "builtins":
        hint = (f"to admit the classes of {package}, pass --allow {package} (allow=['{package}']) if you trust "
                "that package, or --trust only if you trust the file")
    else:
        hint = TRUST_HINT
    return UnsafeFileError(f"{path}: refused to load: {error}; {hint}")


@contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no log records from torch while a file is read: an error is one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


# -- which format a file is ------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """'pickle', 'torchscript' or 'exported', decided as torch decides it: a zip header in the
    first bytes, then the records torch's own reader lists; LoadError where it is none of them."""
    path = existing_file(Path(path))
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head == ZIP_MAGIC:
        try:
            with quiet():
                fmt = open_archive(path).format
        except ArchiveError as error:
            if error.damaged:
                raise LoadError(f"{path}: the archive is damaged or truncated ({error}); is the file complete?") from error
            fmt = None
        except Refused as error:
            raise refusal(path, error) from error
        if fmt is None:
            raise LoadError(f"{path}: a zip archive, but not one written by torch.save, torch.jit.save or torch.export.save")
        return fmt
    if is_safetensors(path):  # before the pickle marker: a header length may start with 0x80
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy format
        return "pickle"
    raise LoadError(
        f"{path}: not a PyTorch model file (expected torch.save, torch.jit.save, torch.export.save or safetensors output)"
    )


def existing_file(path: Path) -> Path:
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if path.is_dir():
        raise LoadError(f"{path}: is a directory, not a model file")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as error:
        raise LoadError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not stat.S_ISREG(path.stat().st_mode):
        raise LoadError(f"{path}: not a regular file (a device, pipe or socket); give a model file")
    if size == 0:
        raise LoadError(f"{path}: the file is empty")
    return path


# -- which format an output is written in ----------------------------------------------


def output_format(path: str | os.PathLike[str], fmt: str | None = None, input_format: str = "pickle") -> str:
    """The format ``path`` is written in: ``fmt`` if given; else the one its name implies (``.pt2``,
    ``.safetensors``, ``.ts``); else the input's (weights read from safetensors, written under a
    pickle name: their state_dict).

    Raises:
        UsageError: an unknown ``fmt``, a name convfuse does not write (``.onnx``, ``.engine``), or a
            name ``fmt`` is not written under.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    extension = _extension(path)
    takers = [name for name, extensions in EXTENSIONS.items() if extension in extensions]
    if not takers:
        raise UsageError(
            f"{path}: convfuse does not write {extension} files; it writes {_formats_written()}. For another "
            "runtime, convert convfuse's output with that runtime's exporter (e.g. torch.onnx.export on the fused model)"
        )
    if fmt is None:
        if len(takers) == 1:
            return takers[0]
        if input_format in takers:
            return input_format
        return "state_dict" if input_format == "safetensors" else takers[0]
    if fmt not in takers:
        raise UsageError(f"{path}: --format {fmt} is written as {_names(fmt)} files; choose a name that fits")
    return fmt


def _extension(path: Path) -> str:
    """The name's extension, lower case; '' for none (and for a version number: ``fused-1.5``)."""
    suffix = path.suffix.lower()
    return suffix if any(c.isalpha() for c in suffix) else ""


def _names(fmt: str) -> str:
    return ", ".join(e for e in EXTENSIONS[fmt] if e) + (" or no extension" if "" in EXTENSIONS[fmt] else "")


def _formats_written() -> str:
    return "; ".join(f"{fmt} ({_names(fmt)})" for fmt in FORMATS)


def check_format(model: Any, fmt: str) -> None:
    """SaveError now, rather than after fusing, if ``model`` cannot be written as ``fmt``."""
    if isinstance(model, torch.export.ExportedProgram) and fmt != "exported":
        raise SaveError(
            f"an ExportedProgram cannot be written as {fmt} (it is not a Python module); "
            "write it as an ExportedProgram (--format exported, or a .pt2 output name)"
        )
    if isinstance(model, torch.jit.ScriptModule) and fmt != "torchscript":
        raise SaveError(
            f"a TorchScript model cannot be written as {fmt} (torch.save and torch.export do not take "
            "TorchScript); write it as TorchScript (--format torchscript)"
        )
