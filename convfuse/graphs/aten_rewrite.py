"""The BatchNorm fold on an ExportedProgram's ATen graph: the pairs ``aten_pairs`` finds,
judged by the shared table of checks (``convfuse.fold.checks``), folded into a new program.

The fold rewrites a copy of the program's graph rather than re-exporting ``program.module()``:
a re-export needs inputs and dynamic-shape specs the program no longer carries in a usable
form, and it would rename nodes and lose custom metadata, preserved module call signatures and
custom ops that the user's own export options produced. Only the pieces the fold touches change:
the conv's weight (and bias) tensors, a new bias input where the conv had none (added to the
graph signature and state_dict as a parameter of the conv's module, e.g. ``layer1.0.conv1.bias``,
among the other parameters; ``block1-0.proj.0.bias`` becomes the node ``p_block1_0_proj_0_bias``),
and the norm's nodes with the inputs only they read. Tensors the
fold does not touch are shared with the original program, never copied. The result is checked by
``ExportedProgram``'s own verifier when it is built.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    TensorArgument,
)

from convfuse.fold.arithmetic import fold_weights
from convfuse.fold.reasons import Reason, Skipped
from convfuse.graphs.aten_pairs import (
    Pair,
    arguments,
    count_norms,
    describe,
    find_norms,
    groups,
    is_norm_op,
    norm_after,
    norm_first,
    stack,
    transposed,
)
from convfuse.graphs.pairs import fold_norms
from convfuse.report import Count, FuseReport

__all__ = ["fuse_program"]


_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_NAME_PREFIX = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
_MUTATIONS = (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION, OutputKind.USER_INPUT_MUTATION)


def fuse_program(program: ExportedProgram) -> tuple[ExportedProgram, FuseReport]:
    """Find, check and fold every pair: the program after (``program`` itself where nothing was
    folded; it is never changed) and the report, verification not yet run.

    As on the module path, every norm is first tried with the layers feeding it, then the norms
    left with the layer reading them (norm first).
    """
    report = FuseReport(
        norm_layers=Count(_count_norms(program), 0),
        parameters=Count(_count_parameters(program), 0),
    )
    rewrite = _Rewrite(program)
    fused, skipped = fold_norms(
        find_norms(rewrite),
        [lambda norm: norm_after(rewrite, norm), lambda norm: norm_first(rewrite, norm)],
        lambda pair: describe(rewrite, pair),
        lambda pair: _fold(rewrite, pair),
    )
    skipped += _in_branches(program)
    result = rewrite.program_after() if fused else program
    report.fused = fused
    report.skipped = skipped
    report.norm_layers = Count(report.norm_layers.before, _count_norms(result))
    report.parameters = Count(report.parameters.before, _count_parameters(result))
    return result, report


def _in_branches(program: ExportedProgram) -> list[Skipped]:
    """Batch norms inside control-flow branches, whose inputs are operands rather than stored tensors."""
    skipped = []
    for name, gm in _graph_modules(program):
        for node in gm.graph.nodes if name else ():
            if is_norm_op(node):
                where = stack(node)
                norm_name = where[0] if where else f"{name}.{node.name}"
                skipped.append(Skipped(norm_name, None, Reason.IN_SUBGRAPH))
    return skipped


# -- folding --------------------------------------------------------------------------------


def _fold(rewrite: _Rewrite, pair: Pair) -> None:
    """Write the folded weights, route the norm's users past it, drop what only the norm read."""
    norm = pair.norm
    stats = [norm.stats[k] for k in ("running_mean", "running_var", "weight", "bias")]
    running_mean, running_var, norm_weight, norm_bias = (rewrite.tensor(n) if n is not None else None for n in stats)
    producers = []
    for producer in pair.producers:
        args = arguments(producer)
        producers.append((rewrite.tensor(args["weight"]), rewrite.tensor(args.get("bias")), transposed(producer), groups(producer)))
    folded = fold_weights(
        producers, (running_mean, running_var, float(norm.eps), norm_weight, norm_bias),
        combine=pair.combine, norm_first=pair.first,
    )
    for producer, name, (weight, bias) in zip(pair.producers, pair.names, folded):
        args = arguments(producer)
        rewrite.replace(args["weight"], weight)
        if args.get("bias") is not None:
            rewrite.replace(args["bias"], bias)
        else:
            _set_argument(producer, "bias", rewrite.add_input(args["weight"], f"{name}.bias", bias))
    if pair.first:
        _set_argument(pair.producers[0], "input", norm.input)
    else:
        for output in norm.outputs() or []:
            rewrite.rename_uses(output, pair.output)
    if norm.decomposed is not None:
        for node in norm.decomposed.values:
            if isinstance(node, fx.Node) and not node.users:
                rewrite.graph.erase_node(node)
    else:
        for user in list(norm.node.users):  # getitems of the other outputs, read by nothing
            rewrite.graph.erase_node(user)
        rewrite.graph.erase_node(norm.node)
    counter = f"{norm.name}.num_batches_tracked"
    unused = [*stats, *(n for n in rewrite.graph.nodes if rewrite.target(n) == counter)]
    for node in unused:
        if isinstance(node, fx.Node):
            rewrite.remove_unused(node)


class _Rewrite:
    """A working copy of a program: its graph, signature, state_dict and constants.

    The graph and signature are copies; tensors the fold does not touch are shared with the
    original program, never copied.
    """

    def __init__(self, program: ExportedProgram, *, copy_graph: bool = True) -> None:
        self.program = program
        # without copy_graph: a read-only view of the program's own graph (to count its norms)
        self.gm = copy.deepcopy(program.graph_module) if copy_graph else program.graph_module
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
            node = self.graph.placeholder(_NAME_PREFIX[like_spec.kind] + re.sub(r"\W", "_", unique))
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


def _set_argument(node: fx.Node, name: str, value: Any) -> None:
    index = next(i for i, a in enumerate(node.target._schema.arguments) if a.name == name)
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args) and name not in node.kwargs:
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _graph_modules(program: ExportedProgram) -> Iterator[tuple[str, fx.GraphModule]]:
    for name, module in program.graph_module.named_modules():
        if isinstance(module, fx.GraphModule):
            yield name, module


def _count_norms(program: ExportedProgram) -> int:
    """Batch-norm ops in every graph, and the decomposed FrozenBatchNorm2d layers of the top graph."""
    top = count_norms(program.graph, _Rewrite(program, copy_graph=False))
    return top + sum(count_norms(gm.graph) for name, gm in _graph_modules(program) if name)


def _count_parameters(program: ExportedProgram) -> int:
    targets = {s.target for s in program.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    return sum(program.state_dict[t].numel() for t in targets if t in program.state_dict)


def _fake(like: fx.Node, tensor: Tensor) -> Any:
    """A fake tensor for a new input's ``val`` metadata, in the graph's own fake mode."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = detect_fake_mode([like.meta.get("val")]) or FakeTensorMode(allow_non_fake_inputs=True)
    return mode.from_tensor(tensor, static_shapes=True)
