"""Shared test helpers. Every test randomises BatchNorm statistics: a fresh BatchNorm is the
identity at eval and would hide every folding bug."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convfuse.fold.table import is_norm
from convfuse.testing import randomize_bn

__all__ = ["norm_names", "randomize_bn"]


def norm_names(model: nn.Module) -> set[str]:
    """Qualified names of the BatchNorm-like layers still in ``model``."""
    return {name for name, module in model.named_modules() if is_norm(module)}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
