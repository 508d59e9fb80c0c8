"""The float64 rounding remainders of folded weights, kept where they are written, so that the
float64 proof can rebuild each folded parameter at float64 precision from what the model holds.

A fold is computed in float64 and stored in the layer's dtype; the remainder is ``exact -
exact.to(dtype)``, taken from the float64 value the fold computed, not from what was written:
the proof's rebuild ``param.double() + remainder`` is then the computed value only where the
write stored exactly its rounding, so a mistake in the arithmetic, in writing or in the
rewrite all show. Remainders are kept only inside ``recording()`` (one fuse pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["Remainders", "exact", "keep", "recording"]


class Remainders:
    """Remainders by parameter (identity): float32 for float32 parameters (the rebuild then
    carries 48 bits, 3.6e-15 relative), float64 for float16/bfloat16 ones (exact); float64
    parameters hold the fold exactly and need none."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[Tensor, Tensor | None]] = {}

    def keep(self, param: Tensor, computed: Tensor) -> None:
        """Note that ``param`` was written from the float64 ``computed``."""
        if not param.is_floating_point():
            return
        remainder = None
        if param.dtype != torch.float64:
            computed = computed.detach().to(device=param.device, dtype=torch.float64)
            difference = computed - computed.to(param.dtype).double()
            remainder = difference.to(torch.float32 if param.dtype == torch.float32 else torch.float64)
        self._kept[id(param)] = (param, remainder)

    def exact(self, param: Tensor) -> Tensor:
        """``param`` at float64 precision: its value plus the remainder kept for it (float64)."""
        kept = self._kept.get(id(param))
        value = param.detach().double()
        if kept is None or kept[0] is not param or kept[1] is None or kept[1].shape != value.shape:
            return value
        return value + kept[1].double()

    def __contains__(self, param: object) -> bool:
        kept = self._kept.get(id(param))
        return kept is not None and kept[0] is param

    def __len__(self) -> int:
        return len(self._kept)


_current: ContextVar[Remainders | None] = ContextVar("convfuse_remainders", default=None)


@contextmanager
def recording() -> Iterator[Remainders]:
    """Keep the remainders of every fold written inside the block."""
    remainders = Remainders()
    token = _current.set(remainders)
    try:
        yield remainders
    finally:
        _current.reset(token)


def keep(param: Tensor, computed: Tensor) -> None:
    """Where a recording is on, note that ``param`` was written from float64 ``computed``."""
    remainders = _current.get()
    if remainders is not None:
        remainders.keep(param, computed)


def exact(param: Tensor | None) -> Tensor | None:
    """``param`` as a fold should read it: at float64 precision where an earlier fold of this
    pass wrote it (a conv absorbing a norm on each side, a merged branch), else as it is."""
    remainders = _current.get()
    if param is None or remainders is None or param not in remainders:
        return param
    return remainders.exact(param)
