"""Loading and saving models: format detection by content, the safe-loading policy, atomic writes.

Safe loading (DESIGN.md, Security): a pickle is read with torch's weights-only unpickler,
whose allowlist is extended with exactly the classes the file names that are ``nn.Module``
subclasses (and ``functools.partial``, which builds without calling anything). Before
anything is unpickled, the file's opcodes are scanned: every class or function it references
must be one of those or one torch allows by default, and no module class may be *called*
(only created empty and filled with state, as ``torch.save`` does), since a constructor run
with arguments chosen by the file could do anything. Modules named by the file are imported to
see what they hold, except the standard library, which holds no model classes.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import io
import os
import pickletools
import re
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse import checkpoints
from convfuse.architectures import build_arch
from convfuse.errors import LoadError, SaveError, UnsafeFileError, UsageError, first_line

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

_INERT = {"functools.partial": functools.partial}
"""Non-module globals admitted: they build objects without calling anything from the file."""

_GRAPH_MODULE = ("torch.fx.graph_module.reduce_graph_module", "torch.fx.graph_module.reduce_package_graph_module",
                 "torch.fx.graph_module._deserialize_graph_module")

TRUST_HINT = "pass --trust (convfuse.load(..., trust=True)) only if you trust the file"
_TRUST_HINT = TRUST_HINT


# -- format detection -------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """'pickle', 'torchscript', 'exported' or 'safetensors', read from the file's content; LoadError if none."""
    path = _existing_file(Path(path))
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise LoadError(f"{path}: the archive is damaged ({error}); is the file complete?") from error
        if any(_is_exported_member(name) for name in names):
            return "exported"
        if any("/code/" in name for name in names) or any(name.endswith("constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "pickle"
        raise LoadError(f"{path}: a zip archive, but not one written by torch.save, torch.jit.save or torch.export.save")
    if checkpoints.is_safetensors(path):  # before the pickle marker: a header length may start with 0x80
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise LoadError(f"{path}: the archive is truncated or damaged; is the file complete?")
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy format
        return "pickle"
    raise LoadError(
        f"{path}: not a PyTorch model file (expected torch.save, torch.jit.save, torch.export.save or safetensors output)"
    )


def _is_exported_member(name: str) -> bool:
    """A file only torch.export.save writes: ``<root>/archive_format`` or ``<root>/models/<name>.json``
    (a TorchScript archive may hold ``<root>/code/.../models/...``, e.g. torchvision's)."""
    parts = name.split("/")
    return (len(parts) == 2 and parts[1] == "archive_format") or (
        len(parts) == 3 and parts[1] == "models" and parts[2].endswith(".json")
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
    if size == 0:
        raise LoadError(f"{path}: the file is empty")
    return path


# -- the pickle scan --------------------------------------------------------------------


@dataclass
class _Scan:
    """The globals a pickle references, and those it calls (REDUCE) rather than just names."""

    referenced: set[str] = field(default_factory=set)
    called: set[str] = field(default_factory=set)


_MARK = object()


def _scan_pickle(data: io.BufferedIOBase | io.BytesIO, scan: _Scan) -> None:
    """Symbolically run one pickle's stack to see which global each REDUCE calls."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            full = _python3_name(*arg.split(" ", 1))
            scan.referenced.add(full)
            stack.append(("global", full))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            full = f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else "?"
            scan.referenced.add(full)
            stack.append(("global", full))
        elif name in ("REDUCE", "NEWOBJ"):
            stack.pop()
            func = stack.pop()
            if name == "REDUCE" and isinstance(func, tuple) and func[0] == "global":
                scan.called.add(func[1])
            stack.append(None)
        elif name == "NEWOBJ_EX":
            stack.pop(), stack.pop()
            stack[-1] = None
        elif name in ("MARK",):
            stack.append(_MARK)
        elif name in ("TUPLE", "LIST", "DICT", "FROZENSET", "OBJ"):
            _pop_mark(stack)
            stack.append(None)
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            _pop_mark(stack)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            del stack[len(stack) - count :]
            stack.append(None)
        elif name in ("APPEND", "BUILD", "POP"):
            stack.pop()
        elif name == "BINPERSID":  # replaces the persistent id on the stack with the object
            stack[-1] = None
        elif name == "SETITEM":
            stack.pop(), stack.pop()
        elif name == "POP_MARK":
            _pop_mark(stack)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(int(arg)))
        elif name in ("PROTO", "FRAME", "STOP"):
            continue
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            stack.append(arg)
        else:  # every other opcode pushes one plain value
            stack.append(None)
    if stack and stack[-1] is _MARK:  # pragma: no cover - malformed pickle
        raise LoadError("malformed pickle")


def _python3_name(module: str, name: str) -> str:
    """The Python 3 name of a protocol-2 global, mapped as pickle (and torch) map it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _pop_mark(stack: list[Any]) -> None:
    while stack:
        if stack.pop() is _MARK:
            return


def _scan_file(path: Path) -> _Scan:
    """Scan exactly the pickles torch.load will read: the archive's ``data.pkl`` record, as torch's
    own zip reader finds it; or, in the legacy format, the five pickles one after another."""
    scan = _Scan()
    try:
        if zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                record = torch._C.PyTorchFileReader(f).get_record("data.pkl")
            _scan_pickle(io.BytesIO(record), scan)
        else:
            with open(path, "rb") as f:
                # magic number, protocol, system info, the object, its storage keys
                for _ in range(5):
                    _scan_pickle(f, scan)
    except LoadError:
        raise
    except Exception as error:
        raise LoadError(f"{path}: the file is damaged or truncated ({type(error).__name__}: {error})") from error
    return scan


def _resolve(full: str) -> Any:
    """The object a pickle global names, importing its module unless it is the standard library."""
    parts = full.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name, attributes = ".".join(parts[:split]), parts[split:]
        top = module_name.split(".")[0]
        if module_name in sys.modules:
            module = sys.modules[module_name]
        elif top in sys.stdlib_module_names or top == "__main__":
            continue
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            except Exception as error:  # the named module itself fails when imported
                raise LoadError(
                    f"the file's class {full} lives in module {module_name}, which raised "
                    f"{type(error).__name__} when imported: {first_line(error)}"
                ) from error
        obj: Any = module
        try:
            for attribute in attributes:
                obj = getattr(obj, attribute)
        except AttributeError:
            continue
        return obj
    return None


def _admitted_globals(path: Path, scan: _Scan) -> list[tuple[Any, str]]:
    """The allowlist for this file, or UnsafeFileError naming the first global refused."""
    from torch import _weights_only_unpickler as unpickler

    torch_allowed = unpickler._get_allowed_globals()
    if scan.referenced & set(_GRAPH_MODULE):
        raise UnsafeFileError(
            f"{path}: refused to load: the file holds a torch.fx GraphModule, whose forward code "
            f"is stored in the file and would be executed on load; {_TRUST_HINT}"
        )
    admitted: list[tuple[Any, str]] = []
    for full in sorted(scan.referenced):
        if full in torch_allowed:
            continue
        if full in _INERT:
            admitted.append((_INERT[full], full))
            continue
        try:
            obj = _resolve(full)
        except LoadError as error:
            raise LoadError(f"{path}: {error}") from error.__cause__
        is_module_class = isinstance(obj, type) and issubclass(obj, nn.Module)
        if obj is None and full.split(".")[0] not in sys.stdlib_module_names and not full.startswith("builtins."):
            raise LoadError(
                f"{path}: the model's class {full} cannot be imported; make its module importable "
                "(install its package, or set PYTHONPATH, e.g. PYTHONPATH=. for a module in this folder) and try again"
                + (" (classes defined in a script's __main__ cannot be found: move them into a module)"
                   if full.startswith("__main__.") else "")
            )
        if not is_module_class:
            raise UnsafeFileError(
                f"{path}: refused to load: the file references {full}, which is not a torch.nn.Module "
                f"class, so loading it could run code; {_TRUST_HINT}"
            )
        if full in scan.called:
            raise UnsafeFileError(
                f"{path}: refused to load: the file calls the constructor of {full} with arguments "
                f"stored in the file (torch.save never does), which could run code; {_TRUST_HINT}"
            )
        admitted.append((obj, full))
    return admitted


# -- loading ----------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust: bool = False,
    prefix: str | None = None,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Load a model the way the command line does.

    Args:
        path: a ``torch.save`` file of a whole module or of a state_dict (the latter needs
            ``arch``), a training framework's checkpoint dict holding either (see
            ``convfuse.checkpoints``), a safetensors file (with ``arch``), a TorchScript archive,
            or an ExportedProgram (``.pt2``).
        arch: for a state_dict: a torchvision model name (``resnet50``), ``timm:NAME`` or
            ``package.module:factory``.
        trust: load an arbitrary pickle with torch's full unpickler (runs code from the file).
        prefix: the state_dict's key prefix to strip (e.g. ``model.``); by default a wrapper's
            prefix (``module.``, ``_orig_mod.``, ``model.``) is stripped where that makes the keys fit.
        map_location: where tensors are loaded (default: the CPU).

    Raises:
        LoadError: the file is missing, damaged, holds no model, or does not fit ``arch``.
        UnsafeFileError: the pickle references something other than module classes.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "torchscript":
        try:
            return torch.jit.load(str(path), map_location=map_location)
        except Exception as error:
            raise LoadError(f"{path}: the TorchScript archive cannot be loaded ({first_line(error)})") from error
    if fmt == "exported":
        from convfuse.exported import load_exported

        return load_exported(path, trust=trust)
    if fmt == "safetensors":
        return _as_module(path, checkpoints.read_safetensors(path), arch, prefix, fmt)
    obj = _load_pickle(path, trust=trust, map_location=map_location)
    return _as_module(path, obj, arch, prefix)


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")


def _load_pickle(path: Path, *, trust: bool, map_location: Any) -> Any:
    if trust:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:
            raise LoadError(f"{path}: cannot be loaded ({type(error).__name__}: {first_line(error)})") from error
    admitted = _admitted_globals(path, _scan_file(path))
    try:
        with torch.serialization.safe_globals(admitted):
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        text = str(error)
        match = _UNSUPPORTED_GLOBAL.search(text)
        if match:  # something the scan could not see (e.g. a newer pickle protocol)
            raise UnsafeFileError(
                f"{path}: refused to load: the file references {match.group(1)}; {_TRUST_HINT}"
            ) from error
        if "Only persistent_load of storage" in text:
            raise LoadError(
                f"{path}: a whole model in torch.save's legacy (pre-1.6) format, which torch's "
                f"weights-only loader cannot read; re-save it with a current torch.save, or {_TRUST_HINT}"
            ) from error
        raise LoadError(
            f"{path}: cannot be loaded safely ({type(error).__name__}: {first_line(error)}); "
            f"if the file is damaged, re-save it; if it uses pickle features torch's weights-only "
            f"loader does not support, {_TRUST_HINT}"
        ) from error
    _refuse_callables_from_file(path, loaded)
    return loaded


def _refuse_callables_from_file(path: Path, loaded: Any) -> None:
    """UnsafeFileError where the file gave a module hooks or its own ``forward``.

    What a safe load admits can still be callable (a module class, a ``functools.partial`` of
    one); torch would call hooks, and the module's ``forward``, with arguments the file chose. A
    model saved by torch.save of real code never holds such values here: its hook functions would
    have been refused by the scan.
    """
    roots = [loaded] if isinstance(loaded, nn.Module) else []
    if isinstance(loaded, Mapping):
        roots = [value for value in loaded.values() if isinstance(value, nn.Module)]
    for root in roots:
        for name, module in root.named_modules():
            attributes = vars(module)
            hooks = [key for key, value in attributes.items() if key.endswith("hooks") and value]
            if hooks or "forward" in attributes:
                what = ", ".join(hooks) if hooks else "forward"
                raise UnsafeFileError(
                    f"{path}: refused to load: the file sets {what} of module {name or '(model)'}, which torch "
                    f"would call with arguments chosen by the file; {_TRUST_HINT}"
                )


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
    """SaveError now, rather than after fusing, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{path}: is a directory; give a file name for the output")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SaveError(f"{path}: cannot be written (no write permission in {ancestor})")
    if path.exists() and not os.access(path, os.W_OK):
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
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as error:
        raise SaveError(f"{path}: cannot be written ({error.strerror or error})") from error
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (SaveError, KeyboardInterrupt, SystemExit)):
            raise
        raise SaveError(f"{path}: cannot be written {what} ({type(error).__name__}: {first_line(error)})".replace("  ", " ")) from error


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
