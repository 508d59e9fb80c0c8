"""convfuse: fold BatchNorm into the convolutions and linear layers beside it, and prove the
fused model computes what the original computed before anything is saved."""

from convfuse.api import fuse
from convfuse.errors import (
    CheckFailed,
    ConvfuseError,
    InputError,
    LoadError,
    SaveError,
    StrictError,
    TrainingModeError,
    UnsafeFileError,
    UsageError,
    VerificationError,
)
from convfuse.files import Loaded, load, load_file, save
from convfuse.fold.reasons import Reason, Skipped
from convfuse.report import FusedPair, FuseReport, FuseResult
from convfuse.structure import apply_fused_structure
from convfuse.verify import InputSpec, Verification

__version__ = "0.1.0"

__all__ = [
    "CheckFailed",
    "ConvfuseError",
    "FuseReport",
    "FuseResult",
    "FusedPair",
    "InputError",
    "InputSpec",
    "LoadError",
    "Loaded",
    "Reason",
    "SaveError",
    "Skipped",
    "StrictError",
    "TrainingModeError",
    "UnsafeFileError",
    "UsageError",
    "Verification",
    "VerificationError",
    "__version__",
    "apply_fused_structure",
    "fuse",
    "load",
    "load_file",
    "save",
]
