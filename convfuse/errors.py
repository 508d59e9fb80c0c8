"""The errors convfuse raises: each one names what went wrong and how to fix it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from convfuse.report import FuseReport


class ConvfuseError(Exception):
    """Base of every error convfuse raises on purpose.

    ``exit_code`` is what the command line exits with (DESIGN.md): 2 when the user must fix
    something (usage, an unreadable or unsafe input, an unwritable output), 1 when the model
    failed a check.
    """

    exit_code = 2


class UsageError(ConvfuseError):
    """An argument or option that cannot work as given."""


class LoadError(ConvfuseError):
    """A file that could not be read as a model."""


class UnsafeFileError(LoadError):
    """A pickle that would run code other than building modules and tensors."""


class SaveError(ConvfuseError):
    """The fused model could not be written."""


class TrainingModeError(ConvfuseError):
    """The model is in training mode, where BatchNorm uses batch statistics."""


class InputError(ConvfuseError):
    """Inputs for verification could not be built, or the model rejected them."""


class CheckFailed(ConvfuseError):
    """The model failed a check; the report says which. Nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report: FuseReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class VerificationError(CheckFailed):
    """The fused model does not compute what the original computed."""


class StrictError(CheckFailed):
    """``--strict`` was given and some BatchNorm layers are left unfused."""


def first_line(error: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened: for one-line error reports."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
