"""TorchScript (``torch.jit.save`` archives): fold BatchNorm into the conv/linear layers beside it
in a frozen copy of the module, one call site at a time, with convfuse's float64 math (the pairs
and the fold are in ``torchscript_fold``, judged by the shared ``convfuse.fold.checks``).

Why freeze rather than rewrite the module tree: in TorchScript, modules of the same class and
configuration share one type and one compiled ``forward``, so a graph edit made for one instance
applies to all of them, and a conv module called twice has one weight for both calls. PyTorch's
own module-level pass (``torch._C._jit_pass_fold_convbn``) runs into exactly this: it folds a
shared conv with whichever BatchNorm came last and silently changes the output; it also skips
transposed convolutions and computes in the weights' dtype. Freezing (``torch.jit.freeze``
without its numerics-changing optimisations) inlines every call into one graph whose weights are
constants, so each call site gets its own folded constants: shared modules, padding modes (a
separate ``aten::pad`` before the conv) and transposed convolutions all fold correctly.

The price: the result is a frozen module. Its weights are graph constants (no parameters or
state_dict, no ``.to()``, no training), attributes that ``forward`` does not use are gone, and
only ``forward`` and the model's other compiled methods are kept. Where nothing can be folded the
model is returned as it was.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from convfuse import verify as verification
from convfuse.errors import InputError, TrainingModeError
from convfuse.graphs.torchscript_fold import NORM, count_norms, fold_graph, nodes
from convfuse.progress import timed
from convfuse.report import Count, FuseReport, FuseResult
from convfuse.verify.verdict import verify_fused

__all__ = ["fuse_scripted"]

_CONV_CLASSES = {
    "Conv1d": 1, "Conv2d": 2, "Conv3d": 3, "ConvTranspose1d": 1, "ConvTranspose2d": 2, "ConvTranspose3d": 3
}
_SPATIAL = {1: [(256,), (64,)], 2: [(224, 224), (32, 32), (64, 64)], 3: [(8, 112, 112), (16, 64, 64)]}
_BATCH = 2


def fuse_scripted(
    model: torch.jit.ScriptModule,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    inplace: bool = False,
) -> FuseResult:
    """Fold every batch norm of a scripted or traced module's forward that the module path would
    fold (after a conv or linear, a sum or channel concat of them, before one, FrozenBatchNorm2d).

    Returns a frozen copy (see the module doc); ``model`` is never changed, so ``inplace`` has no
    effect. Without example inputs, they are the traced inputs of a traced module, else inferred
    from its first conv. Arguments and errors as ``convfuse.fuse``.
    """
    del inplace  # freezing always builds a new module
    if getattr(model, "training", False):  # a frozen module has no training flag
        raise TrainingModeError(
            "the TorchScript model is in training mode, where BatchNorm normalises with batch statistics "
            "and folding would change what it computes; call model.eval() first (on the command line: --eval)"
        )
    timings: dict[str, float] = {}
    user_tolerance = atol is not None or rtol is not None
    with timed(timings, "reference"):
        if verify:
            reference = _record_reference(model, example_inputs, truth=not user_tolerance)
            batch: verification.Batch | None = reference.batches[0]
        else:
            batch = _observe(model, example_inputs)
    with timed(timings, "fold"):
        frozen = _freeze(model)
        graph = frozen.graph
        report = FuseReport(
            norm_layers=Count(_count_norms(graph), 0), parameters=Count(_count_weights(graph), 0)
        )
        fused, skipped = fold_graph(graph, _ranks(frozen, batch), _module_of)
        torch._C._jit_pass_dce(graph)
        report.fused, report.skipped = fused, skipped
        report.norm_layers = Count(report.norm_layers.before, _count_norms(graph))
        report.parameters = Count(report.parameters.before, _count_weights(graph))
    report.timings = timings
    result = frozen if fused else model
    if verify:
        verify_fused(report, result, reference, atol=atol, rtol=rtol)
    return FuseResult(result, report, batch)


# -- inputs -----------------------------------------------------------------------------


def _candidates(model: torch.jit.ScriptModule, example_inputs: Any) -> list[Any]:
    """Example inputs to try in turn: the given ones, else a traced module's own, else inputs
    shaped for its first conv."""
    spec = example_inputs if isinstance(example_inputs, verification.InputSpec) else None
    if example_inputs is not None and (spec is None or spec.shapes):
        return [example_inputs]
    dtype = spec.dtype if spec is not None else None
    traced = _traced_inputs(model)
    if traced is not None:
        return [verification.InputSpec(tuple(tuple(t.shape) for t in traced), dtype or traced[0].dtype)]
    for _, module in model.named_modules():
        dims = _CONV_CLASSES.get(getattr(module, "original_name", ""))
        if dims is not None:
            channels = int(module.in_channels)
            shapes = [(_BATCH, channels, *spatial) for spatial in _SPATIAL[dims]]
            return [verification.InputSpec((shape,), dtype) for shape in shapes]
    return []


def _traced_inputs(model: torch.jit.ScriptModule) -> tuple[Tensor, ...] | None:
    """The inputs ``torch.jit.trace`` recorded for forward, where they are all tensors."""
    try:
        recorded = model._c._retrieve_traced_inputs()
        inputs = recorded["forward"] if "forward" in recorded else None
    except Exception:  # scripted, or loaded from a file: nothing recorded
        return None
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        return None
    return tuple(inputs)


def _no_shape_error(candidates: list[Any], errors: list[InputError]) -> InputError:
    if not candidates:
        return InputError(
            "cannot infer the input shape of the TorchScript model (it has no conv submodule to tell); "
            "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
        )
    if len(candidates) == 1:
        return errors[0]
    tried = ", ".join(str(c.shapes[0]) for c in candidates)
    return InputError(
        f"cannot infer the input shape of the TorchScript model: it rejected {tried}; "
        "pass example_inputs to convfuse.fuse(), or --input-shape on the command line"
    )


def _record_reference(
    model: torch.jit.ScriptModule, example_inputs: Any, *, truth: bool
) -> verification.Reference:
    candidates = _candidates(model, example_inputs)
    errors: list[InputError] = []
    for candidate in candidates:
        try:
            return verification.record_reference(model, candidate, truth=truth)
        except InputError as error:
            errors.append(error)
    raise _no_shape_error(candidates, errors)


def _observe(model: torch.jit.ScriptModule, example_inputs: Any) -> verification.Batch | None:
    for candidate in _candidates(model, example_inputs):
        batch, _ = verification.observe(model, candidate)
        if batch is not None:
            return batch
    return None


# -- freezing and counting --------------------------------------------------------------


def _freeze(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A frozen copy with every compiled method kept, without ``torch.jit.freeze``'s optimisations
    (its conv-BN folding among them: float32, no transposed convs)."""
    methods = [name for name in model._c._method_names() if name != "forward"]
    frozen = torch.jit.RecursiveScriptModule(torch._C._freeze_module(model._c, methods))
    torch.jit.RecursiveScriptModule._finalize_scriptmodule(frozen)
    return frozen


def _count_norms(graph: Any) -> int:
    """``aten::batch_norm`` ops and decomposed FrozenBatchNorm2d layers."""
    return count_norms(graph, _module_of)


def _count_weights(graph: Any) -> int:
    """Elements of the floating-point tensors the frozen graph holds, other than running statistics
    (the frozen counterpart of a module's parameter count)."""
    total = 0
    for node in nodes(graph.block()):
        if node.kind() != "prim::Constant":
            continue
        value = node.output().toIValue()
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        uses = node.output().uses()
        if uses and all(u.user.kind() == NORM and u.offset in (3, 4) for u in uses):
            continue
        total += value.numel()
    return total


# -- names ------------------------------------------------------------------------------

_HIERARCHY = re.compile(r"([^.()]+)\(([^()]*)\)")
_NOT_NAMES = ("SELF", "TOP", "UNKNOWN_INSTANCE")
_STORED = re.compile(r"^self\.(.+)\.(?:weight|bias|running_mean|running_var)(?:\.\d+)?$")


def _module_of(node: Any, stored: Any) -> tuple[str, str | None]:
    """The module path and class name of the call that ran ``node``: from the inlined call stack,
    else from the name freezing gave the constant ``stored``, else the node's output name."""
    hierarchy = _HIERARCHY.findall(node.getModuleHierarchy())  # "layer1(Sequential).0(BasicBlock)...."
    parts = [(name, cls.rsplit(".", 1)[-1]) for name, cls in hierarchy if name not in _NOT_NAMES]
    if parts:
        return ".".join(name for name, _ in parts), parts[-1][1]
    match = _STORED.match(stored.debugName()) if stored is not None else None
    if match:
        return match.group(1), None
    return f"{node.kind().removeprefix('aten::')}:%{node.output().debugName()}", None


def _ranks(frozen: Any, batch: verification.Batch | None) -> dict[Any, int]:
    """The rank of each node's (first) tensor output in a run on ``batch``, by node (empty where
    unknown): shape analysis of a copy of the graph, whose nodes come in the same order as the
    original's."""
    if batch is None or batch[1]:
        return {}
    copy = frozen.graph.copy()
    try:
        torch._C._jit_pass_complete_shape_analysis(copy, (frozen._c, *batch[0]), False)
    except Exception:  # shapes stay unknown; pairs that need them are skipped
        return {}
    ranks = {}
    ranks_by_value = {
        value.unique(): tensor.dim() for value, tensor in zip(list(copy.inputs())[1:], batch[0]) if isinstance(tensor, Tensor)
    }
    for original, analysed in zip(nodes(frozen.graph.block()), nodes(copy.block())):
        outputs = list(analysed.outputs())
        kind = outputs[0].type() if outputs else None
        rank = kind.dim() if isinstance(kind, torch._C.TensorType) else None
        if rank is None:
            rank = _rank_from_inputs(analysed, ranks_by_value)
        if rank is not None:
            ranks[original] = rank
            if outputs:
                ranks_by_value[outputs[0].unique()] = rank
    return ranks


_SAME_RANK = {
    "aten::linear", "aten::relu", "aten::relu_", "aten::hardswish", "aten::hardswish_", "aten::sigmoid",
    "aten::silu", "aten::silu_", "aten::gelu", "aten::hardtanh", "aten::hardtanh_", "aten::dropout",
    "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool3d", "aten::contiguous",
}


def _rank_from_inputs(node: Any, ranks: dict[int, int]) -> int | None:
    """The rank of ``node``'s output from its input's, for the few ops whose rank complete shape
    analysis leaves unknown in a classifier head (mean over axes, flatten, linear, activations)."""
    inputs = list(node.inputs())
    source = ranks.get(inputs[0].unique()) if inputs else None
    if source is None:
        return None
    kind = node.kind()
    if kind in _SAME_RANK:
        return source
    if kind in ("aten::mean", "aten::sum", "aten::amax") and len(inputs) >= 3:
        dims, keep = inputs[1].toIValue() if inputs[1].node().kind() == "prim::Constant" else None, inputs[2].toIValue()
        if isinstance(dims, list) and keep is False:
            return source - len({d % source for d in dims})
        return source if keep is True else None
    if kind == "aten::flatten" and len(inputs) == 3:
        start, end = inputs[1].toIValue(), inputs[2].toIValue()
        if isinstance(start, int) and isinstance(end, int) and source:
            return source - (end % source - start % source)
    return None
