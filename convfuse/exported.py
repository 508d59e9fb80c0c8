"""ExportedProgram (``torch.export``, ``.pt2``): safe loading, folding BatchNorm into the convolution
before it in the exported ATen graph, and exporting a fused ``nn.Module`` for saving.

The fold rewrites a copy of the program's graph in place rather than re-exporting
``program.module()``: a re-export needs inputs and dynamic-shape specs the program no longer
carries in a usable form, and it would rename nodes and lose custom metadata, preserved module
call signatures and custom ops that a user's own export options produced. Only the pieces the fold
touches change: the conv's weight (and bias) tensors, a new bias input where the conv had none
(added to the graph signature and state_dict as a parameter of the conv's module, e.g.
``layer1.0.conv1.bias``), and the batch-norm node with the inputs only it used. The result is
checked by ``ExportedProgram``'s own verifier when it is built.
"""

from __future__ import annotations

import copy
import io
import json
import operator
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, TensorArgument

from convfuse import verify as verification
from convfuse.errors import InputError, LoadError, SaveError, UnsafeFileError, VerificationError
from convfuse.folding import fuse_conv_bn_weights
from convfuse.fuse import FuseResult
from convfuse.patterns import Reason, Skipped
from convfuse.report import Count, FusedPair, FuseReport

__all__ = ["fuse_exported", "load_exported", "to_exported"]

_TRUST_HINT = "pass --trust (convfuse.load(..., trust=True)) only if you trust the file"


def _ops(*names: str) -> frozenset[Any]:
    """The ATen overload packets of ``names`` that this torch build has."""
    return frozenset(p for p in (getattr(torch.ops.aten, name, None) for name in names) if p is not None)


_CONVS = _ops("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
_TRANSPOSED_CONVS = _ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_LINEARS = _ops("linear")
_NORMS = _ops(
    "batch_norm",  # training IR (torch.export.export)
    "_native_batch_norm_legit_no_training",  # inference IR (run_decompositions)
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "native_batch_norm",
    "cudnn_batch_norm",
    "miopen_batch_norm",
)
_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_NAME_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}


# -- loading ----------------------------------------------------------------------------


def load_exported(path: str | Path, *, trust: bool = False) -> ExportedProgram:
    """Load a ``torch.export.save`` archive.

    ``torch.export.load`` unpickles some payloads without restrictions (weights stored as
    pickles, opaque objects, and anything its weights-only loader rejects); unless ``trust``,
    such archives are refused before anything is loaded.

    Raises:
        LoadError: the archive is damaged or not an ExportedProgram.
        UnsafeFileError: loading it could run code from the file.
    """
    path = Path(path)
    if not trust:
        _check_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise LoadError(
            f"{path}: the ExportedProgram cannot be loaded ({type(error).__name__}: {_first_line(error)}); "
            "is the file complete and written by torch.export.save?"
        ) from error
    if not isinstance(program, ExportedProgram):
        raise LoadError(f"{path}: holds a {type(program).__name__}, not an ExportedProgram")
    return program


def _check_archive(path: Path) -> None:
    """UnsafeFileError where torch.export.load would unpickle something without restrictions."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                inner = name.split("/", 1)[1] if "/" in name else name
                folder, _, file = inner.rpartition("/")
                if folder in ("data/weights", "data/constants") and file.endswith("_config.json"):
                    _check_payload_config(path, archive.read(name))
                elif folder in ("data/weights", "data/constants", "data/sample_inputs") and file.endswith(".pt"):
                    _check_weights_only(path, archive.read(name), inner)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise LoadError(f"{path}: the archive is damaged ({_first_line(error)}); is the file complete?") from error


def _check_payload_config(path: Path, data: bytes) -> None:
    config = json.loads(data).get("config", {})
    for fqn, payload in config.items():
        if payload.get("use_pickle") or str(payload.get("path_name", "")).startswith("opaque_obj_"):
            raise UnsafeFileError(
                f"{path}: refused to load: {fqn} is stored as a Python pickle, which torch.export.load "
                f"unpickles without restrictions (it could run code); {_TRUST_HINT}"
            )


def _check_weights_only(path: Path, data: bytes, inner: str) -> None:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:
        raise UnsafeFileError(
            f"{path}: refused to load: {inner} is not readable by torch's weights-only loader "
            f"({_first_line(error)}), and torch.export.load would then unpickle it without restrictions; "
            f"{_TRUST_HINT}"
        ) from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# -- exporting for saving ---------------------------------------------------------------


def to_exported(model: Any, example_inputs: Any) -> ExportedProgram:
    """``model`` as an ExportedProgram: a program passes through, an ``nn.Module`` is exported
    (``torch.export.export``) on ``example_inputs``, an ``(args, kwargs)`` batch or what
    ``convfuse.fuse`` accepts. Shapes are static: those of the example inputs.

    Raises:
        SaveError: no example inputs, or the model cannot be exported.
    """
    if isinstance(model, ExportedProgram):
        return model
    if isinstance(model, torch.jit.ScriptModule):
        raise SaveError(
            "a TorchScript model cannot be written as an ExportedProgram (torch.export cannot trace "
            "TorchScript); write it as TorchScript (--format torchscript)"
        )
    if not isinstance(model, nn.Module):
        raise SaveError(f"cannot export a {type(model).__name__}: torch.export needs an nn.Module")
    if example_inputs is None or isinstance(example_inputs, verification.InputSpec):
        raise SaveError(
            "writing an ExportedProgram needs example inputs to export the model with; "
            "give --input-shape (or example_inputs=... to convfuse.save)"
        )
    args, kwargs = as_call(example_inputs)
    try:
        return torch.export.export(model, args, kwargs)
    except Exception as error:
        raise SaveError(
            f"{type(model).__name__} cannot be exported with torch.export ({type(error).__name__}: "
            f"{_first_line(error)}); write it as a pickle or TorchScript instead (--format)"
        ) from error


def as_call(example_inputs: Any) -> verification.Batch:
    """Example inputs as (args, kwargs): a Batch stays as it is, anything else as ``as_batch`` reads it."""
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs
    return verification.as_batch(example_inputs)


# -- fusing -----------------------------------------------------------------------------


def fuse_exported(
    program: ExportedProgram,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> FuseResult:
    """Fold every batch norm that follows a convolution (or a 2-D linear) in ``program``'s graph.

    ``program`` is never changed; the result is a new ExportedProgram with the same calling
    convention. Example inputs default to those saved with the program, else random tensors of
    its input shapes. Arguments and errors as ``convfuse.fuse``.
    """
    timings: dict[str, float] = {}
    user_tolerance = atol is not None or rtol is not None
    with _timed(timings, "reference"):
        if verify:
            batch = _example_batch(program, example_inputs)
            runner, example = _runner(program.module(), batch)
            reference = verification.record_reference(runner, example, truth=not user_tolerance)
        else:
            try:
                batch = _example_batch(program, example_inputs)
            except InputError:
                batch = None
    with _timed(timings, "fold"):
        fused, report = _fuse_program(program)
    report.timings = timings
    if verify:
        with _timed(timings, "verify"):
            runner, _ = _runner(fused.module(), batch)
            report.verification = verification.compare(runner, reference, atol=atol, rtol=rtol)
        if not report.verification.passed:
            raise VerificationError(f"verification failed: {report.verification.message}", report)
    return FuseResult(fused, report, batch)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


# -- inputs -----------------------------------------------------------------------------


def _user_inputs(program: ExportedProgram) -> list[fx.Node]:
    kinds = {spec.arg.name: spec.kind for spec in program.graph_signature.input_specs if hasattr(spec.arg, "name")}
    return [n for n in program.graph.nodes if n.op == "placeholder" and kinds.get(n.name) == InputKind.USER_INPUT]


def _example_batch(program: ExportedProgram, example_inputs: Any) -> verification.Batch:
    """The (args, kwargs) to verify on: given, of given shapes, saved with the program, or drawn
    from the shapes and dtypes its graph records."""
    spec = example_inputs if isinstance(example_inputs, verification.InputSpec) else None
    if example_inputs is not None and spec is None:
        return as_call(example_inputs)
    values = [n.meta.get("val") for n in _user_inputs(program)]
    generator = torch.Generator().manual_seed(0)
    if spec is not None and spec.shapes:
        if len(spec.shapes) != len(values):
            raise InputError(
                f"the program takes {len(values)} tensor input(s) but {len(spec.shapes)} shape(s) were "
                "given; give one --input-shape per input, in the order of the forward's arguments"
            )
        flat = []
        for shape, value in zip(spec.shapes, values):
            like = value if isinstance(value, Tensor) else None
            dtype = spec.dtype or (like.dtype if like is not None else torch.float32)
            device = like.device if like is not None else torch.device("cpu")
            flat.append(_random(shape, dtype, device, generator))
        args, kwargs = pytree.tree_unflatten(flat, program.call_spec.in_spec)
        return tuple(args), dict(kwargs)
    dtype = spec.dtype if spec is not None else None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        if dtype is not None:
            args, kwargs = pytree.tree_map_only(
                Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, (args, kwargs)
            )
        return tuple(args), dict(kwargs)
    flat = [_concrete(program, value, dtype, generator) for value in values]
    args, kwargs = pytree.tree_unflatten(flat, program.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Tensor:
    values = torch.randn(shape, generator=generator)
    if dtype.is_floating_point:
        return values.to(dtype=dtype, device=device)
    return values.abs().mul(3).to(dtype=dtype, device=device)


def _concrete(program: ExportedProgram, value: Any, dtype: torch.dtype | None, generator: torch.Generator) -> Any:
    """A real input like the graph's recorded ``value`` (a fake tensor, or a number)."""
    if isinstance(value, Tensor):
        shape = tuple(_size(program, d) for d in value.shape)
        use = dtype if dtype is not None and value.is_floating_point() else value.dtype
        return _random(shape, use, value.device, generator)
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    raise InputError(
        "cannot build inputs for the program (an input is not a tensor or a constant); "
        "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
    )


def _size(program: ExportedProgram, dim: Any) -> int:
    if isinstance(dim, int):
        return dim
    node = getattr(dim, "node", None)
    hint = getattr(node, "hint", None)
    if isinstance(hint, int):
        return hint
    bounds = program.range_constraints.get(getattr(node, "expr", None))
    if bounds is not None:
        lower, upper = int(bounds.lower), bounds.upper
        size = max(lower, 2)
        return size if upper.is_infinite or size <= int(upper) else int(upper)
    raise InputError(
        "cannot choose a size for the program's dynamic dimension "
        f"{dim}; pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
    )


class _KeywordCall(nn.Module):
    """Calls ``module`` with some arguments by keyword, so that verification (which calls
    ``model(*args)``) can run a program whose inputs are partly keywords."""

    def __init__(self, module: nn.Module, positional: int, keywords: list[str]) -> None:
        super().__init__()
        self.module = module
        self.positional = positional
        self.keywords = keywords

    def forward(self, *inputs: Any) -> Any:
        args, values = inputs[: self.positional], inputs[self.positional :]
        return self.module(*args, **dict(zip(self.keywords, values)))


def _runner(module: nn.Module, batch: verification.Batch) -> tuple[nn.Module, Any]:
    """A callable and example inputs for ``verify`` (which calls ``model(*args)`` or ``model(**kwargs)``)."""
    args, kwargs = batch
    if not kwargs:
        return module, tuple(args)
    if not args:
        return module, dict(kwargs)
    return _KeywordCall(module, len(args), list(kwargs)), (*args, *kwargs.values())


# -- the graph rewrite ------------------------------------------------------------------


def _arguments(node: fx.Node) -> dict[str, Any]:
    """``node``'s arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args) and not argument.kwarg_only:
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def _set_argument(node: fx.Node, name: str, value: Any) -> None:
    index = next(i for i, a in enumerate(node.target._schema.arguments) if a.name == name)
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args) and name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _packet(node: Any) -> Any:
    if isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket
    return None


def _is_norm(node: fx.Node) -> bool:
    return _packet(node) in _NORMS


def _is_producer(node: Any) -> bool:
    return _packet(node) in _CONVS | _TRANSPOSED_CONVS | _LINEARS


def _stack(node: fx.Node) -> tuple[str, str] | None:
    """The innermost module that ran ``node``: (its path from the root, its class name)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = str(path).removeprefix("L['self'].").removeprefix("L['self']")
    name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, name


def _count_norms(program: ExportedProgram) -> int:
    return sum(1 for _, gm in _graph_modules(program) for n in gm.graph.nodes if _is_norm(n))


def _graph_modules(program: ExportedProgram) -> Iterator[tuple[str, fx.GraphModule]]:
    for name, module in program.graph_module.named_modules():
        if isinstance(module, fx.GraphModule):
            yield name, module


def _count_parameters(program: ExportedProgram) -> int:
    targets = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    return sum(program.state_dict[t].numel() for t in targets if t in program.state_dict)


@dataclass
class _Pair:
    """A convolution (or linear) whose only user is a batch norm, as found in the graph."""

    conv: fx.Node
    norm: fx.Node
    producer: str
    norm_name: str
    kind: str


class _Rewrite:
    """A working copy of a program: its graph, signature, state_dict and constants.

    Tensors the fold does not touch are shared with the original program, never copied.
    """

    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        self.gm = copy.deepcopy(program.graph_module)
        self.graph = self.gm.graph
        self.signature = copy.deepcopy(program.graph_signature)
        self.state_dict = dict(program.state_dict)
        self.constants = dict(program.constants)
        self.module_call_graph = copy.deepcopy(program.module_call_graph)
        self.specs: dict[str, InputSpec] = {
            s.arg.name: s for s in self.signature.input_specs if getattr(s.arg, "name", None) is not None
        }
        self.mutated = {
            s.target for s in self.signature.output_specs
            if s.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION, OutputKind.USER_INPUT_MUTATION)
        }
        self.boundaries = {
            arg.name
            for entry in self.module_call_graph
            if entry.fqn and entry.signature is not None
            for arg in (*entry.signature.inputs, *entry.signature.outputs)
            if getattr(arg, "name", None)
        }

    # -- lifted tensors

    def spec(self, node: Any) -> InputSpec | None:
        """The signature entry of a parameter/buffer/constant input node, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            spec = self.specs.get(node.name)
            if spec is not None and spec.kind in _LIFTED:
                return spec
        return None

    def store(self, spec: InputSpec) -> dict[str, Any]:
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            return self.state_dict
        return self.constants

    def tensor(self, node: Any) -> Tensor | None:
        spec = self.spec(node)
        return None if spec is None else self.store(spec).get(spec.target)

    def owner(self, node: Any) -> str | None:
        """The module a parameter/buffer input belongs to, from its name (``layer1.bn1.weight`` -> ``layer1.bn1``)."""
        spec = self.spec(node)
        return spec.target.rpartition(".")[0] if spec is not None and spec.target else None

    def aliased(self, node: fx.Node) -> bool:
        """Whether another parameter/buffer/constant shares ``node``'s tensor storage."""
        spec, tensor = self.spec(node), self.tensor(node)
        if spec is None or not isinstance(tensor, Tensor) or tensor.untyped_storage().nbytes() == 0:
            return False
        pointer = tensor.untyped_storage().data_ptr()
        for name, other in (*self.state_dict.items(), *self.constants.items()):
            if name != spec.target and isinstance(other, Tensor) and other.untyped_storage().data_ptr() == pointer:
                return True
        return False

    def replace(self, node: fx.Node, value: Tensor) -> None:
        """Give the input ``node`` the float64 ``value``, in its tensor's dtype, device and layout."""
        spec = self.spec(node)
        store = self.store(spec)
        old = store[spec.target]
        new = torch.empty_like(old.detach())
        with torch.no_grad():
            new.copy_(value)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        store[spec.target] = new

    def add_input(self, like: fx.Node, target: str, value: Tensor) -> fx.Node:
        """A new input of the same kind as ``like`` holding ``value``, placed among its kind."""
        kind_spec = self.spec(like)
        store = self.store(kind_spec)
        taken = set(self.state_dict) | set(self.constants)
        unique, suffix = target, 0
        while unique in taken:
            suffix += 1
            unique = f"{target}_{suffix}"
        reference = store[kind_spec.target]
        tensor = value.to(dtype=reference.dtype, device=reference.device)
        if kind_spec.kind == InputKind.PARAMETER:
            tensor = nn.Parameter(tensor, requires_grad=reference.requires_grad)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        anchor = [n for n in placeholders if (s := self.spec(n)) is not None and s.kind == kind_spec.kind][-1]
        with self.graph.inserting_after(anchor):
            node = self.graph.placeholder(_NAME_PREFIX[kind_spec.kind] + unique.replace(".", "_"))
        node.meta["val"] = _fake(like, tensor)
        self.specs[node.name] = InputSpec(kind_spec.kind, TensorArgument(node.name), unique, kind_spec.persistent)
        store[unique] = tensor
        return node

    def remove_unused(self, node: fx.Node) -> None:
        """Drop a parameter/buffer/constant input that nothing reads any more."""
        spec = self.spec(node)
        if spec is None or node.users or spec.target in self.mutated:
            return
        self.graph.erase_node(node)
        del self.specs[node.name]
        if not any(s.target == spec.target for s in self.specs.values()):
            self.store(spec).pop(spec.target, None)

    def rename_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Point every use of ``old`` (graph, outputs, module call signatures) at ``new``."""
        old.replace_all_uses_with(new)
        self.signature.replace_all_uses(old.name, new.name)
        for entry in self.module_call_graph:
            if entry.signature is not None:
                entry.signature.replace_all_uses_with(old, new)

    # -- the result

    def program_after(self) -> ExportedProgram:
        self.graph.lint()
        self.gm.recompile()
        input_specs = [self.specs[n.name] for n in self.graph.nodes if n.op == "placeholder"]
        signature = ExportGraphSignature(input_specs=input_specs, output_specs=self.signature.output_specs)
        return ExportedProgram(
            root=self.gm,
            graph=self.gm.graph,
            graph_signature=signature,
            state_dict=self.state_dict,
            range_constraints=dict(self.program.range_constraints),
            module_call_graph=self.module_call_graph,
            example_inputs=self.program.example_inputs,
            constants=self.constants,
            verifiers=self.program.verifiers,
        )


def _fake(like: fx.Node, tensor: Tensor) -> Any:
    """A fake tensor for a new input's ``val`` metadata, in the graph's own fake mode."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = detect_fake_mode([like.meta.get("val")]) or FakeTensorMode(allow_non_fake_inputs=True)
    return mode.from_tensor(tensor, static_shapes=True)


def _fuse_program(program: ExportedProgram) -> tuple[ExportedProgram, FuseReport]:
    """Find, check and fold every pair; the program after and the report (verification not run)."""
    report = FuseReport(
        norm_layers=Count(_count_norms(program), 0),
        parameters=Count(_count_parameters(program), 0),
    )
    rewrite = _Rewrite(program)
    fused: list[FusedPair] = []
    skipped: list[Skipped] = []
    for norm in [n for n in rewrite.graph.nodes if _is_norm(n)]:
        pair, skip = _match(rewrite, norm)
        if skip is not None:
            skipped.append(skip)
            continue
        _fold(rewrite, pair)
        fused.append(FusedPair(pair.producer, pair.norm_name, pair.kind))
    for name, gm in _graph_modules(program):
        if name:  # a control-flow branch: its inputs are operands, not stored tensors
            for node in gm.graph.nodes:
                if _is_norm(node):
                    where = _stack(node)
                    skipped.append(Skipped(where[0] if where else f"{name}.{node.name}", None, Reason.IN_SUBGRAPH))
    result = rewrite.program_after() if fused else program
    report.fused = fused
    report.skipped = skipped
    report.norm_layers = Count(report.norm_layers.before, _count_norms(result))
    report.parameters = Count(report.parameters.before, _count_parameters(result))
    return result, report


def _norm_name(rewrite: _Rewrite, norm: fx.Node, bound: dict[str, Any]) -> str:
    for key in ("running_mean", "weight", "running_var", "bias"):
        owner = rewrite.owner(bound.get(key))
        if owner:
            return owner
    where = _stack(norm)
    return where[0] if where and where[0] else norm.name


def _producer_name(rewrite: _Rewrite, conv: fx.Node, bound: dict[str, Any]) -> str:
    owner = rewrite.owner(bound.get("weight"))
    if owner:
        return owner
    where = _stack(conv)
    return where[0] if where and where[0] else conv.name


def _kind(conv: fx.Node, producer: str, norm: fx.Node, norm_name: str) -> str:
    conv_where, norm_where = _stack(conv), _stack(norm)
    if conv_where and norm_where and conv_where[0] == producer and norm_where[0] == norm_name:
        return f"{conv_where[1]}+{norm_where[1]}"
    return f"{conv.target.overloadpacket.__name__}+batch_norm"


def _norm_outputs(norm: fx.Node) -> list[fx.Node] | None:
    """The nodes that carry the normalised tensor; None where another output is used."""
    if len(norm.target._schema.returns) == 1:
        return [norm]
    outputs = []
    for user in norm.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        if user.args[1] == 0:
            outputs.append(user)
        elif user.users:  # the saved mean or inverse std is read
            return None
    return outputs


def _weight_use_reason(rewrite: _Rewrite, node: fx.Node, conv: fx.Node) -> str | None:
    """Why the conv's weight/bias input ``node`` must not change: someone else reads it."""
    others = [u for u in node.users if u is not conv]
    if not others:
        return Reason.SHARED_PARAMETER if rewrite.aliased(node) else None
    if not all(_is_producer(u) for u in others):
        return Reason.DIRECT_ACCESS
    here = _stack(conv)
    if here is not None and all(_stack(u) is not None and _stack(u)[0] == here[0] for u in others):
        return Reason.CALLED_TWICE
    return Reason.SHARED_PARAMETER


def _match(rewrite: _Rewrite, norm: fx.Node) -> tuple[_Pair | None, Skipped | None]:
    """The pair ``norm`` ends, if it is safe to fold, else why not (read-only)."""
    bound = _arguments(norm)
    norm_name = _norm_name(rewrite, norm, bound)
    conv = bound["input"]
    if not _is_producer(conv):
        return None, Skipped(norm_name, None, Reason.NO_PRODUCER)
    conv_bound = _arguments(conv)
    producer = _producer_name(rewrite, conv, conv_bound)
    pair = _Pair(conv, norm, producer, norm_name, _kind(conv, producer, norm, norm_name))
    reason = _pair_reason(rewrite, pair, bound, conv_bound)
    if reason is not None:
        return None, Skipped(norm_name, producer, reason)
    return pair, None


def _pair_reason(rewrite: _Rewrite, pair: _Pair, bound: dict[str, Any], conv_bound: dict[str, Any]) -> str | None:
    conv, norm = pair.conv, pair.norm
    weight, bias = conv_bound["weight"], conv_bound.get("bias")
    for node in (weight, bias):
        if isinstance(node, fx.Node):
            reason = _weight_use_reason(rewrite, node, conv)
            if reason is not None:
                return reason
    if list(conv.users) != [norm] or conv.name in rewrite.boundaries:
        return Reason.OTHER_USERS
    if _norm_outputs(norm) is None:
        return Reason.NORM_OUTPUT_USERS
    stats = [bound.get(k) for k in ("running_mean", "running_var")]
    if any(s is None for s in stats):
        return Reason.NO_RUNNING_STATS
    if bound.get("training", False) is not False or any(rewrite.spec(s) and rewrite.spec(s).target in rewrite.mutated for s in stats):
        return Reason.TRAINING
    stored = [weight, *stats] + [n for n in (bias, bound.get("weight"), bound.get("bias")) if n is not None]
    if any(rewrite.tensor(n) is None for n in stored):
        return Reason.COMPUTED_WEIGHT
    eps = bound.get("eps", bound.get("epsilon"))
    transposed = conv_bound.get("transposed", _packet(conv) in _TRANSPOSED_CONVS)
    groups = conv_bound.get("groups", 1)
    if not isinstance(eps, (int, float)) or not isinstance(transposed, bool) or not isinstance(groups, int):
        return Reason.UNSUPPORTED_PAIR
    tensors = [rewrite.tensor(n) for n in stored]
    if not all(t.is_floating_point() for t in tensors):
        return Reason.NOT_FLOATING
    if len({t.device for t in tensors}) > 1:
        return Reason.DEVICES
    w = rewrite.tensor(weight)
    channels = w.shape[1] * groups if transposed else w.shape[0]
    if rewrite.tensor(stats[0]).numel() != channels:
        return Reason.UNSUPPORTED_PAIR
    if _packet(conv) in _LINEARS:
        value = conv.meta.get("val")
        if not isinstance(value, Tensor):
            return Reason.SHAPE_UNKNOWN
        if value.dim() != 2:
            return Reason.LINEAR_NOT_2D
    return None


def _fold(rewrite: _Rewrite, pair: _Pair) -> None:
    """Write the folded weights, route the norm's users to the conv, drop what only the norm used."""
    bound, conv_bound = _arguments(pair.norm), _arguments(pair.conv)
    weight, bias = conv_bound["weight"], conv_bound.get("bias")
    tensor = rewrite.tensor
    optional = lambda node: tensor(node) if node is not None else None  # noqa: E731
    folded_weight, folded_bias = fuse_conv_bn_weights(
        tensor(weight),
        optional(bias),
        tensor(bound["running_mean"]),
        tensor(bound["running_var"]),
        float(bound.get("eps", bound.get("epsilon"))),
        optional(bound.get("weight")),
        optional(bound.get("bias")),
        transpose=conv_bound.get("transposed", _packet(pair.conv) in _TRANSPOSED_CONVS),
        groups=conv_bound.get("groups", 1),
    )
    rewrite.replace(weight, folded_weight)
    if bias is not None:
        rewrite.replace(bias, folded_bias)
    else:
        _set_argument(pair.conv, "bias", rewrite.add_input(weight, f"{pair.producer}.bias", folded_bias))
    for output in _norm_outputs(pair.norm):
        rewrite.rename_uses(output, pair.conv)
    for user in list(pair.norm.users):  # getitems, now unused
        rewrite.graph.erase_node(user)
    rewrite.graph.erase_node(pair.norm)
    inputs = [bound.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    counter = f"{pair.norm_name}.num_batches_tracked"
    inputs += [n for n in rewrite.graph.nodes if (s := rewrite.spec(n)) is not None and s.target == counter]
    for node in inputs:
        if isinstance(node, fx.Node):
            rewrite.remove_unused(node)
