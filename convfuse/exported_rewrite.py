"""The BatchNorm fold on an ExportedProgram's ATen graph: find convolution (or 2-D linear) ->
batch-norm pairs, check each is safe, and build a new program with the folded weights.

The fold rewrites a copy of the program's graph rather than re-exporting ``program.module()``:
a re-export needs inputs and dynamic-shape specs the program no longer carries in a usable
form, and it would rename nodes and lose custom metadata, preserved module call signatures and
custom ops that the user's own export options produced. Only the pieces the fold touches change:
the conv's weight (and bias) tensors, a new bias input where the conv had none (added to the
graph signature and state_dict as a parameter of the conv's module, e.g. ``layer1.0.conv1.bias``,
among the other parameters), and the batch-norm node with the inputs only it read. Tensors the
fold does not touch are shared with the original program, never copied. The result is checked by
``ExportedProgram``'s own verifier when it is built.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    TensorArgument,
)

from convfuse.folding import fuse_conv_bn_weights
from convfuse.patterns import Reason, Skipped
from convfuse.report import Count, FusedPair, FuseReport

__all__ = ["fuse_program"]


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
_MUTATIONS = (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION, OutputKind.USER_INPUT_MUTATION)


def fuse_program(program: ExportedProgram) -> tuple[ExportedProgram, FuseReport]:
    """Find, check and fold every pair: the program after (``program`` itself where nothing was
    folded; it is never changed) and the report, verification not yet run."""
    report = FuseReport(
        norm_layers=Count(_count_norms(program), 0),
        parameters=Count(_count_parameters(program), 0),
    )
    rewrite = _Rewrite(program)
    fused: list[FusedPair] = []
    skipped: list[Skipped] = []
    for norm in [n for n in rewrite.graph.nodes if _is_norm(n)]:
        outcome = _match(rewrite, norm)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
            continue
        _fold(rewrite, outcome)
        fused.append(FusedPair(outcome.producer, outcome.norm_name, outcome.kind))
    skipped += _in_branches(program)
    result = rewrite.program_after() if fused else program
    report.fused, report.skipped = fused, skipped
    report.norm_layers = Count(report.norm_layers.before, _count_norms(result))
    report.parameters = Count(report.parameters.before, _count_parameters(result))
    return result, report


# -- finding and checking pairs (read-only) ---------------------------------------------


@dataclass
class _Pair:
    """A convolution (or linear) whose output only a batch norm reads, with what the fold needs."""

    conv: fx.Node
    norm: fx.Node
    producer: str
    norm_name: str
    kind: str
    conv_args: dict[str, Any]
    norm_args: dict[str, Any]

    @property
    def eps(self) -> Any:
        return self.norm_args.get("eps", self.norm_args.get("epsilon"))

    @property
    def transposed(self) -> Any:
        return self.conv_args.get("transposed", _packet(self.conv) in _TRANSPOSED_CONVS)

    @property
    def groups(self) -> Any:
        return self.conv_args.get("groups", 1)


def _match(rewrite: _Rewrite, norm: fx.Node) -> _Pair | Skipped:
    """The pair ``norm`` ends if it is safe to fold, else why not."""
    norm_args = _arguments(norm)
    norm_name = _norm_name(rewrite, norm, norm_args)
    conv = norm_args["input"]
    if not _is_producer(conv):
        return Skipped(norm_name, None, Reason.NO_PRODUCER)
    conv_args = _arguments(conv)
    producer = _producer_name(rewrite, conv, conv_args)
    kind = _kind(conv, producer, norm, norm_name)
    pair = _Pair(conv, norm, producer, norm_name, kind, conv_args, norm_args)
    reason = _skip_reason(rewrite, pair)
    return pair if reason is None else Skipped(norm_name, producer, reason)


def _skip_reason(rewrite: _Rewrite, pair: _Pair) -> str | None:
    """Why folding ``pair`` would not be exact, or None where every check passes."""
    conv, norm = pair.conv, pair.norm
    weight, bias = pair.conv_args["weight"], pair.conv_args.get("bias")
    stats = [pair.norm_args.get("running_mean"), pair.norm_args.get("running_var")]
    if any(s is None for s in stats):
        return Reason.NO_RUNNING_STATS
    training = pair.norm_args.get("training", False)
    if training is not False or any(rewrite.target(s) in rewrite.mutated for s in stats):
        return Reason.TRAINING
    for node in (weight, bias):
        reason = _weight_use_reason(rewrite, node, conv) if isinstance(node, fx.Node) else None
        if reason is not None:
            return reason
    if list(conv.users) != [norm] or conv.name in rewrite.boundaries:
        return Reason.OTHER_USERS
    if _norm_outputs(norm) is None:
        return Reason.NORM_OUTPUT_USERS
    optional = [bias, pair.norm_args.get("weight"), pair.norm_args.get("bias")]
    stored = [weight, *stats, *(n for n in optional if n is not None)]
    tensors = [rewrite.tensor(n) for n in stored]
    if any(t is None for t in tensors):
        return Reason.COMPUTED_WEIGHT
    if not isinstance(pair.eps, (int, float)) or not isinstance(pair.groups, int):
        return Reason.UNSUPPORTED_PAIR  # symbolic hyperparameters
    if not isinstance(pair.transposed, bool):
        return Reason.UNSUPPORTED_PAIR
    if not all(t.is_floating_point() for t in tensors):
        return Reason.NOT_FLOATING
    if len({t.device for t in tensors}) > 1:
        return Reason.DEVICES
    value = conv.meta.get("val")
    if _packet(conv) in _LINEARS:
        if not isinstance(value, Tensor):
            return Reason.SHAPE_UNKNOWN
        if value.dim() != 2:
            return Reason.LINEAR_NOT_2D
    elif not isinstance(value, Tensor):
        return Reason.SHAPE_UNKNOWN
    elif value.dim() != tensors[0].dim():  # an unbatched conv: the norm's axis 1 is not its channels
        return Reason.NOT_CHANNELS
    shape = tensors[0].shape
    channels = shape[1] * pair.groups if pair.transposed else shape[0]
    if tensors[1].numel() != channels:
        return Reason.UNSUPPORTED_PAIR
    return None


def _weight_use_reason(rewrite: _Rewrite, node: fx.Node, conv: fx.Node) -> str | None:
    """Why the conv's weight/bias input ``node`` must keep its value: something else reads it."""
    others = [u for u in node.users if u is not conv]
    if not others:
        return Reason.SHARED_PARAMETER if rewrite.aliased(node) else None
    if not all(_is_producer(u) for u in others):
        return Reason.DIRECT_ACCESS
    here = _stack(conv)
    if here is not None and all((_stack(u) or ("",))[0] == here[0] for u in others):
        return Reason.CALLED_TWICE
    return Reason.SHARED_PARAMETER


def _norm_outputs(norm: fx.Node) -> list[fx.Node] | None:
    """The nodes that carry the normalised tensor; None where another output is read."""
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


def _in_branches(program: ExportedProgram) -> list[Skipped]:
    """Batch norms inside control-flow branches, whose inputs are operands rather than stored tensors."""
    skipped = []
    for name, gm in _graph_modules(program):
        for node in gm.graph.nodes if name else ():
            if _is_norm(node):
                where = _stack(node)
                norm_name = where[0] if where else f"{name}.{node.name}"
                skipped.append(Skipped(norm_name, None, Reason.IN_SUBGRAPH))
    return skipped


# -- names --------------------------------------------------------------------------------


def _stack(node: fx.Node) -> tuple[str, str] | None:
    """The innermost module that ran ``node``: (its path from the root, its class name)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = str(path).removeprefix("L['self'].").removeprefix("L['self']")
    name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, name


def _norm_name(rewrite: _Rewrite, norm: fx.Node, norm_args: dict[str, Any]) -> str:
    """The norm's module path, from its statistics' names (``layer1.0.bn1.running_mean``), else the
    module that ran it, else the node's name."""
    for key in ("running_mean", "weight", "running_var", "bias"):
        owner = rewrite.owner(norm_args.get(key))
        if owner:
            return owner
    where = _stack(norm)
    return where[0] if where and where[0] else norm.name


def _producer_name(rewrite: _Rewrite, conv: fx.Node, conv_args: dict[str, Any]) -> str:
    owner = rewrite.owner(conv_args.get("weight"))
    if owner:
        return owner
    where = _stack(conv)
    return where[0] if where and where[0] else conv.name


def _kind(conv: fx.Node, producer: str, norm: fx.Node, norm_name: str) -> str:
    """``Conv2d+BatchNorm2d`` where both ops ran in those modules' own forward, else the op names."""
    conv_where, norm_where = _stack(conv), _stack(norm)
    if conv_where and norm_where and conv_where[0] == producer and norm_where[0] == norm_name:
        return f"{conv_where[1]}+{norm_where[1]}"
    return f"{conv.target.overloadpacket.__name__}+batch_norm"


# -- folding --------------------------------------------------------------------------------


def _fold(rewrite: _Rewrite, pair: _Pair) -> None:
    """Write the folded weights, route the norm's users to the conv, drop what only the norm read."""
    weight, bias = pair.conv_args["weight"], pair.conv_args.get("bias")
    norm_inputs = [pair.norm_args.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    running_mean, running_var, norm_weight, norm_bias = (
        rewrite.tensor(n) if n is not None else None for n in norm_inputs
    )
    folded_weight, folded_bias = fuse_conv_bn_weights(
        rewrite.tensor(weight),
        rewrite.tensor(bias) if bias is not None else None,
        running_mean,
        running_var,
        float(pair.eps),
        norm_weight,
        norm_bias,
        transpose=pair.transposed,
        groups=pair.groups,
    )
    rewrite.replace(weight, folded_weight)
    if bias is not None:
        rewrite.replace(bias, folded_bias)
    else:
        _set_argument(pair.conv, "bias", rewrite.add_input(weight, f"{pair.producer}.bias", folded_bias))
    for output in _norm_outputs(pair.norm):
        rewrite.rename_uses(output, pair.conv)
    for user in list(pair.norm.users):  # getitems of the other outputs, read by nothing
        rewrite.graph.erase_node(user)
    rewrite.graph.erase_node(pair.norm)
    counter = f"{pair.norm_name}.num_batches_tracked"
    unused = [*norm_inputs, *(n for n in rewrite.graph.nodes if rewrite.target(n) == counter)]
    for node in unused:
        if isinstance(node, fx.Node):
            rewrite.remove_unused(node)


class _Rewrite:
    """A working copy of a program: its graph, signature, state_dict and constants.

    The graph and signature are copies; tensors the fold does not touch are shared with the
    original program, never copied.
    """

    def __init__(self, program: ExportedProgram) -> None:
        self.program = program
        self.gm = copy.deepcopy(program.graph_module)
        self.graph = self.gm.graph
        for original, copied in zip(program.graph_module.graph.nodes, self.graph.nodes):
            # the copy renames nodes that shadow builtins (nn.Sequential's ``input`` becomes
            # ``input_1``); the signature names the originals
            copied.name = original.name
        self.signature = copy.deepcopy(program.graph_signature)
        self.state_dict = dict(program.state_dict)
        self.constants = dict(program.constants)
        self.module_call_graph = copy.deepcopy(program.module_call_graph)
        self.specs: dict[str, InputSpec] = {
            s.arg.name: s for s in self.signature.input_specs if getattr(s.arg, "name", None) is not None
        }
        self.mutated = {s.target for s in self.signature.output_specs if s.kind in _MUTATIONS}
        self.boundaries = {  # values at the edge of a module whose call signature export preserved
            arg.name
            for entry in self.module_call_graph
            if entry.fqn and entry.signature is not None
            for arg in (*entry.signature.inputs, *entry.signature.outputs)
            if getattr(arg, "name", None)
        }

    def spec(self, node: Any) -> InputSpec | None:
        """The signature entry of a parameter/buffer/constant input node, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            spec = self.specs.get(node.name)
            if spec is not None and spec.kind in _LIFTED:
                return spec
        return None

    def target(self, node: Any) -> str | None:
        spec = self.spec(node)
        return spec.target if spec is not None else None

    def store(self, spec: InputSpec) -> dict[str, Any]:
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            return self.state_dict
        return self.constants

    def tensor(self, node: Any) -> Tensor | None:
        spec = self.spec(node)
        value = None if spec is None else self.store(spec).get(spec.target)
        return value if isinstance(value, Tensor) else None

    def owner(self, node: Any) -> str | None:
        """The module an input belongs to, from its name: ``layer1.bn1.weight`` -> ``layer1.bn1``."""
        target = self.target(node)
        return target.rpartition(".")[0] if target else None

    def aliased(self, node: fx.Node) -> bool:
        """Whether another parameter/buffer/constant shares ``node``'s tensor storage (tied weights)."""
        target, tensor = self.target(node), self.tensor(node)
        if tensor is None or tensor.untyped_storage().nbytes() == 0:
            return False
        pointer = tensor.untyped_storage().data_ptr()
        return any(
            name != target and isinstance(other, Tensor) and other.untyped_storage().data_ptr() == pointer
            for name, other in (*self.state_dict.items(), *self.constants.items())
        )

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
        """A new input of the same kind as ``like`` (a parameter, usually) holding ``value`` in
        ``like``'s dtype and device, placed after the last input of its kind."""
        like_spec = self.spec(like)
        store = self.store(like_spec)
        taken = set(self.state_dict) | set(self.constants)
        unique, suffix = target, 0
        while unique in taken:
            suffix += 1
            unique = f"{target}_{suffix}"
        reference = store[like_spec.target]
        tensor = value.to(dtype=reference.dtype, device=reference.device)
        if like_spec.kind == InputKind.PARAMETER:
            tensor = nn.Parameter(tensor, requires_grad=reference.requires_grad)
        specs = {node: self.spec(node) for node in self.graph.nodes}
        last = [node for node, spec in specs.items() if spec is not None and spec.kind == like_spec.kind][-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(_NAME_PREFIX[like_spec.kind] + unique.replace(".", "_"))
        node.meta["val"] = _fake(like, tensor)
        spec = InputSpec(like_spec.kind, TensorArgument(node.name), unique, like_spec.persistent)
        self.specs[node.name] = spec
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

    def program_after(self) -> ExportedProgram:
        """The rewritten program; ExportedProgram's verifier checks graph and signature agree."""
        self.graph.lint()
        self.gm.recompile()
        input_specs = [self.specs[n.name] for n in self.graph.nodes if n.op == "placeholder"]
        return ExportedProgram(
            root=self.gm,
            graph=self.gm.graph,
            graph_signature=ExportGraphSignature(input_specs, self.signature.output_specs),
            state_dict=self.state_dict,
            range_constraints=dict(self.program.range_constraints),
            module_call_graph=self.module_call_graph,
            example_inputs=self.program.example_inputs,
            constants=self.constants,
            verifiers=self.program.verifiers,
        )


# -- graph helpers ----------------------------------------------------------------------


def _arguments(node: fx.Node) -> dict[str, Any]:
    """An ATen node's arguments by schema name, defaults filled in."""
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
    is_op = isinstance(node, fx.Node) and node.op == "call_function"
    return node.target.overloadpacket if is_op and isinstance(node.target, torch._ops.OpOverload) else None


def _is_norm(node: fx.Node) -> bool:
    return _packet(node) in _NORMS


def _is_producer(node: Any) -> bool:
    return _packet(node) in _CONVS | _TRANSPOSED_CONVS | _LINEARS


def _graph_modules(program: ExportedProgram) -> Iterator[tuple[str, fx.GraphModule]]:
    for name, module in program.graph_module.named_modules():
        if isinstance(module, fx.GraphModule):
            yield name, module


def _count_norms(program: ExportedProgram) -> int:
    return sum(1 for _, gm in _graph_modules(program) for n in gm.graph.nodes if _is_norm(n))


def _count_parameters(program: ExportedProgram) -> int:
    targets = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    return sum(program.state_dict[t].numel() for t in targets if t in program.state_dict)


def _fake(like: fx.Node, tensor: Tensor) -> Any:
    """A fake tensor for a new input's ``val`` metadata, in the graph's own fake mode."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = detect_fake_mode([like.meta.get("val")]) or FakeTensorMode(allow_non_fake_inputs=True)
    return mode.from_tensor(tensor, static_shapes=True)
