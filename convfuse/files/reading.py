"""Reading a model file: the format torch would see, the safe-loading policy, and where in the file the model lay.

Without ``trust``, nothing the file chose runs (DESIGN.md, Security): a pickle is read by
``torch.load`` with a restricted unpickler (``convfuse.files.unpickler``) that admits globals
from the allowed packages only (``convfuse.files.trust``) and never calls what the file chose,
and the objects it built are checked before anything runs on them (``convfuse.files.graph``).
TorchScript archives are code and need ``trust``; ExportedProgram archives are vetted first
(``convfuse.files.archives``). The format is the one torch itself would see, from the first bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse.errors import LoadError, UnsafeFileError, UsageError, first_line
from convfuse.files.archives import ZIP_MAGIC, open_archive
from convfuse.files.checkpoints import Loaded, find_model
from convfuse.files.formats import TRUST_HINT, detect_format, quiet, refusal
from convfuse.files.graph import check_object_graph
from convfuse.files.safetensors import read_safetensors
from convfuse.files.trust import Policy, Refused
from convfuse.files.unpickler import pickle_module


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
            ``convfuse.files.checkpoints``), a safetensors file (with ``arch``), an ExportedProgram
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
    return load_file(path, arch=arch, trust=trust, allow=allow, prefix=prefix, map_location=map_location).model


def load_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust: bool = False,
    allow: Iterable[str] = (),
    prefix: str | None = None,
    map_location: str | torch.device | None = "cpu",
) -> Loaded:
    """:func:`load`, with where in the file the model lay (its checkpoint container, key and key
    prefix), so that :func:`convfuse.save` can write the fused model back in the same place."""
    path = Path(path)
    try:
        policy = Policy(allow)
    except ValueError as error:
        raise UsageError(str(error)) from error
    fmt = detect_format(path)
    if fmt == "torchscript":
        return Loaded(_load_torchscript(path, trust=trust, map_location=map_location), fmt)
    if fmt == "exported":
        from convfuse.graphs.aten import load_exported

        return Loaded(load_exported(path, trust=trust), fmt)
    if fmt == "safetensors":
        return find_model(path, read_safetensors(path), arch=arch, prefix=prefix, fmt=fmt)
    obj = _load_pickle(path, trust=trust, policy=policy, map_location=map_location)
    return find_model(path, obj, arch=arch, prefix=prefix)


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
    """The way out where torch's full unpickler looked for the model's class in ``__main__``: a class
    defined in the script that saved the file, which no other program has."""
    return f"; {_MAIN_HINT}" if isinstance(error, AttributeError) and "__main__" in str(error) else ""


_MAIN_HINT = (
    "the model's class was defined in the script that saved it (__main__), where no other program can find it: "
    "move the class into a module, make that importable (PYTHONPATH=. for this folder) and save the model again, "
    "or save its state_dict and use --arch module:factory"
)
