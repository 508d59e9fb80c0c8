"""The library's entry point: ``fuse`` dispatches on what it is handed (an ``nn.Module``, a
TorchScript module, an ExportedProgram) to the front-end of that graph kind."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from convfuse.errors import UsageError
from convfuse.graphs.aten import fuse_exported
from convfuse.graphs.modules import fuse_module
from convfuse.graphs.torchscript import fuse_scripted
from convfuse.report import FuseResult

__all__ = ["FuseResult", "fuse"]


def fuse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
    reparam: bool = False,
) -> FuseResult:
    """Fold every BatchNorm that can be folded exactly into the conv/linear layer beside it.

    Args:
        model: an ``nn.Module`` in eval mode.
        example_inputs: inputs of one forward call: a tensor, a tuple of positional arguments,
            or a dict of keyword arguments. Without them, inputs are inferred from the first
            layer (its channels or features). Used to verify the result and to learn shapes.
        verify: compare the fused model's outputs with the original's and raise if they differ.
        atol, rtol: tolerances for verification, relative to each output's largest magnitude;
            by default they are derived from the model's own rounding error.
        inplace: fuse ``model`` itself (saves memory) rather than a copy. With ``inplace`` a
            failed verification leaves the model fused; without it ``model`` is never touched.
        reparam: also replace blocks that sum conv branches on one input (RepVGG, MobileOne)
            by a single conv. Changes the module structure more deeply: those blocks become
            an ``nn.Conv2d`` (or a Sequential of it and the block's activation).

    Returns:
        FuseResult with ``.model`` (same class as ``model``) and ``.report``.

    Raises:
        TrainingModeError: the model is in training mode.
        InputError: verification needs inputs and none could be built, or the model rejected them.
        VerificationError: the fused model's outputs differ (``.report`` says where).
    """
    if isinstance(model, torch.export.ExportedProgram):
        if reparam:
            raise UsageError("reparam is supported for nn.Module models, not ExportedPrograms")
        return fuse_exported(model, example_inputs, verify=verify, atol=atol, rtol=rtol)
    if isinstance(model, torch.jit.ScriptModule):
        if reparam:
            raise UsageError("reparam is supported for nn.Module models, not TorchScript")
        return fuse_scripted(model, example_inputs, verify=verify, atol=atol, rtol=rtol, inplace=inplace)
    return fuse_module(model, example_inputs, verify=verify, atol=atol, rtol=rtol, inplace=inplace, reparam=reparam)
