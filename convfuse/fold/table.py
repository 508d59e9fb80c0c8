"""The table of foldable pairs (data, not code branches) and what makes a layer a producer or a norm.

Adding a pair of layer types is one row in ``PATTERNS``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

try:  # detection backbones use torchvision's frozen BatchNorm
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency, but the math needs only torch

    class FrozenBatchNorm2d(nn.Module):  # type: ignore[no-redef]
        """Stand-in so the table stays valid without torchvision."""


@dataclass(frozen=True)
class Pattern:
    """One foldable pair of layer types: ``producer`` then ``norm``, or ``norm`` then ``producer``."""

    producer: type[nn.Module]
    norm: type[nn.Module]
    norm_first: bool = False
    reshaped: bool = False  # only where reshapes between them keep the channel axis

    @property
    def transpose(self) -> bool:
        return issubclass(self.producer, _ConvTransposeNd)

    @property
    def linear(self) -> bool:
        return issubclass(self.producer, nn.Linear)


_SYNC = nn.SyncBatchNorm
_FROZEN = FrozenBatchNorm2d

PATTERNS: tuple[Pattern, ...] = (
    # A conv or linear layer, then the norm that reads its output.
    Pattern(nn.Conv1d, nn.BatchNorm1d),
    Pattern(nn.Conv1d, _SYNC),
    Pattern(nn.Conv2d, nn.BatchNorm2d),
    Pattern(nn.Conv2d, _SYNC),
    Pattern(nn.Conv2d, _FROZEN),
    Pattern(nn.Conv3d, nn.BatchNorm3d),
    Pattern(nn.Conv3d, _SYNC),
    Pattern(nn.ConvTranspose1d, nn.BatchNorm1d),
    Pattern(nn.ConvTranspose1d, _SYNC),
    Pattern(nn.ConvTranspose2d, nn.BatchNorm2d),
    Pattern(nn.ConvTranspose2d, _SYNC),
    Pattern(nn.ConvTranspose2d, _FROZEN),
    Pattern(nn.ConvTranspose3d, nn.BatchNorm3d),
    Pattern(nn.ConvTranspose3d, _SYNC),
    Pattern(nn.Linear, nn.BatchNorm1d),
    Pattern(nn.Linear, _SYNC),
    # A norm, then the conv or linear layer that reads its output (exact without zero padding).
    Pattern(nn.Conv1d, nn.BatchNorm1d, norm_first=True),
    Pattern(nn.Conv1d, _SYNC, norm_first=True),
    Pattern(nn.Conv2d, nn.BatchNorm2d, norm_first=True),
    Pattern(nn.Conv2d, _SYNC, norm_first=True),
    Pattern(nn.Conv2d, _FROZEN, norm_first=True),
    Pattern(nn.Conv3d, nn.BatchNorm3d, norm_first=True),
    Pattern(nn.Conv3d, _SYNC, norm_first=True),
    Pattern(nn.Linear, nn.BatchNorm1d, norm_first=True),
    Pattern(nn.Linear, _SYNC, norm_first=True),
    # A conv whose output is reshaped (channels kept on axis 1) for a norm of another rank.
    Pattern(nn.Conv2d, nn.BatchNorm1d, reshaped=True),
    Pattern(nn.Conv3d, nn.BatchNorm1d, reshaped=True),
    Pattern(nn.Conv3d, nn.BatchNorm2d, reshaped=True),
    Pattern(nn.ConvTranspose2d, nn.BatchNorm1d, reshaped=True),
    Pattern(nn.ConvTranspose3d, nn.BatchNorm1d, reshaped=True),
    Pattern(nn.ConvTranspose3d, nn.BatchNorm2d, reshaped=True),
)

# The methods whose code defines what a layer computes; a subclass that replaces any of them
# computes something else until proven otherwise.
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding")


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm-like layer that convfuse counts and tries to fold."""
    return isinstance(module, (_BatchNorm, _FROZEN))


def is_producer(module: nn.Module) -> bool:
    """A layer that can absorb a BatchNorm: a conv, transposed conv or linear."""
    return isinstance(module, (_ConvNd, nn.Linear))


def overrides_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module``'s class replaces code that defines what ``base`` computes."""
    cls = type(module)
    return any(
        getattr(cls, name) is not getattr(base, name) for name in _FORWARD_METHODS if hasattr(base, name)
    )


def find_pattern(first: nn.Module, second: nn.Module, *, reshaped: bool = False) -> Pattern | None:
    """The table row for ``first`` feeding ``second``, if any (subclasses match their bases);
    ``reshaped``: reshapes lie between them, which admits more rows."""
    for pattern in PATTERNS:
        if pattern.reshaped and not reshaped:
            continue
        producer, norm = (second, first) if pattern.norm_first else (first, second)
        if isinstance(producer, pattern.producer) and isinstance(norm, pattern.norm):
            return pattern
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own, or global module hooks exist."""
    return own_hooks(module) or global_hooks()


def own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
        or getattr(module, "_backward_pre_hooks", None)
    )


def global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)
