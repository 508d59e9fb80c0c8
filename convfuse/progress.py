"""Step notifications: the library says when each step of a run starts and ends; a listener shows them.

The library never writes to the terminal (only ``convfuse.cli`` does): the command line installs a
listener for the run, and every ``timed`` step calls it. Without one, nothing happens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

__all__ = ["Listener", "finished", "listening", "started", "timed"]


class Listener(Protocol):
    def started(self, step: str) -> None: ...

    def finished(self, step: str, seconds: float) -> None: ...


_LISTENER: ContextVar[Listener | None] = ContextVar("convfuse_progress", default=None)


@contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Send the steps run inside the ``with`` block to ``listener`` (None: to no one)."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def started(step: str) -> None:
    listener = _LISTENER.get()
    if listener is not None:
        listener.started(step)


def finished(step: str, seconds: float) -> None:
    listener = _LISTENER.get()
    if listener is not None:
        listener.finished(step, seconds)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[name]`` (seconds), telling the
    progress listener when the step starts and when it has succeeded."""
    start = time.perf_counter()
    started(name)
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        timings[name] = timings.get(name, 0.0) + seconds
    finished(name, seconds)
