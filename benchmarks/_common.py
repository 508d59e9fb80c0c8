"""Helpers shared by the benchmark scripts: BN randomisation, counting the norms a forward pass
executes, comparing nested outputs, the header line and markdown tables.

Benchmarks, not tests: nothing here asserts; the scripts print tables and choose their exit code.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from convfuse.fold.table import is_norm
from convfuse.testing import randomize_bn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

REL_TOL = 1e-4
"""A float32 output counts as wrong when max|fused - original| exceeds this fraction of the
original output's largest magnitude (any output tensor of the nested result)."""


# -- models -------------------------------------------------------------------------------


def deep_model(blocks: int, channels: int = 16, seed: int = 0) -> nn.Sequential:
    """nn.Sequential of ``blocks`` conv-BN-ReLU blocks (plain torch classes, always loadable safely)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
    model = nn.Sequential(*layers)
    # keep activations bounded over hundreds of blocks: scale conv weights to ~unit gain
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(1.0 / math.sqrt(m.weight[0].numel()) / m.weight.std())
    return randomize_bn(model, seed).eval()


# -- counting the norms a forward pass executes -------------------------------------------

_BATCH_NORM = {F.batch_norm, torch.batch_norm, torch.native_batch_norm}
_MUL = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}


def _uses_running_stats(func: Any, args: Sequence, kwargs: dict) -> bool:
    """Whether a batch_norm call normalises with running statistics (what folding removes), not
    with batch statistics (a BN without running stats, or weight standardisation: timm's
    StdConv2d normalises its weight with ``F.batch_norm(w, None, None, training=True)``)."""
    # F.batch_norm(input, running_mean, ...); torch.batch_norm(input, weight, bias, running_mean, ...)
    mean_at = 1 if func is F.batch_norm else 3
    running_mean = args[mean_at] if len(args) > mean_at else kwargs.get("running_mean")
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    return running_mean is not None and not training


def _per_channel(t: Any, like: Any) -> bool:
    """``t`` is a (1, C, 1, 1) tensor and ``like`` a 4-D tensor with C channels."""
    return (
        isinstance(t, Tensor)
        and isinstance(like, Tensor)
        and t.dim() == 4
        and like.dim() == 4
        and t.shape[0] == 1
        and t.shape[2] == 1
        and t.shape[3] == 1
        and t.shape[1] == like.shape[1]
    )


class NormCounter(TorchFunctionMode):
    """Counts the batch norms one forward pass executes, whatever form they take.

    * ``batch_norm`` calls with running statistics: every nn.BatchNormNd / SyncBatchNorm forward
      at eval, and any graph that calls ``F.batch_norm`` functionally (calls that normalise with
      batch statistics, e.g. weight standardisation, are not BatchNorm layers and not counted).
    * frozen-BN affines: torchvision's FrozenBatchNorm2d computes ``x * scale + bias`` with
      per-channel (1, C, 1, 1) ``scale`` and ``bias``. torch.fx inlines that forward (the module
      is not a leaf) and constant-folds ``scale`` and ``bias`` into tensor constants, so a
      GraphModule runs it without the module and without ``rsqrt``; what remains is a ``mul`` by a
      (1, C, 1, 1) tensor whose result is ``add``-ed to a (1, C, 1, 1) tensor. That pair is
      counted, in the module and in its inlined form alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batch_norm = 0
        self.affine = 0
        self._scaled: dict[int, weakref.ref] = {}  # mul results, by id (Tensor == is elementwise)

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _BATCH_NORM:
            if _uses_running_stats(func, args, kwargs):
                self.batch_norm += 1
        elif func in _MUL and len(args) == 2:
            a, b = args
            if _per_channel(b, a) or _per_channel(a, b):
                self._scaled[id(result)] = weakref.ref(result)
        elif func in _ADD and len(args) == 2:
            a, b = args
            if (self._was_scaled(a) and _per_channel(b, a)) or (self._was_scaled(b) and _per_channel(a, b)):
                self.affine += 1
        return result

    def _was_scaled(self, t: Any) -> bool:
        ref = self._scaled.get(id(t))
        return ref is not None and ref() is t

    @property
    def total(self) -> int:
        return self.batch_norm + self.affine


@dataclass
class NormCount:
    executed: int  # batch_norm calls + frozen-BN affines in one forward
    batch_norm: int
    affine: int
    hooked: int | None  # forward calls of norm modules (is_norm) seen by hooks; None for none hooked


@contextmanager
def _norm_hooks(model: nn.Module) -> Iterator[list[int]]:
    calls = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_norm(m)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def run_counted(model: nn.Module, batch: tuple[tuple, dict]) -> tuple[Any, NormCount]:
    """One forward pass under ``NormCounter`` and forward hooks on the norm modules (``is_norm``);
    the output and the counts. On an original model both counts agree; on a GraphModule the hooks
    miss inlined FrozenBatchNorm2d layers, the counter does not."""
    args, kwargs = batch
    counter = NormCounter()
    with torch.no_grad(), _norm_hooks(model) as hooked, counter:
        output = model(*args, **kwargs)
    return output, NormCount(counter.total, counter.batch_norm, counter.affine, hooked[0])


def run(model: nn.Module, batch: tuple[tuple, dict]) -> Any:
    args, kwargs = batch
    with torch.no_grad():
        return model(*args, **kwargs)


# -- comparing outputs --------------------------------------------------------------------


def leaves(obj: Any, path: str = "out") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested output (tensors, dicts, lists, tuples, named tuples) with its path.

    Deliberately not convfuse.verify's: the benchmark judges convfuse's results, so it compares
    outputs with code of its own.
    """
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for name, value in zip(obj._fields, obj):
            yield from leaves(value, f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield path, type(obj)()
        for i, value in enumerate(obj):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


@dataclass
class Difference:
    rel_error: float  # max over float leaves of max|a - b| / max|a|; inf for a structure change
    problem: str | None  # structure / shape / exact-leaf difference, if any

    @property
    def wrong(self) -> bool:
        return self.problem is not None or not self.rel_error <= REL_TOL


def difference(expected: Any, actual: Any) -> Difference:
    """How far ``actual`` is from ``expected``: a structure change, or the worst relative error."""
    left, right = list(leaves(expected)), list(leaves(actual))
    if len(left) != len(right):
        return Difference(math.inf, f"{len(left)} output leaves became {len(right)}")
    worst = 0.0
    for (path_a, a), (path_b, b) in zip(left, right):
        if path_a != path_b:
            return Difference(math.inf, f"output structure changed at {path_a}")
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return Difference(math.inf, f"{path_a} changed type")
        if not isinstance(a, Tensor):
            if a != b:
                return Difference(math.inf, f"{path_a} changed value")
            continue
        if a.shape != b.shape:
            return Difference(math.inf, f"{path_a} shape {tuple(a.shape)} -> {tuple(b.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return Difference(math.inf, f"{path_a} (integer) changed")
            continue
        a64, b64 = a.double(), b.double()
        if not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return Difference(math.inf, f"{path_a} non-finite values changed")
        finite = torch.isfinite(a64)
        if not finite.any():
            continue
        scale = float(a64[finite].abs().max())
        error = float((a64[finite] - b64[finite]).abs().max())
        worst = max(worst, error / scale if scale > 0 else (0.0 if error == 0 else math.inf))
    return Difference(worst, None)


# -- environment and output ---------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(title: str, extra: str = "") -> str:
    import torchvision

    import convfuse

    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    line = (
        f"{now}; convfuse {convfuse.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}; CPU: {cpu_name()} ({os.cpu_count()} logical cores visible), "
        f"torch threads: {torch.get_num_threads()}"
    )
    return f"## {title}\n\n{line}" + (f"; {extra}" if extra else "") + "\n"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column, 'l' or 'r' (default: l then r)."""
    align = align or "l" + "r" * (len(columns) - 1)
    cells = [[str(c) for c in row] for row in rows]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def fmt_err(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    return f"{value:.1e}"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def short_error(error: BaseException, limit: int = 90) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def emit(text: str, output: str | None) -> None:
    """Print the report, and write it to ``output`` (a path) when given."""
    sys.stdout.write(text)
    sys.stdout.flush()
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
