"""Shared by the examples: give BatchNorm layers statistics a trained model would have.

A freshly built BatchNorm has running mean 0, variance 1, weight 1 and bias 0: at eval it is
(almost) the identity, so folding it changes nothing and proves nothing. A real model comes
with trained statistics; the examples imitate them with random ones.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``model`` random running statistics and affine parameters, in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm) or module.running_mean is None:
                continue
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)  # [-1, 1]
            module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.25)  # [0.25, 2.25]
            if module.affine:
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)  # [0.5, 1.5]
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)  # [-0.5, 0.5]
    return model
