"""Prove that a fused model computes what the original computed: run both, compare every output.

Reference outputs (and what the run shows about each module: calls, input shapes) are recorded
on the original model before it is rewritten, so a large model is never held twice.

The default rule judges the fused model against the original's own rounding error: the
original is run once more in float64 (converted in place and back, losslessly), and each output
of the fused model may differ from the original's by at most ``NOISE_FACTOR`` times the
original's own distance from that float64 result, plus a floor of a few units of rounding,
relative to the output's scale (its largest magnitude). A correct fold differs by rounding
only; a wrong one by far more than the model's noise.

Some outputs are not continuous in rounding (labels and boxes after top-k, NMS, thresholds):
near-ties flip, and whatever runs after them (a detector's ROI heads) sees other inputs. So the
root module of every traced part ("probe") has its inputs and output recorded on each call; if the
final outputs disagree and every fused pair lies inside a probe, each fused probe is run on exactly
the inputs its original saw, and the model passes when every probe passes. Everything outside the
probes is unchanged code, so that proves the whole. Never prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from convfuse.errors import InputError, UsageError, first_line
from convfuse.fold.table import is_norm, is_producer
from convfuse.graphs.fx_pairs import Observation
from convfuse.inputs import (
    SEED,
    Batch,
    InputSpec,
    as_batch,
    candidate_batches,
    inputs_from_shapes,
    map_tensors,
    similar_batch,
)

__all__ = [
    "NOISE_FACTOR",
    "buffers_kept",
    "Batch",
    "InputSpec",
    "Reference",
    "Tolerance",
    "Verification",
    "as_batch",
    "compare",
    "inputs_from_shapes",
    "observe",
    "record_reference",
    "tolerance_for",
]

BATCHES = 3
_SKIP_HINT = "verify=False (--no-verify)"

NOISE_FACTOR = 8.0
"""How many times the original's own rounding error a fused output may differ by."""


@dataclass(frozen=True)
class Tolerance:
    """Default tolerances of one dtype, relative to an output's scale."""

    floor: float  # always allowed: a few units of rounding
    cap: float  # never allowed beyond, however noisy the original is
    fixed: float  # used where no float64 reference could be computed


def _tolerance(dtype: torch.dtype, floor_ulps: float, cap: float, fixed: float) -> Tolerance:
    return Tolerance(floor=floor_ulps * torch.finfo(dtype).eps, cap=cap, fixed=fixed)


_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: _tolerance(torch.float64, 64, 1e-9, 1e-10),
    torch.float32: _tolerance(torch.float32, 16, 1e-3, 5e-5),
    torch.float16: _tolerance(torch.float16, 4, 5e-2, 1e-2),
    torch.bfloat16: _tolerance(torch.bfloat16, 4, 1e-1, 5e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The default tolerances for outputs of ``dtype`` (float32's for other floating types)."""
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


@dataclass
class Verification:
    """The outcome of comparing the fused model with the original; ``passed`` is None if not run.

    ``max_abs_error``/``max_rel_error``: largest |fused - original| over all compared outputs,
    absolute and relative to the output's scale; ``atol``/``rtol``: the tolerance applied at the
    worst output (``worst_output``); ``rule``: how the tolerance was set.
    """

    passed: bool | None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    atol: float = 0.0
    rtol: float = 0.0
    worst_output: str | None = None
    batches: int = 0
    rule: str = "skipped"
    message: str | None = None

    @classmethod
    def skipped(cls, why: str = "verification was turned off") -> Verification:
        return cls(passed=None, message=why)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Call:
    """One call of a probe module: the (args, kwargs) it received and what it returned."""

    inputs: Batch
    output: Any
    truth: Any = None  # the original module's output on the same inputs in float64


@dataclass
class Outputs:
    """What one run recorded: the model's output and each probe module's calls."""

    final: Any
    probes: dict[str, list[Call]] = field(default_factory=dict)


@dataclass
class Reference:
    """Outputs of the original model, recorded before the rewrite."""

    batches: list[Batch]
    outputs: list[Outputs]
    truth: list[Any] | None  # the final outputs in float64, where that could be computed
    observation: Observation
    rerun_noise: float = 0.0  # largest relative difference between two identical runs
    truth_problem: str | None = None


# -- running ----------------------------------------------------------------------------


def _devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _snapshot(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach().clone())


def _reserve_hook_ids(model: nn.Module) -> None:
    """Make torch's next hook ids larger than any the model already holds.

    torch numbers hooks per process, and a model loaded from a file keeps the keys of the process
    that saved it: a temporary hook of ours could get the same key, replace the model's own hook
    in its dict, and remove it with ours.
    """
    top = RemovableHandle.next_id
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, dict) and value and all(isinstance(key, int) for key in value):
                top = max(top, max(value) + 1)
    RemovableHandle.next_id = top


def _run(model: nn.Module, batch: Batch, probes: Sequence[str] = ()) -> Outputs:
    """One forward pass without autograd, the random generator reseeded so that random ops
    (dropout left in training mode, noise layers) draw the same numbers every run."""
    args, kwargs = batch
    recorded: dict[str, list[Call]] = {name: [] for name in probes}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            recorded[name].append(Call((_snapshot(args), _snapshot(kwargs)), _snapshot(output)))

        return hook

    _reserve_hook_ids(model)
    handles = [model.get_submodule(name).register_forward_hook(record(name), with_kwargs=True) for name in probes]
    try:
        output = _call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return Outputs(output, recorded)


def _call(module: nn.Module, batch: Batch) -> Any:
    """``module(*args, **kwargs)`` without autograd, the output detached and copied."""
    args, kwargs = batch
    with torch.random.fork_rng(devices=_devices(module)), torch.no_grad():
        torch.manual_seed(SEED)
        return _snapshot(module(*args, **kwargs))


def _storage(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None


class _ForeignReads(TorchFunctionMode):
    """Notes every op that reads a tensor of a conv/linear/norm layer from outside that layer's
    own forward (e.g. ``y * self.bn.weight`` in a parent): folding would change what it reads."""

    def __init__(self, owners: dict[int, str], active: Counter[str], reads: set[str]) -> None:
        super().__init__()
        self.owners, self.active, self.reads = owners, active, reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # .shape, .dtype: reading metadata is fine
            for value in pytree.tree_leaves((args, kwargs)):
                if isinstance(value, Tensor):
                    owner = self.owners.get(_storage(value))
                    if owner is not None and not self.active[owner]:
                        self.reads.add(owner)
        return func(*args, **kwargs)


@contextmanager
def _observing(model: nn.Module, observation: Observation, parts: Sequence[str] = ()) -> Iterator[None]:
    """Record calls per module, the input shapes each saw, which of the traced ``parts`` were
    running at each call, and foreign reads of layer tensors."""
    active: Counter[str] = Counter()
    part_names = set(parts)
    running: Counter[str] = Counter()

    def enter(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            observation.calls[name] += 1
            active[name] += 1
            observation.inside.setdefault(name, []).append(frozenset(p for p, n in running.items() if n))
            if name in part_names:
                running[name] += 1
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, Tensor):
                observation.input_shapes.setdefault(name, []).append(tuple(first.shape))

        return hook

    def leave(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            active[name] -= 1
            if name in part_names:
                running[name] -= 1
            if isinstance(output, Tensor):
                observation.output_shapes.setdefault(name, []).append(tuple(output.shape))

        return hook

    owners: dict[int, str] = {}
    handles = []
    _reserve_hook_ids(model)
    try:
        for name, module in model.named_modules(remove_duplicate=False):
            if is_norm(module) or is_producer(module):
                for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    key = _storage(tensor)
                    if key is not None:
                        owners.setdefault(key, name)
            try:
                handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
                handles.append(module.register_forward_hook(leave(name)))
            except (RuntimeError, AttributeError):  # scripted modules take no hooks
                continue
        with _ForeignReads(owners, active, observation.direct_reads):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _first_run(model: nn.Module, example_inputs: Any, probes: Sequence[str] = ()) -> tuple[Batch, Outputs, Observation]:
    """Run the model on the example inputs, or on the first inferred shape it accepts."""
    candidates = candidate_batches(model, example_inputs)
    if not candidates:
        raise InputError(
            f"cannot infer the input shape of {type(model).__name__} (its first layer does not tell); "
            "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
        )
    failures = []
    for batch in candidates:
        observation = Observation()
        try:
            with _observing(model, observation, probes):
                outputs = _run(model, batch, probes)
            return batch, outputs, observation
        except Exception as error:  # the model rejects this input; try the next candidate
            failures.append((batch, error))
    inferred = example_inputs is None or (isinstance(example_inputs, InputSpec) and not example_inputs.shapes)
    if not inferred:
        error = failures[0][1]
        given = "inputs of the given shapes" if isinstance(example_inputs, InputSpec) else "the example inputs"
        raise InputError(f"the model raised {type(error).__name__} on {given}: {first_line(error)}")
    tried = ", ".join(str(tuple(b[0][0].shape)) for b, _ in failures)
    raise InputError(
        f"cannot infer the input shape of {type(model).__name__}: it rejected {tried} "
        f"({type(failures[-1][1]).__name__}: {first_line(failures[-1][1])}); "
        "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
    )


def observe(model: nn.Module, example_inputs: Any, parts: Sequence[str] = ()) -> tuple[Batch | None, Observation | None]:
    """The inputs and what one forward pass on them showed (with which traced ``parts`` were
    running at each call); (None, None) where no input the model accepts can be built."""
    try:
        batch, _, observation = _first_run(model, example_inputs, parts)
    except InputError:
        return None, None
    return batch, observation


@contextmanager
def _in_float64(model: nn.Module) -> Iterator[None]:
    """Convert every floating parameter and buffer to float64 in place; restore exactly after.

    float32/float16/bfloat16 -> float64 -> back is lossless, so the model ends bit-identical,
    with the same Parameter objects; it is never held twice.
    """
    params: dict[int, tuple[nn.Parameter, torch.dtype]] = {}
    buffers: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for module in {id(m): m for m in model.modules()}.values():
            for param in module._parameters.values():
                if param is not None and param.is_floating_point() and id(param) not in params:
                    params[id(param)] = (param, param.dtype)
                    param.data = param.data.double()
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    buffers.append((module, name, buffer))
                    module._buffers[name] = buffer.double()
        yield
    finally:
        for param, dtype in params.values():
            param.data = param.data.to(dtype)
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put back the buffers of modules in training mode after the runs inside the block: a
    BatchNorm left in training mode updates its running statistics on every forward pass, and
    convfuse's runs must not change the model it hands back."""
    saved = [
        (module, name, buffer.clone())
        for module in model.modules()
        if module.training
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, value in saved:
                module._buffers[name].copy_(value)


def _to_float64(batch: Batch) -> Batch:
    def convert(value: Tensor) -> Tensor:
        return value.double() if value.is_floating_point() else value

    return map_tensors(batch[0], convert), map_tensors(batch[1], convert)


def record_reference(
    model: nn.Module,
    example_inputs: Any,
    *,
    truth: bool = True,
    count: int = BATCHES,
    probes: Sequence[str] = (),
) -> Reference:
    """Outputs of the original model on ``count`` batches, before any rewrite.

    The first batch is the example inputs (or inferred from the first layer); the others are
    drawn like it with a fixed seed. With ``truth`` the outputs are also computed in float64.
    ``probes`` names modules whose outputs are recorded as well. Raises InputError when no
    input the model accepts can be built.
    """
    batch, outputs, observation = _first_run(model, example_inputs, probes)
    generator = torch.Generator().manual_seed(SEED + 1)
    batches, recorded = [batch], [outputs]
    for spread in (1.0, 2.0)[: count - 1]:
        candidate = similar_batch(batch, generator, spread)
        try:
            recorded.append(_run(model, candidate, probes))
        except Exception:  # the model rejects redrawn inputs (e.g. it needs values in a range)
            continue
        batches.append(candidate)
    rerun = _run(model, batch)
    reference = Reference(batches, recorded, None, observation)
    if _structure_difference(outputs.final, rerun.final) is not None:
        reference.truth_problem = "nondeterministic"
        return reference
    reference.rerun_noise = max(
        (_relative_difference(a, b) for _, a, b in _paired_floats(outputs.final, rerun.final)), default=0.0
    )
    if reference.rerun_noise > tolerance_for(_output_dtype(outputs.final)).cap:
        reference.truth_problem = "nondeterministic"
        return reference
    if truth:
        reference.truth, reference.truth_problem = _float64_outputs(model, batches)
        for name in probes:  # each part alone, on the very inputs it saw
            calls = [call for outputs in recorded for call in outputs.probes[name]]
            module = model.get_submodule(name)
            truths, _ = _float64_outputs(module, [call.inputs for call in calls])
            for call, value in zip(calls, truths or []):
                call.truth = value
    return reference


def _float64_outputs(module: nn.Module, batches: list[Batch]) -> tuple[list[Any] | None, str | None]:
    """The module's outputs in float64: converting each submodule just while it runs (little
    extra memory), else, where a forward reads another module's tensors, all at once."""
    problem = None
    for convert in (_float64_while_running, _in_float64):
        try:
            with convert(module):
                return [_call(module, _to_float64(b)) for b in batches], None
        except Exception as error:  # e.g. an op without a float64 kernel on this device
            problem = f"the float64 run raised {type(error).__name__}: {first_line(error)}"
    return None, problem


@contextmanager
def _float64_while_running(model: nn.Module) -> Iterator[None]:
    """Give each module float64 parameters and buffers from the start to the end of its forward.

    Peak extra memory is what the modules on the call stack hold directly, not the model. A
    tensor shared by several modules is converted once while any of them runs (counted).
    Raises (and restores everything) where a forward uses a tensor of a module that is not
    running, which is then still in its own dtype.
    """
    counts: dict[int, int] = {}
    originals: dict[int, torch.dtype] = {}
    saved_buffers: dict[tuple[int, str], Tensor] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        for param in module._parameters.values():
            if param is not None and param.is_floating_point():
                if counts.get(id(param), 0) == 0:
                    originals[id(param)] = param.dtype
                    param.data = param.data.double()
                counts[id(param)] = counts.get(id(param), 0) + 1
        for name, buffer in module._buffers.items():
            key = (id(module), name)
            if buffer is not None and buffer.is_floating_point() and key not in saved_buffers:
                saved_buffers[key] = buffer
                module._buffers[name] = buffer.double()

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        for param in module._parameters.values():
            if param is not None and id(param) in counts:
                counts[id(param)] -= 1
                if counts[id(param)] == 0:
                    param.data = param.data.to(originals[id(param)])
        for name in module._buffers:
            key = (id(module), name)
            if key in saved_buffers:
                module._buffers[name] = saved_buffers.pop(key)

    params = {id(p): p for p in model.parameters()}
    modules = {id(m): m for m in model.modules()}.values()
    handles = []
    _reserve_hook_ids(model)
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for pid, count in counts.items():
            if count > 0:
                params[pid].data = params[pid].data.to(originals[pid])
        for module in modules:
            for name in list(module._buffers):
                key = (id(module), name)
                if key in saved_buffers:
                    module._buffers[name] = saved_buffers.pop(key)


# -- comparing --------------------------------------------------------------------------


def _leaves(obj: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """Every leaf of a nested output, with a path that says where it is."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}[{key!r}]")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        for name, value in zip(obj._fields, obj):
            yield from _leaves(value, f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield path, type(obj)()
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def _describe_leaf(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _structure_difference(expected: Any, actual: Any, path: str = "output", *, dtypes: bool = True) -> str | None:
    """Where two outputs differ in structure, shape or (``dtypes``) dtype; None where they match."""
    left, right = list(_leaves(expected, path)), list(_leaves(actual, path))
    for (path_a, a), (path_b, b) in zip(left, right):
        if path_a != path_b:
            return f"output structure differs: {path_a} vs {path_b}"
        if isinstance(a, Tensor) != isinstance(b, Tensor) or (
            isinstance(a, Tensor) and (a.shape != b.shape or (dtypes and a.dtype != b.dtype))
        ):
            return f"{path_a} is {_describe_leaf(a)} in the original but {_describe_leaf(b)} after fusing"
    if len(left) != len(right):
        extra = (left if len(left) > len(right) else right)[min(len(left), len(right))][0]
        return f"output structure differs at {extra}: {len(left)} leaves in the original, {len(right)} after fusing"
    return None


def _exact_difference(expected: Any, actual: Any, path: str = "output") -> str | None:
    """Where integer/bool tensors or non-numeric leaves differ (those must match exactly)."""
    for (where, a), (_, b) in zip(_leaves(expected, path), _leaves(actual, path)):
        if isinstance(a, Tensor):
            if not a.is_floating_point() and not torch.equal(a, b):
                return f"{where} differs from the original ({_describe_leaf(a)}, compared exactly)"
        elif isinstance(a, float) and isinstance(b, float):
            continue
        elif a != b:
            return f"{where} differs from the original: {a!r} vs {b!r}"
    return None


def _paired_floats(expected: Any, actual: Any, path: str = "output") -> Iterator[tuple[str, Tensor, Tensor]]:
    for (where, a), (_, b) in zip(_leaves(expected, path), _leaves(actual, path)):
        if isinstance(a, float) and isinstance(b, float):
            a, b = torch.tensor(a), torch.tensor(b)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point():
            yield where, a, b


def _scale(tensor: Tensor) -> float:
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.double().abs().max()) if finite.numel() else 0.0


def _max_difference(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| over the finite entries; inf where non-finite entries disagree."""
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    infinite = torch.isinf(a) | torch.isinf(b)
    if not torch.equal(a[infinite], b[infinite]):
        return math.inf
    finite = ~(torch.isnan(a) | infinite)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def _relative_difference(a: Tensor, b: Tensor) -> float:
    difference, scale = _max_difference(a, b), _scale(a)
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0 else math.inf


def _output_dtype(output: Any) -> torch.dtype:
    for _, leaf in _leaves(output):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return torch.float32


def _allowed_relative(original: Tensor, truth: Any, rerun_noise: float, scale: float) -> tuple[float, float]:
    """The default allowed difference of one output relative to its scale, and the original's
    own rounding error (0 where unknown)."""
    tolerance = tolerance_for(original.dtype)
    if not isinstance(truth, Tensor) or truth.dtype != torch.float64 or truth.shape != original.shape:
        return tolerance.fixed, 0.0
    difference = _max_difference(original, truth)
    if math.isinf(difference):
        return tolerance.fixed, 0.0
    noise = max(difference / scale if scale > 0 else 0.0, rerun_noise)
    return min(NOISE_FACTOR * noise + tolerance.floor, tolerance.cap), noise


@dataclass
class _Tally:
    """Running result of comparing one set of outputs (final, or probes)."""

    atol: float | None
    rtol: float | None
    rerun_noise: float
    problem: str | None = None  # a structural or exact mismatch: fails outright
    max_abs: float = 0.0
    max_rel: float = 0.0
    ratio: float = -1.0  # error / allowed error at the worst leaf
    noise: float = 0.0  # the original's own rounding error there
    worst: str | None = None
    worst_atol: float = 0.0
    worst_rtol: float = 0.0

    @property
    def passed(self) -> bool:
        return self.problem is None and self.ratio <= 1.0

    def add(self, expected: Any, actual: Any, truth: Any, path: str) -> None:
        """Compare one output (possibly nested) of the original and of the fused model."""
        if self.problem is not None:
            return
        self.problem = _structure_difference(expected, actual, path) or _exact_difference(expected, actual, path)
        if self.problem is not None:
            return
        truths = dict(_leaves(truth, path)) if truth is not None else {}
        user_rule = self.atol is not None or self.rtol is not None
        for where, original, fused in _paired_floats(expected, actual, path):
            difference, scale = _max_difference(original, fused), _scale(original)
            if user_rule:
                atol, rtol, noise = self.atol or 0.0, self.rtol or 0.0, 0.0
            else:
                atol, (rtol, noise) = 0.0, _allowed_relative(original, truths.get(where), self.rerun_noise, scale)
            allowed = atol + rtol * scale
            self.max_abs = max(self.max_abs, difference)
            self.max_rel = max(self.max_rel, difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf))
            ratio = difference / allowed if allowed > 0 else (0.0 if difference == 0 else math.inf)
            if ratio > self.ratio:
                self.ratio, self.noise, self.worst = ratio, noise, where
                self.worst_atol, self.worst_rtol = atol, rtol

    def message(self, dtype_name: str) -> str:
        if self.problem is not None:
            return self.problem
        if NOISE_FACTOR * self.noise > self.worst_rtol:  # the cap, not the noise, set the bar
            return (
                f"cannot verify: the original model's own {dtype_name} rounding error is already "
                f"{self.noise:.3g} of the output's scale at {self.worst} (measured against float64), too "
                f"large to tell a correct fold from a wrong one (the fused model differs by "
                f"{self.max_rel:.3g}); check the model for exploding activations, accept a difference "
                f"with rtol=/atol= (--rtol/--atol), or skip verification with {_SKIP_HINT}"
            )
        if math.isinf(self.max_abs):
            error = "non-finite values (NaN or inf where the original has none, or the reverse)"
        else:
            error = f"{self.max_abs:.3g} ({self.max_rel:.3g} of the output's scale)"
        if self.atol is not None or self.rtol is not None:
            allowed = f"atol={self.worst_atol:.3g} + rtol={self.worst_rtol:.3g} x scale"
        else:
            allowed = f"{self.worst_rtol:.3g} of the output's scale"
        return f"the fused model differs from the original at {self.worst} by {error}; allowed: {allowed}"

    def into(self, result: Verification) -> Verification:
        result.max_abs_error, result.max_rel_error = self.max_abs, self.max_rel
        result.atol, result.rtol, result.worst_output = self.worst_atol, self.worst_rtol, self.worst
        return result


def _batch_path(index: int, count: int, path: str) -> str:
    return f"batch {index}: {path}" if count > 1 else path


def compare(
    model: nn.Module,
    reference: Reference,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    probes: Sequence[str] | None = None,
) -> Verification:
    """Run the fused ``model`` on the reference batches and judge its outputs.

    With ``atol``/``rtol`` an output passes where ``|fused - original| <= atol + rtol * scale``.
    Otherwise the default rule applies (module doc). ``probes``: recorded probe modules that
    together hold every fused pair; where given, they decide when the final outputs do not.
    """
    user_rule = atol is not None or rtol is not None
    if user_rule and ((atol or 0.0) < 0 or (rtol or 0.0) < 0):
        raise UsageError("atol and rtol must not be negative")
    count = len(reference.batches)
    if reference.truth_problem == "nondeterministic" and not user_rule:
        return Verification(
            passed=False,
            batches=count,
            rule="nondeterministic",
            message=(
                "the original model gives different outputs on two runs of the same input, so its "
                "outputs cannot be compared (random ops or state that changes between calls?); fix "
                f"the model, give atol=/rtol= (--atol/--rtol), or skip verification with {_SKIP_HINT}"
            ),
        )
    if user_rule:
        rule = "user tolerance"
    elif reference.truth is not None:
        rule = f"{NOISE_FACTOR:g}x the original's rounding error"
    else:
        rule = "fixed tolerance (no float64 reference)"
    final = _Tally(atol, rtol, reference.rerun_noise)
    for index, batch in enumerate(reference.batches):
        try:
            fused = _call(model, batch)
        except Exception as error:
            return _raised(error, count, rule)
        truth = reference.truth[index] if reference.truth is not None else None
        final.add(reference.outputs[index].final, fused, truth, _batch_path(index, count, "output"))
    dtype_name = str(_output_dtype(reference.outputs[0].final)).removeprefix("torch.")
    if final.passed:
        return final.into(Verification(passed=True, batches=count, rule=rule))
    if not probes or not _discontinuous(reference):
        return final.into(Verification(passed=False, batches=count, rule=rule, message=final.message(dtype_name)))
    at_probes = _Tally(atol, rtol, reference.rerun_noise)
    for name in probes:
        module = model.get_submodule(name)
        for index, outputs in enumerate(reference.outputs):
            for number, call in enumerate(outputs.probes.get(name, [])):
                try:
                    actual = _call(module, call.inputs)
                except Exception as error:
                    return _raised(error, count, rule)
                label = _batch_path(index, count, f"{name}()" + (f" call {number}" if number else ""))
                at_probes.add(call.output, actual, call.truth, label)
    if at_probes.passed:
        return at_probes.into(Verification(
            passed=True,
            batches=count,
            rule=f"{rule}, at {', '.join(probes)} on their recorded inputs",
            message=(
                f"the final outputs are not continuous in rounding ({final.message(dtype_name)}); "
                "every fused pair lies in the modules above, which match on the inputs they saw"
            ),
        ))
    return at_probes.into(Verification(passed=False, batches=count, rule=rule, message=at_probes.message(dtype_name)))


def _discontinuous(reference: Reference) -> bool:
    """Whether the original's own final outputs jump with rounding: its float32 and float64 runs
    differ in structure, in an integer output, or by more than rounding could explain. Only then
    may a difference of the fused model's final outputs be put down to rounding."""
    if reference.truth is None:
        return False
    for outputs, truth in zip(reference.outputs, reference.truth):
        if _structure_difference(outputs.final, truth, dtypes=False) is not None:
            return True
        if _exact_difference(outputs.final, truth) is not None:
            return True
        for _, original, exact in _paired_floats(outputs.final, truth):
            if _relative_difference(exact, original.double()) > tolerance_for(original.dtype).cap:
                return True
    return False


def _raised(error: Exception, count: int, rule: str) -> Verification:
    return Verification(
        passed=False, batches=count, rule=rule, message=f"the fused model raised {type(error).__name__}: {first_line(error)}"
    )
