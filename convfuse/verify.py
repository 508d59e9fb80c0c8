"""Prove that a fused model computes what the original computed: run both, compare every output.

The reference outputs (and what the run shows about each module: calls, input shapes) are
recorded on the original model before it is rewritten, so a large model is never held twice.
The default rule judges the fused model against the original's own rounding error: the
original is run once more in float64 (converted in place and back, losslessly), and the fused
model may differ from the original by at most ``NOISE_FACTOR`` times the original's own
distance from that float64 result, plus a floor of a few units of its dtype's rounding. A
correct fold differs by rounding only; a wrong one differs by far more than the model's noise.
Never prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from convfuse.errors import InputError, UsageError
from convfuse.patterns import Observation

__all__ = [
    "NOISE_FACTOR",
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

Batch = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one forward call."""

BATCHES = 3
BATCH_SIZE = 2
SEED = 0

NOISE_FACTOR = 8.0
"""How many times the original's own rounding error a fused model may differ by."""


@dataclass(frozen=True)
class Tolerance:
    """Default tolerances of one dtype, relative to an output's scale (its largest magnitude)."""

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
    """The outcome of comparing the fused model with the original; ``passed`` is None if not run."""

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
class Reference:
    """Outputs of the original model, recorded before the rewrite."""

    batches: list[Batch]
    outputs: list[Any]
    truth: list[Any] | None  # the same in float64, where that could be computed
    observation: Observation
    rerun_noise: float = 0.0  # largest relative difference between two identical runs
    truth_problem: str | None = None


# -- inputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """Example inputs described rather than given: random tensors of ``shapes`` (one per
    positional argument; None: inferred from the first layer) in ``dtype`` (None: the model's)."""

    shapes: tuple[tuple[int, ...], ...] | None = None
    dtype: torch.dtype | None = None


def as_batch(example: Any) -> Batch:
    """Example inputs as call arguments: a tensor is one argument, a tuple is the positional
    arguments, a dict the keyword arguments; anything else (a list of images) is one argument."""
    if isinstance(example, tuple) and not hasattr(example, "_fields"):
        return tuple(example), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    return (example,), {}


def _first_floating(model: nn.Module) -> Tensor | None:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def inputs_from_shapes(
    model: nn.Module, shapes: list[tuple[int, ...]], dtype: torch.dtype | None = None
) -> tuple[Tensor, ...]:
    """Random inputs of ``shapes`` with the model's parameter dtype (or ``dtype``) and device."""
    reference = _first_floating(model)
    dtype = dtype or (reference.dtype if reference is not None else torch.float32)
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(SEED)
    return tuple(torch.randn(shape, generator=generator).to(dtype=dtype, device=device) for shape in shapes)


_SPATIAL_CANDIDATES: dict[int, list[tuple[int, ...]]] = {
    1: [(256,), (64,)],
    2: [(224, 224), (32, 32), (64, 64), (299, 299)],
    3: [(8, 112, 112), (16, 64, 64), (16, 224, 224)],
}


def _inferred_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Candidate input shapes, from the first layer that can tell its input's channels."""
    for module in model.modules():
        if isinstance(module, _ConvNd):
            dims = len(module.kernel_size)
            return [(BATCH_SIZE, module.in_channels, *spatial) for spatial in _SPATIAL_CANDIDATES[dims]]
        if isinstance(module, nn.Linear):
            return [(BATCH_SIZE, module.in_features)]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(module.num_features, int):
            dims = {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module))
            if dims is None:
                continue
            if dims == 0:
                return [(BATCH_SIZE, module.num_features)]
            return [(BATCH_SIZE, module.num_features, *spatial) for spatial in _SPATIAL_CANDIDATES[dims]]
        if isinstance(module, nn.Embedding):
            break
    return []


def _similar(batch: Batch, generator: torch.Generator, spread: float) -> Batch:
    """A new batch shaped like ``batch``: floating tensors redrawn around their own mean and spread."""

    def redraw(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point() and value.numel() > 0:
            noise = torch.randn(value.shape, generator=generator).to(device=value.device, dtype=torch.float64)
            mean = value.double().mean()
            std = value.double().std() if value.numel() > 1 else value.double().abs().clamp_min(1.0)
            return (mean + noise * std * spread).to(value.dtype)
        return value

    args, kwargs = batch
    return _map_tensors(args, redraw), _map_tensors(kwargs, redraw)


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _map_tensors(v, fn) for k, v in obj.items()}) if type(obj) is not dict else {
            k: _map_tensors(v, fn) for k, v in obj.items()
        }
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


# -- running ----------------------------------------------------------------------------


def _devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _run(model: nn.Module, batch: Batch, seed: int) -> Any:
    """One forward pass without autograd, with the random generator reseeded so that random
    ops (dropout left in training mode, noise layers) draw the same numbers every run."""
    args, kwargs = batch
    with torch.random.fork_rng(devices=_devices(model)), torch.no_grad():
        torch.manual_seed(seed)
        output = model(*args, **kwargs)
    return _map_tensors(output, lambda t: t.detach().clone())


@contextmanager
def _observing(model: nn.Module, observation: Observation) -> Iterator[None]:
    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            observation.calls[name] += 1
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, Tensor):
                observation.input_shapes.setdefault(name, []).append(tuple(first.shape))

        return hook

    handles = []
    try:
        for name, module in model.named_modules(remove_duplicate=False):
            try:
                handles.append(module.register_forward_pre_hook(hook_for(name), with_kwargs=True))
            except (RuntimeError, AttributeError):  # scripted modules take no hooks
                continue
        yield
    finally:
        for handle in handles:
            handle.remove()


def _candidate_batches(model: nn.Module, example_inputs: Any) -> list[Batch]:
    spec = example_inputs if isinstance(example_inputs, InputSpec) else None
    if spec is not None and spec.shapes:
        return [(inputs_from_shapes(model, list(spec.shapes), spec.dtype), {})]
    if example_inputs is not None and spec is None:
        return [as_batch(example_inputs)]
    dtype = spec.dtype if spec is not None else None
    return [(inputs_from_shapes(model, [shape], dtype), {}) for shape in _inferred_shapes(model)]


def _first_run(model: nn.Module, example_inputs: Any) -> tuple[Batch, Any, Observation]:
    """Run the model on the example inputs, or on the first inferred shape it accepts."""
    candidates = _candidate_batches(model, example_inputs)
    if not candidates:
        raise InputError(
            f"cannot infer the input shape of {type(model).__name__} (its first layer does not tell); "
            "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
        )
    failures = []
    for batch in candidates:
        observation = Observation()
        try:
            with _observing(model, observation):
                output = _run(model, batch, SEED)
            return batch, output, observation
        except Exception as error:  # the model rejects this input; try the next candidate
            failures.append((batch, error))
    if example_inputs is not None and not (isinstance(example_inputs, InputSpec) and not example_inputs.shapes):
        error = failures[0][1]
        given = "the example inputs" if not isinstance(example_inputs, InputSpec) else "inputs of the given shapes"
        raise InputError(f"the model raised {type(error).__name__} on {given}: {_first_line(error)}")
    tried = ", ".join(str(tuple(b[0][0].shape)) for b, _ in failures)
    raise InputError(
        f"cannot infer the input shape of {type(model).__name__}: it rejected {tried} "
        f"({type(failures[-1][1]).__name__}: {_first_line(failures[-1][1])}); "
        "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def observe(model: nn.Module, example_inputs: Any) -> tuple[Batch | None, Observation | None]:
    """The inputs and what one forward pass on them showed; (None, None) where no input
    the model accepts can be built."""
    try:
        batch, _, observation = _first_run(model, example_inputs)
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


def _to_float64(batch: Batch) -> Batch:
    def convert(value: Tensor) -> Tensor:
        return value.double() if value.is_floating_point() else value

    return _map_tensors(batch[0], convert), _map_tensors(batch[1], convert)


def record_reference(model: nn.Module, example_inputs: Any, *, truth: bool = True, count: int = BATCHES) -> Reference:
    """Outputs of the original model on ``count`` batches, before any rewrite.

    The first batch is the example inputs (or inferred from the first layer); the others are
    drawn like it with a fixed seed. With ``truth`` the outputs are also computed in float64.
    Raises InputError when no input the model accepts can be built.
    """
    batch, output, observation = _first_run(model, example_inputs)
    generator = torch.Generator().manual_seed(SEED + 1)
    batches, outputs = [batch], [output]
    for spread in (1.0, 2.0)[: count - 1]:
        candidate = _similar(batch, generator, spread)
        try:
            outputs.append(_run(model, candidate, SEED))
        except Exception:  # the model rejects redrawn inputs (e.g. it needs integers in a range)
            continue
        batches.append(candidate)
    rerun = _run(model, batch, SEED)
    problem = _structure_difference(output, rerun)
    rerun_noise = 0.0
    if problem is None:
        rerun_noise = max((_relative_difference(a, b) for _, a, b in _paired_floats(output, rerun)), default=0.0)
    reference = Reference(batches, outputs, None, observation, rerun_noise)
    if problem is not None or rerun_noise > tolerance_for(_output_dtype(output)).cap:
        reference.truth_problem = "nondeterministic"
        return reference
    if truth:
        try:
            with _in_float64(model):
                reference.truth = [_run(model, _to_float64(b), SEED) for b in batches]
        except Exception as error:  # e.g. an op without a float64 kernel on this device
            reference.truth_problem = f"the float64 run raised {type(error).__name__}: {_first_line(error)}"
    return reference


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


def _structure_difference(expected: Any, actual: Any) -> str | None:
    """Where two outputs differ in structure, shape or dtype; None where they match."""
    left, right = list(_leaves(expected)), list(_leaves(actual))
    for (path_a, a), (path_b, b) in zip(left, right):
        if path_a != path_b:
            return f"output structure differs: {path_a} vs {path_b}"
        if isinstance(a, Tensor) != isinstance(b, Tensor):
            return f"{path_a} is {_describe_leaf(a)} in the original but {_describe_leaf(b)} after fusing"
        if isinstance(a, Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
            return f"{path_a} is {_describe_leaf(a)} in the original but {_describe_leaf(b)} after fusing"
    if len(left) != len(right):
        extra = (left if len(left) > len(right) else right)[min(len(left), len(right))][0]
        return f"output structure differs at {extra}: {len(left)} leaves in the original, {len(right)} after fusing"
    return None


def _paired_floats(expected: Any, actual: Any) -> Iterator[tuple[str, Tensor, Tensor]]:
    for (path, a), (_, b) in zip(_leaves(expected), _leaves(actual)):
        if isinstance(a, float) and isinstance(b, float):
            a, b = torch.tensor(a), torch.tensor(b)
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point():
            yield path, a, b


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


@dataclass
class _Worst:
    ratio: float = -1.0  # error / allowed error of the worst leaf so far
    verification: Verification = field(default_factory=lambda: Verification(passed=True))


def compare(
    model: nn.Module, reference: Reference, *, atol: float | None = None, rtol: float | None = None
) -> Verification:
    """Run the fused ``model`` on the reference batches and judge its outputs.

    With ``atol``/``rtol`` an output passes where ``|fused - original| <= atol + rtol * scale``
    (scale: the output's largest magnitude). Otherwise the default rule applies (module doc).
    """
    user_rule = atol is not None or rtol is not None
    if user_rule and ((atol or 0.0) < 0 or (rtol or 0.0) < 0):
        raise UsageError("atol and rtol must not be negative")
    if reference.truth_problem == "nondeterministic" and not user_rule:
        return Verification(
            passed=False,
            batches=len(reference.batches),
            rule="nondeterministic",
            message=(
                "the original model gives different outputs on two runs of the same input, "
                "so its outputs cannot be compared (random ops or state that changes between "
                "calls?); fix the model, give --atol/--rtol, or skip verification with --no-verify"
            ),
        )
    if user_rule:
        rule = "user tolerance"
    elif reference.truth is not None:
        rule = f"{NOISE_FACTOR:g}x the original's rounding error"
    else:
        rule = "fixed tolerance"
    worst = _Worst()
    result = Verification(passed=True, batches=len(reference.batches), rule=rule)
    for index, batch in enumerate(reference.batches):
        try:
            fused_output = _run(model, batch, SEED)
        except Exception as error:
            result.passed = False
            result.message = f"the fused model raised {type(error).__name__}: {_first_line(error)}"
            return result
        expected = reference.outputs[index]
        problem = _structure_difference(expected, fused_output)
        if problem is not None:
            result.passed, result.message = False, problem
            return result
        truth = reference.truth[index] if reference.truth is not None else None
        exact = _exact_difference(expected, fused_output)
        if exact is not None:
            result.passed, result.message = False, exact
            return result
        truths = dict(_leaves(truth)) if truth is not None else {}
        for path, original, fused in _paired_floats(expected, fused_output):
            difference, scale = _max_difference(original, fused), _scale(original)
            if user_rule:
                allowed_abs = (atol or 0.0) + (rtol or 0.0) * scale
                leaf_atol, leaf_rtol = atol or 0.0, rtol or 0.0
            else:
                leaf_rtol = _allowed_relative(original, truths.get(path), reference.rerun_noise, scale)
                leaf_atol, allowed_abs = 0.0, leaf_rtol * scale
            relative = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
            result.max_abs_error = max(result.max_abs_error, difference)
            result.max_rel_error = max(result.max_rel_error, relative)
            ratio = difference / allowed_abs if allowed_abs > 0 else (0.0 if difference == 0 else math.inf)
            if ratio > worst.ratio:
                worst.ratio = ratio
                result.worst_output = f"batch {index}: {path}" if len(reference.batches) > 1 else path
                result.atol, result.rtol = leaf_atol, leaf_rtol
    if worst.ratio > 1.0:
        result.passed = False
        result.message = (
            f"the fused model differs from the original at {result.worst_output} by "
            f"{_error_text(result)}, more than the {_allowed_text(result)} allowed ({result.rule})"
        )
    return result


def _exact_difference(expected: Any, actual: Any) -> str | None:
    """Where integer/bool tensors or non-numeric leaves differ (those must match exactly)."""
    for (path, a), (_, b) in zip(_leaves(expected), _leaves(actual)):
        if isinstance(a, Tensor):
            if not a.is_floating_point() and not torch.equal(a, b):
                return f"{path} differs from the original ({_describe_leaf(a)}, compared exactly)"
        elif isinstance(a, float) and isinstance(b, float):
            continue
        elif a != b:
            return f"{path} differs from the original: {a!r} vs {b!r}"
    return None


def _allowed_relative(original: Tensor, truth: Any, rerun_noise: float, scale: float) -> float:
    """The default allowed difference of one output, relative to its scale."""
    tolerance = tolerance_for(original.dtype)
    if not isinstance(truth, Tensor) or truth.dtype != torch.float64 or truth.shape != original.shape:
        return tolerance.fixed
    difference = _max_difference(original, truth)
    if math.isinf(difference):
        return tolerance.fixed
    noise = max(difference / scale if scale > 0 else 0.0, rerun_noise)
    return min(NOISE_FACTOR * noise + tolerance.floor, tolerance.cap)


def _error_text(result: Verification) -> str:
    if math.isinf(result.max_abs_error):
        return "non-finite values (NaN or inf where the original has none, or vice versa)"
    return f"{result.max_abs_error:.3g} ({result.max_rel_error:.3g} of the output's scale)"


def _allowed_text(result: Verification) -> str:
    if result.atol and result.rtol:
        return f"atol {result.atol:.3g} + rtol {result.rtol:.3g}"
    if result.atol:
        return f"atol {result.atol:.3g}"
    return f"{result.rtol:.3g} of the output's scale"
