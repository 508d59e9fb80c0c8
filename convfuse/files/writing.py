"""Writing outputs: to a temporary file beside the target, renamed into place only when complete;
nothing is left behind by a failed save, and only regular files are ever replaced."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse.errors import SaveError, first_line
from convfuse.files.checkpoints import Loaded
from convfuse.files.formats import check_format, output_format
from convfuse.files.writeback import framework_layout, fused_safetensors, pack, weights_of


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
    like: Loaded | None = None,
) -> None:
    """Write ``model`` atomically: to a temporary file beside ``path``, then renamed into place.

    ``format`` is 'pickle' (``torch.save`` of the whole module), 'torchscript', 'exported',
    'state_dict' (``torch.save`` of its state_dict) or 'safetensors' (the state_dict); by default
    what the name implies (:func:`output_format`), else the input's. TorchScript and exported may
    need ``example_inputs`` to trace the model. ``like``: where the model was read from
    (``convfuse.Loaded``): a pickle is then the same checkpoint dict with the fused
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


def _write(model: Any, f: Any, fmt: str, example_inputs: Any, like: Loaded | None) -> None:
    check_format(model, fmt)
    if fmt == "pickle":
        with framework_layout(model):
            torch.save(pack(like, model), f)
    elif fmt == "state_dict":
        torch.save(weights_of(model), f)
    elif fmt == "safetensors":
        f.write(fused_safetensors(model, like if like is not None and like.format == fmt else None))
    elif fmt == "torchscript":
        scripted = model if isinstance(model, torch.jit.ScriptModule) else _to_torchscript(model, example_inputs)
        torch.jit.save(scripted, f)
    else:
        from convfuse.graphs.aten import to_exported

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
