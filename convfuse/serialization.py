"""Loading and saving models: the format decision, the safe-loading policy, atomic writes.

Without ``trust``, nothing the file chose runs (DESIGN.md, Security): a pickle is read by
``torch.load`` with a restricted unpickler (``convfuse.files.unpickler``) that admits globals
from the allowed packages only (``convfuse.files.trust``) and never calls what the file chose,
and the objects it built are checked before anything runs on them (``convfuse.files.graph``).
TorchScript archives are code and need ``trust``; ExportedProgram archives are vetted first
(``convfuse.files.archives``). The format is the one torch itself would see, from the first bytes.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse import checkpoints
from convfuse.architectures import build_arch
from convfuse.errors import LoadError, SaveError, UnsafeFileError, UsageError, first_line
from convfuse.files.archives import ZIP_MAGIC, ArchiveError, open_archive
from convfuse.files.graph import check_object_graph
from convfuse.files.trust import Policy, Refused, Unimportable
from convfuse.files.unpickler import pickle_module

__all__ = [
    "EXTENSIONS", "FORMATS", "build_arch", "check_format", "check_writable", "detect_format", "load", "output_format",
    "save", "write_text",
]

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


# -- format detection -------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """'pickle', 'torchscript' or 'exported', decided as torch decides it: a zip header in the
    first bytes, then the records torch's own reader lists; LoadError where it is none of them."""
    path = _existing_file(Path(path))
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
    if checkpoints.is_safetensors(path):  # before the pickle marker: a header length may start with 0x80
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy format
        return "pickle"
    raise LoadError(
        f"{path}: not a PyTorch model file (expected torch.save, torch.jit.save, torch.export.save or safetensors output)"
    )


def _existing_file(path: Path) -> Path:
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


# -- loading ----------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust: bool = False,
    allow: Iterable[str] = (),
    prefix: str | None = None,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Load a model the way the command line does.

    Args:
        path: a ``torch.save`` file of a whole module or of a state_dict (the latter needs
            ``arch``), a training framework's checkpoint dict holding either (see
            ``convfuse.checkpoints``), a safetensors file (with ``arch``), an ExportedProgram
            (``.pt2``), or (with ``trust``) a TorchScript archive.
        arch: for a state_dict: a torchvision model name (``resnet50``), ``timm:NAME`` or
            ``package.module:factory``.
        trust: load anything, with torch's full unpickler: runs code from the file.
        allow: packages whose classes the file may name, beyond torch, torchvision and timm
            (``--allow``), e.g. ``["ultralytics"]``.
        prefix: the state_dict's key prefix to strip (e.g. ``model.``); by default a wrapper's
            prefix (``module.``, ``_orig_mod.``, ``model.``) is stripped where that makes the keys fit.
        map_location: where tensors are loaded (default: the CPU).

    Raises:
        LoadError: the file is missing, damaged, holds no model, or does not fit ``arch``.
        UnsafeFileError: loading it would run code the file chose (the message names what).
    """
    path = Path(path)
    try:
        policy = Policy(allow)
    except ValueError as error:
        raise UsageError(str(error)) from error
    fmt = detect_format(path)
    if fmt == "torchscript":
        return _load_torchscript(path, trust=trust, map_location=map_location)
    if fmt == "exported":
        from convfuse.exported import load_exported

        return load_exported(path, trust=trust)
    if fmt == "safetensors":
        return _as_module(path, checkpoints.read_safetensors(path), arch, prefix, fmt)
    obj = _load_pickle(path, trust=trust, policy=policy, map_location=map_location)
    return _as_module(path, obj, arch, prefix)


def _load_torchscript(path: Path, *, trust: bool, map_location: Any) -> torch.jit.ScriptModule:
    if not trust:
        raise UnsafeFileError(
            f"{path}: refused to load: a TorchScript archive is code (its methods, __setstate__ among "
            "them, run inside torch.jit.load and can call any registered operator, such as "
            f"aten::from_file, which writes files), which convfuse cannot vet; {TRUST_HINT}"
        )
    try:
        with quiet():
            return torch.jit.load(str(path), map_location=map_location)
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        raise LoadError(f"{path}: the TorchScript archive cannot be loaded ({first_line(error)})") from error


def _load_pickle(path: Path, *, trust: bool, policy: Policy, map_location: Any) -> Any:
    if trust:
        try:
            with quiet():
                return torch.load(path, map_location=map_location, weights_only=False)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # the file's own code may raise anything, SystemExit too
            raise LoadError(f"{path}: cannot be loaded ({type(error).__name__}: {first_line(error)})"
                            + _main_hint(error)) from error
    try:
        with quiet(), open(path, "rb") as raw:
            if raw.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                open_archive(path).check_size("data.pkl")
                source: Any = path
            else:
                source = _Unmapped(raw)
            loaded = torch.load(source, map_location=map_location, weights_only=False, pickle_module=pickle_module(policy))
        check_object_graph(loaded, policy)
    except Refused as error:
        raise refusal(path, error) from error
    except (KeyboardInterrupt, LoadError):
        raise
    except Exception as error:
        raise LoadError(f"{path}: the file is damaged or truncated ({type(error).__name__}: {first_line(error)})") from error
    return loaded


class _Unmapped(io.BufferedReader):
    """A file that says it has no descriptor: ``torch.load`` then reads a legacy pickle as a
    stream, and never tries it as its ancient tar format (which it would unpack into a folder,
    links and all)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        super().__init__(raw.raw)
        self.seek(0)  # the reader it shares the file with may have read ahead

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def _main_hint(error: BaseException) -> str:
    if isinstance(error, AttributeError) and "__main__" in str(error):
        return (" (the model's class was defined in the script that saved it, __main__, which this "
                "process does not have: move the class into a module and import it there)")
    return ""


def _as_module(path: Path, obj: Any, arch: str | None, prefix: str | None, fmt: str = "pickle") -> nn.Module:
    """The model a loaded object holds: itself, one in a checkpoint dict, or ``arch`` filled with its state_dict."""
    return checkpoints.find_model(path, obj, arch=arch, prefix=prefix, fmt=fmt).model


# -- saving -----------------------------------------------------------------------------


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


def check_writable(path: str | os.PathLike[str]) -> None:
    """SaveError now, rather than after fusing, if ``path`` cannot be written: a folder, an
    existing target that is not a regular file (a device, a pipe, a symbolic link: replacing it
    would replace that node), or no permission."""
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{path}: is a directory; give a file name for the output")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise SaveError(f"{path}: cannot be written ({error.strerror or error})") from error
    if mode is not None and not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file (a device, pipe or socket)"
        raise SaveError(f"{path}: exists and is {what}; convfuse writes only regular files: give another name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SaveError(f"{path}: cannot be written (no write permission in {ancestor})")
    if mode is not None and not os.access(path, os.W_OK):
        raise SaveError(f"{path}: cannot be written (the existing file is read-only)")


def save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    example_inputs: Any = None,
    like: checkpoints.Loaded | None = None,
) -> None:
    """Write ``model`` atomically: to a temporary file beside ``path``, then renamed into place.

    ``format`` is 'pickle' (``torch.save`` of the whole module), 'torchscript', 'exported',
    'state_dict' (``torch.save`` of its state_dict) or 'safetensors' (the state_dict); by default
    what the name implies (:func:`output_format`), else the input's. TorchScript and exported may
    need ``example_inputs`` to trace the model. ``like``: where the model was read from
    (``convfuse.checkpoints.Loaded``): a pickle is then the same checkpoint dict with the fused
    model (or state_dict) in its place, and safetensors keep their key prefix and metadata.
    Nothing is left behind on failure.

    Raises:
        UsageError: a format or file name convfuse does not write.
        SaveError: the folder cannot be created or written, or the model cannot be serialised.
    """
    path = Path(path)
    fmt = output_format(path, format, like.format if like is not None else "pickle")
    _atomic_write(path, lambda f: _write(model, f, fmt, example_inputs, like), f"as {fmt}")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` atomically (for reports); SaveError if it cannot be written."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()), "")


def _atomic_write(path: Path, write: Any, what: str) -> None:
    """Write to a temporary file beside ``path`` and rename it into place; on failure remove it
    and any folder made for it, so nothing is left behind."""
    check_writable(path)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        _remove_folders(made)
        raise SaveError(f"{path}: cannot be written ({error.strerror or error})") from error
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _file_mode(path))
        check_writable(path)  # the target may have been replaced while the model was written
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _remove_folders(made)
        if isinstance(error, (SaveError, KeyboardInterrupt, SystemExit)):
            raise
        raise SaveError(f"{path}: cannot be written {what} ({type(error).__name__}: {first_line(error)})".replace("  ", " ")) from error


def _remove_folders(folders: list[Path]) -> None:
    """Remove the folders a failed save created, innermost first, where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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


def _file_mode(path: Path) -> int:
    """The permissions a new file would get (``mkstemp`` makes 0600): those of the file being
    replaced, else 0666 less the umask, read without changing it where the system tells."""
    if path.exists():
        return path.stat().st_mode & 0o777  # never a setuid/setgid bit of whatever was there
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _write(model: Any, f: Any, fmt: str, example_inputs: Any, like: checkpoints.Loaded | None) -> None:
    check_format(model, fmt)
    if fmt == "pickle":
        with checkpoints.framework_layout(model):
            torch.save(checkpoints.pack(like, model), f)
    elif fmt == "state_dict":
        torch.save(checkpoints.weights_of(model), f)
    elif fmt == "safetensors":
        f.write(checkpoints.safetensors_bytes(model, like if like is not None and like.format == fmt else None))
    elif fmt == "torchscript":
        scripted = model if isinstance(model, torch.jit.ScriptModule) else _to_torchscript(model, example_inputs)
        torch.jit.save(scripted, f)
    else:
        from convfuse.exported import to_exported

        torch.export.save(to_exported(model, example_inputs), f)


def _to_torchscript(model: nn.Module, example_inputs: Any) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception as script_error:
        if example_inputs is None:
            raise SaveError(
                f"the model cannot be scripted ({first_line(script_error)}); give --input-shape so it can be traced"
            ) from script_error
        from convfuse.inputs import as_call

        args, kwargs = as_call(example_inputs)
        if kwargs:
            raise SaveError("TorchScript tracing takes positional inputs only") from script_error
        return torch.jit.trace(model, args)
