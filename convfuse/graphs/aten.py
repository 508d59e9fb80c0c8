"""ExportedProgram (``torch.export``, ``.pt2``): loading without running code from the file,
fusing (the graph rewrite itself is in ``aten_rewrite``) with verification against the original
program, and exporting a fused ``nn.Module`` for saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from convfuse import inputs
from convfuse import verify as verification
from convfuse.errors import InputError, LoadError, SaveError, first_line
from convfuse.files.archives import ArchiveError, open_archive, vet_exported
from convfuse.files.formats import quiet, refusal
from convfuse.files.trust import Refused
from convfuse.graphs.aten_rewrite import fuse_program
from convfuse.progress import timed
from convfuse.report import FuseResult
from convfuse.verify.verdict import verify_fused

__all__ = ["fuse_exported", "load_exported", "to_exported"]

# -- loading ----------------------------------------------------------------------------


def load_exported(path: str | Path, *, trust: bool = False) -> ExportedProgram:
    """Load a ``torch.export.save`` archive, vetted first unless ``trust``
    (``convfuse.files.archives.vet_exported``: ``torch.export.load`` can unpickle payloads
    without restrictions, dlopen an AOTInductor library, ``exec`` guard code and ``eval``
    symbolic expressions).

    Raises:
        LoadError: the archive is damaged or not an ExportedProgram.
        UnsafeFileError: loading it could run code from the file.
    """
    path = Path(path)
    if not trust:
        try:
            with quiet():
                vet_exported(open_archive(path))
        except ArchiveError as error:
            raise LoadError(
                f"{path}: the ExportedProgram cannot be loaded ({error}); is the file complete and written "
                "by torch.export.save?"
            ) from error
        except Refused as error:
            raise refusal(path, error) from error
    try:
        with quiet(), open(path, "rb") as f:  # a file object: torch.export.load wants a .pt2 name otherwise
            program = torch.export.load(f)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # with trust, the file's own code may raise anything
        raise LoadError(
            f"{path}: the ExportedProgram cannot be loaded ({type(error).__name__}: {first_line(error)}); "
            "is the file complete and written by torch.export.save?"
        ) from error
    if not isinstance(program, ExportedProgram):
        raise LoadError(f"{path}: holds a {type(program).__name__}, not an ExportedProgram")
    return program


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
    args, kwargs = inputs.as_call(example_inputs)
    try:
        return torch.export.export(model, args, kwargs)
    except Exception as error:
        raise SaveError(
            f"{type(model).__name__} cannot be exported with torch.export ({type(error).__name__}: "
            f"{first_line(error)}); write it as a pickle or TorchScript instead (--format)"
        ) from error


# -- fusing -----------------------------------------------------------------------------


def fuse_exported(
    program: ExportedProgram,
    example_inputs: Any = None,
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> FuseResult:
    """Fold every batch norm of ``program``'s graph that the module path would fold: after a conv
    or 2-D linear, a sum or channel concat of them, before one (norm first), FrozenBatchNorm2d.

    ``program`` is never changed; the result is a new ExportedProgram with the same calling
    convention. Example inputs default to those saved with the program, else random tensors of
    its input shapes. Arguments and errors as ``convfuse.fuse``.
    """
    timings: dict[str, float] = {}
    user_tolerance = atol is not None or rtol is not None
    with timed(timings, "reference"):
        if verify:
            batch = _example_batch(program, example_inputs)
            runner, example = _runner(program.module(), batch)
            reference = verification.record_reference(runner, example, truth=not user_tolerance)
        else:
            try:
                batch = _example_batch(program, example_inputs)
            except InputError:
                batch = None
    with timed(timings, "fold"):
        fused, report = fuse_program(program)
    report.timings = timings
    if verify:
        runner, _ = _runner(fused.module(), batch)
        verify_fused(report, runner, reference, atol=atol, rtol=rtol)
    return FuseResult(fused, report, batch)


# -- inputs -----------------------------------------------------------------------------


def _user_inputs(program: ExportedProgram) -> list[fx.Node]:
    specs = program.graph_signature.input_specs
    kinds = {spec.arg.name: spec.kind for spec in specs if hasattr(spec.arg, "name")}
    return [
        n for n in program.graph.nodes if n.op == "placeholder" and kinds.get(n.name) == InputKind.USER_INPUT
    ]


def _example_batch(program: ExportedProgram, example_inputs: Any) -> verification.Batch:
    """The (args, kwargs) to verify on: given, of given shapes, saved with the program, or drawn
    from the shapes and dtypes its graph records."""
    spec = example_inputs if isinstance(example_inputs, verification.InputSpec) else None
    if example_inputs is not None and spec is None:
        return inputs.as_call(example_inputs)
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


def _random(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    values = torch.randn(shape, generator=generator)
    if dtype.is_floating_point:
        return values.to(dtype=dtype, device=device)
    return values.abs().mul(3).to(dtype=dtype, device=device)


def _concrete(
    program: ExportedProgram, value: Any, dtype: torch.dtype | None, generator: torch.Generator
) -> Any:
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
