"""Helpers for trying convfuse (or any fuser) on models that were never trained.

A freshly built BatchNorm has running mean 0, variance 1, weight 1 and bias 0: at eval it is
(almost) the identity, so folding it changes nothing and a wrong fold goes unnoticed. Give the
norms statistics a trained model would have before fusing an untrained one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convfuse.fold.table import is_norm

__all__ = ["randomize_bn"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like layer random running statistics and affine parameters, in place.

    Means in [-1, 1], variances in [0.25, 2.25], weights in [0.5, 1.5] with random signs on a
    quarter of them, biases in [-0.5, 0.5]: far from the identity a fresh layer computes.
    Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(tensor: Tensor, low: float, high: float) -> Tensor:
        values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low) + low
        return values.to(device=tensor.device, dtype=tensor.dtype)

    with torch.no_grad():
        for module in model.modules():
            if not is_norm(module) or getattr(module, "running_mean", None) is None:
                continue
            module.running_mean.copy_(draw(module.running_mean, -1.0, 1.0))
            module.running_var.copy_(draw(module.running_var, 0.25, 2.25))
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if weight is not None:
                signs = torch.where(draw(weight, 0, 1) < 0.25, -1.0, 1.0).to(weight.dtype)
                weight.copy_(draw(weight, 0.5, 1.5) * signs)
            if bias is not None:
                bias.copy_(draw(bias, -0.5, 0.5))
    return model
