"""Prove that a fused model computes what the original computed, and say what was compared.

Two checks on the same inputs (``verdict``): the fold is proven exact in float64 (the fused
model with its folded weights rebuilt at float64 precision from the remainders kept where they
were written, against the original in float64, to float64 rounding), and the fused model in its
own dtype is no worse against float64 than ``ROUNDING_FACTOR`` times the original's own error.
The reference (``reference``) is recorded on the original before the rewrite, one module at a
time in float64 (``float64``), so a large model is never held twice.
"""

from convfuse.inputs import Batch, InputSpec, as_batch, inputs_from_shapes
from convfuse.verify.float64 import float64_outputs, float64_while_running, in_float64
from convfuse.verify.reference import BATCHES, Reference, record_reference
from convfuse.verify.remainders import Remainders, recording
from convfuse.verify.result import (
    NOISE_FACTOR,
    PROOF_ULPS,
    ROUNDING_FACTOR,
    Check,
    Tolerance,
    Verification,
    proof_bound,
    tolerance_for,
)
from convfuse.verify.running import buffers_kept, observe
from convfuse.verify.verdict import PROOF_BATCHES, compare

__all__ = [
    "BATCHES",
    "NOISE_FACTOR",
    "PROOF_BATCHES",
    "PROOF_ULPS",
    "ROUNDING_FACTOR",
    "Batch",
    "Check",
    "InputSpec",
    "Reference",
    "Remainders",
    "Tolerance",
    "Verification",
    "as_batch",
    "buffers_kept",
    "compare",
    "float64_outputs",
    "float64_while_running",
    "in_float64",
    "inputs_from_shapes",
    "observe",
    "proof_bound",
    "record_reference",
    "recording",
    "tolerance_for",
]
