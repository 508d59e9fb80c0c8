"""The fused model written back where it was read: in its checkpoint container, as its weights alone,
and in ultralytics' own layout of a fused block."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from convfuse.files.checkpoints import Loaded
from convfuse.files.safetensors import safetensors_bytes


def pack(like: Loaded | None, model: nn.Module) -> Any:
    """What ``torch.save`` writes for the fused ``model``: the container it was read from with the
    model (or its state_dict, under the same key prefix) in its place, every other key kept; the
    model itself where the file held no container."""
    if like is None or like.container is None:
        return model
    container = copy.copy(like.container)
    if like.stored == "module":
        container[like.key] = model
    else:
        container[like.key] = {**weights_of(model, like.prefix), **like.rest}
    return container


def weights_of(model: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The fused model's state_dict, its keys under ``prefix``."""
    return {f"{prefix}{key}": value for key, value in model.state_dict().items()}


def fused_safetensors(model: nn.Module, like: Loaded | None) -> bytes:
    """The fused weights as a safetensors file (the input's key prefix, other entries and metadata kept)."""
    prefix, rest, metadata = ("", {}, None) if like is None else (like.prefix, like.rest, like.metadata)
    return safetensors_bytes({**weights_of(model, prefix), **rest}, metadata)


@contextmanager
def framework_layout(model: Any) -> Iterator[None]:
    """While saving: ultralytics' own layout of a fused block, so that its loader takes the file.

    ultralytics' loaders run ``model.fuse()``, which folds ``m.bn`` into ``m.conv`` for every block
    that still has a ``bn``: on a convfuse ``nn.Identity`` that fails. A block ultralytics fused
    itself has no ``bn`` and calls ``forward_fuse``; that is written instead for each block where
    convfuse folded the norm and where a probe shows the two compute the same, bit for bit.
    The model in memory is restored afterwards.
    """
    changed = [c for c in map(_use_forward_fuse, _ultralytics_blocks(model)) if c is not None]
    try:
        yield
    finally:
        for block, norm in changed:
            del block.forward
            block._modules["bn"] = norm


def _ultralytics_blocks(model: Any) -> list[nn.Module]:
    if not isinstance(model, nn.Module) or not type(model).__module__.startswith("ultralytics."):
        return []
    return [
        m for m in model.modules()
        if type(m._modules.get("bn")) is nn.Identity and callable(getattr(type(m), "forward_fuse", None))
        and "forward" not in vars(m)
    ]


def _use_forward_fuse(block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    conv = next((m for m in block.children() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return None
    generator = torch.Generator().manual_seed(0)
    shape = (2, conv.in_channels, *([8] * (conv.weight.dim() - 2)))
    probe = torch.randn(shape, generator=generator, dtype=torch.float64).to(conv.weight.dtype).to(conv.weight.device)
    norm = block._modules["bn"]
    with torch.no_grad():
        try:
            expected = block(probe)
        except Exception:
            return None
        del block._modules["bn"]
        block.forward = block.forward_fuse
        try:
            same = torch.equal(block(probe), expected)
        except Exception:
            same = False
    if not same:
        del block.forward
        block._modules["bn"] = norm
        return None
    return block, norm
