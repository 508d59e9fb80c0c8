"""Running a model for verification: one forward pass without autograd and seeded, with the
calls of probe modules recorded, and the observation run (calls per module, input shapes,
foreign reads of layer tensors) that the fuse pass's checks read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from convfuse.errors import InputError, first_line
from convfuse.fold.table import is_norm, is_producer
from convfuse.graphs.fx_pairs import Observation
from convfuse.inputs import SEED, Batch, InputSpec, candidate_batches, map_tensors

__all__ = ["Call", "Outputs", "buffers_kept", "call", "first_run", "observe", "reserve_hook_ids", "run"]


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


def _devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _snapshot(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach().clone())


def reserve_hook_ids(model: nn.Module) -> None:
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


def run(model: nn.Module, batch: Batch, probes: Sequence[str] = ()) -> Outputs:
    """One forward pass without autograd, the random generator reseeded so that random ops
    (dropout left in training mode, noise layers) draw the same numbers every run."""
    args, kwargs = batch
    recorded: dict[str, list[Call]] = {name: [] for name in probes}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            recorded[name].append(Call((_snapshot(args), _snapshot(kwargs)), _snapshot(output)))

        return hook

    reserve_hook_ids(model)
    handles = [model.get_submodule(name).register_forward_hook(record(name), with_kwargs=True) for name in probes]
    try:
        output = call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return Outputs(output, recorded)


def call(module: nn.Module, batch: Batch) -> Any:
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
    reserve_hook_ids(model)
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


def first_run(model: nn.Module, example_inputs: Any, probes: Sequence[str] = ()) -> tuple[Batch, Outputs, Observation]:
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
                outputs = run(model, batch, probes)
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
        batch, _, observation = first_run(model, example_inputs, parts)
    except InputError:
        return None, None
    return batch, observation



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

