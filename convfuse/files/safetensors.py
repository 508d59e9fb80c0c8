"""safetensors files: recognised by their header, read with the safetensors package, written from a state_dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from convfuse.errors import LoadError, SaveError

_SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= min(size - 8, _SAFETENSORS_HEADER_LIMIT) and head[8:9] == b"{"


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file (on the CPU); LoadError if it is damaged."""
    try:
        from safetensors.torch import load_file
    except ImportError as error:  # pragma: no cover - a dependency
        raise LoadError(f"{path}: a safetensors file; install the safetensors package to read it") from error
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise LoadError(f"{path}: the safetensors file is damaged or truncated ({type(error).__name__}: {error})") from error


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else None


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    """``tensors`` as a safetensors file, with the header ``metadata``."""
    from safetensors.torch import save

    return save(_unshared(tensors), metadata=metadata)


def _unshared(tensors: dict[str, Any]) -> dict[str, Tensor]:
    """Contiguous tensors with no storage shared (safetensors refuses aliases, e.g. tied weights)."""
    result: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise SaveError(f"the state_dict entry {key} is a {type(value).__name__}; safetensors holds tensors only")
        tensor = value.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        result[key] = tensor
    return result
