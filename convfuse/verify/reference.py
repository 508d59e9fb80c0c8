"""The reference: the original model's outputs (in its dtype and in float64) on the verification
batches, and what the first run showed about each module, recorded before the rewrite so that a
large model is never held twice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from convfuse.graphs.fx_pairs import Observation
from convfuse.inputs import SEED, Batch, InputSpec, similar_batch
from convfuse.verify.float64 import float64_outputs
from convfuse.verify.leaves import output_dtype, paired_floats, relative_difference, structure_difference
from convfuse.verify.result import tolerance_for
from convfuse.verify.running import Outputs, first_run, run

__all__ = ["BATCHES", "Reference", "record_reference"]

BATCHES = 3
"""Batches of the rounding check: the example inputs and two drawn like them (spread 1x, 2x)."""


@dataclass
class Reference:
    """Outputs of the original model, recorded before the rewrite."""

    batches: list[Batch]
    outputs: list[Outputs]
    truth: list[Any] | None  # the final outputs in float64, where that could be computed
    observation: Observation
    rerun_noise: float = 0.0  # largest relative difference between two identical runs
    truth_problem: str | None = None
    inferred: bool | None = None  # whether convfuse chose the inputs' shapes

    @property
    def input_shapes(self) -> list[list[int]]:
        """The shapes of the first batch's tensors (positional, then keyword arguments)."""
        args, kwargs = self.batches[0]
        return [list(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]


def _inferred(example_inputs: Any) -> bool:
    return example_inputs is None or (isinstance(example_inputs, InputSpec) and not example_inputs.shapes)


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
    drawn like it with a fixed seed. With ``truth`` the outputs are also computed in float64
    (each probe's too, on the inputs it saw). ``probes`` names modules whose calls are recorded
    as well. Raises InputError when no input the model accepts can be built.
    """
    batch, outputs, observation = first_run(model, example_inputs, probes)
    generator = torch.Generator().manual_seed(SEED + 1)
    batches, recorded = [batch], [outputs]
    for spread in (1.0, 2.0)[: count - 1]:
        candidate = similar_batch(batch, generator, spread)
        try:
            recorded.append(run(model, candidate, probes))
        except Exception:  # the model rejects redrawn inputs (e.g. it needs values in a range)
            continue
        batches.append(candidate)
    rerun = run(model, batch)
    reference = Reference(batches, recorded, None, observation, inferred=_inferred(example_inputs))
    if structure_difference(outputs.final, rerun.final) is not None:
        reference.truth_problem = "nondeterministic"
        return reference
    reference.rerun_noise = max(
        (relative_difference(a, b) for _, a, b in paired_floats(outputs.final, rerun.final)), default=0.0
    )
    if reference.rerun_noise > tolerance_for(output_dtype(outputs.final)).cap:
        reference.truth_problem = "nondeterministic"
        return reference
    if truth:
        reference.truth, reference.truth_problem = float64_outputs(model, batches)
        for name in probes:  # each part alone, on the very inputs it saw
            calls = [c for outputs in recorded for c in outputs.probes[name]]
            module = model.get_submodule(name)
            truths, _ = float64_outputs(module, [c.inputs for c in calls])
            for c, value in zip(calls, truths or []):
                c.truth = value
    return reference
