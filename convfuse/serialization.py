"""Loading and saving models: the format decision, the safe-loading policy, atomic writes.

Without ``trust``, nothing the file chose runs (DESIGN.md, Security): a pickle is read by
``torch.load`` with a restricted unpickler (``convfuse.files.unpickler``) that admits globals
from the allowed packages only (``convfuse.files.trust``) and never calls what the file chose,
and the objects it built are checked before anything runs on them (``convfuse.files.graph``).
TorchScript archives are code and need ``trust``; ExportedProgram archives are vetted first
(``convfuse.files.archives``). The format is the one torch itself would see, from the first bytes.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse.errors import LoadError, SaveError, UnsafeFileError, UsageError, first_line
from convfuse.files.archives import ZIP_MAGIC, ArchiveError, open_archive
from convfuse.files.graph import check_object_graph
from convfuse.files.trust import Policy, Refused, Unimportable
from convfuse.files.unpickler import pickle_module

__all__ = ["FORMATS", "build_arch", "check_format", "check_writable", "detect_format", "load", "save", "write_text"]

FORMATS = ("pickle", "torchscript", "exported")

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
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy format
        return "pickle"
    raise LoadError(f"{path}: not a PyTorch model file (expected torch.save, torch.jit.save or torch.export.save output)")


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
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Load a model the way the command line does.

    Args:
        path: a ``torch.save`` file of a whole module or of a state_dict (the latter needs
            ``arch``), an ExportedProgram (``.pt2``), or (with ``trust``) a TorchScript archive.
        arch: for a state_dict: a torchvision model name (``resnet50``) or
            ``package.module:factory``.
        trust: load anything, with torch's full unpickler: runs code from the file.
        allow: packages whose classes the file may name, beyond torch, torchvision and timm
            (``--allow``), e.g. ``["ultralytics"]``.
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
    obj = _load_pickle(path, trust=trust, policy=policy, map_location=map_location)
    return _as_module(path, obj, arch)


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
        with quiet():
            with open(path, "rb") as f:
                if f.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
                    open_archive(path).check_size("data.pkl")
            loaded = torch.load(path, map_location=map_location, weights_only=False, pickle_module=pickle_module(policy))
        check_object_graph(loaded, policy)
    except Refused as error:
        raise refusal(path, error) from error
    except (KeyboardInterrupt, LoadError):
        raise
    except Exception as error:
        raise LoadError(f"{path}: the file is damaged or truncated ({type(error).__name__}: {first_line(error)})") from error
    return loaded


def _main_hint(error: BaseException) -> str:
    if isinstance(error, AttributeError) and "__main__" in str(error):
        return (" (the model's class was defined in the script that saved it, __main__, which this "
                "process does not have: move the class into a module and import it there)")
    return ""


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def _as_module(path: Path, obj: Any, arch: str | None) -> nn.Module:
    """The model a loaded object holds: itself, or ``arch`` filled with its state_dict."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], nn.Module) and arch is None:
                return obj[key]
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if arch is None:
                raise UsageError(
                    f"{path}: holds a state_dict (weights without the architecture); name the "
                    "architecture with --arch, e.g. --arch resnet50 or --arch mypackage.models:build"
                )
            return _fill(path, build_arch(arch), obj, arch)
        raise LoadError(f"{path}: holds a {type(obj).__name__} that is neither a model nor a state_dict")
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise UsageError(f"{path}: holds a whole model; --arch is only for state_dict files")
        return obj
    raise LoadError(f"{path}: holds a {type(obj).__name__}, not a model")


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):  # DataParallel / DDP, torch.compile
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _fill(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> nn.Module:
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} ({_some(unexpected)})")
    if mismatched:
        problems.append(f"size mismatch: {_some(mismatched)}")
    if problems:
        raise LoadError(f"{path}: the state_dict does not fit --arch {arch}: " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def _some(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")


def build_arch(spec: str) -> nn.Module:
    """A fresh model, in eval mode, from a torchvision name or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        try:
            factory: Any = importlib.import_module(module_name)
            for attribute in factory_name.split("."):
                factory = getattr(factory, attribute)
        except (ImportError, AttributeError) as error:
            raise UsageError(f"--arch {spec}: cannot find {factory_name} in module {module_name} ({error})") from error
        try:
            model = factory()
        except Exception as error:
            raise UsageError(f"--arch {spec}: calling {factory_name}() raised {type(error).__name__}: {error}") from error
        if not isinstance(model, nn.Module):
            raise UsageError(f"--arch {spec}: {factory_name}() returned a {type(model).__name__}, not an nn.Module")
        return model.eval()
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"--arch {spec}: not a torchvision model name (see torchvision.models.list_models()) "
            f"nor package.module:factory{hint}"
        )
    builder = torchvision.models.get_model_builder(spec)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # never download
    return builder(**kwargs).eval()


# -- saving -----------------------------------------------------------------------------


def _output_format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        return "exported" if path.suffix == ".pt2" else "pickle"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


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


def save(model: Any, path: str | os.PathLike[str], *, format: str | None = None, example_inputs: Any = None) -> None:
    """Write ``model`` atomically: to a temporary file beside ``path``, then renamed into place.

    ``format`` is 'pickle' (``torch.save`` of the whole module), 'torchscript' or 'exported'
    (default: 'exported' for a ``.pt2`` name, else 'pickle'); the last two may need
    ``example_inputs`` to trace the model. Nothing is left behind on failure.

    Raises:
        SaveError: the folder cannot be created or written, or the model cannot be serialised.
    """
    path = Path(path)
    fmt = _output_format(path, format)
    _atomic_write(path, lambda f: _write(model, f, fmt, example_inputs), f"as {fmt}")


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
        return path.stat().st_mode & 0o7777
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _write(model: Any, f: Any, fmt: str, example_inputs: Any) -> None:
    check_format(model, fmt)
    if fmt == "pickle":
        torch.save(model, f)
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
