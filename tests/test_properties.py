"""Property-based tests: random small conv/BatchNorm programs, every output checked against float64 truth.

The generator (hypothesis strategies below) writes the Python source of a random model and loads
it the way a user's file would be (its source is readable, as convfuse's code reader needs):

* a rank (Conv1d/2d/3d on 2x4x6, 2x4x5x5 or 2x4x4x4x4 inputs), a channel count, a dtype (float32,
  float64, float16, bfloat16) and one to four blocks, each its own ``nn.Module`` class;
* a block is a conv then its norm, a ReLU, a norm then its conv, a reshape (``bn1d(conv(x).flatten(2))``),
  a sum of two convs, a channel concat of two convs, a fork (``bn(y) + y/2``) or a child block
  returning its conv's output to the parent's norm; every conv is plain or transposed, grouped or
  depthwise or not, kernel 1 or 3, dilation 1 or 2, with every padding mode (and ``"same"``), with
  or without bias; norms may lack running statistics;
* between a conv and its norm, maybe an ``nn.Identity`` or an eval-mode dropout; a block may keep
  its norm in a plain container (list, tuple, dict, nested list, plain object, ``_``-named) and
  call it from there; hooks (changing the value, observing it, or a pre-hook) on a conv, a norm,
  the no-op module, the child block or the block itself;
* the model's forward calls the blocks in order, maybe one of them twice (module reuse), maybe a
  Linear + BatchNorm1d head on the pooled features (a second output), and maybe branches on its
  input (``if x.mean() > 0``: the forward is then untraceable and each block is a part traced on
  its own) with a second branch that calls the block negated, calls the block's norm directly, or
  reads the norm's weight. Every BatchNorm gets random statistics.

The oracle: the model is fused with ``convfuse.fuse`` on an example input whose mean is positive
(it takes every first branch); then the original, the fused model and the original in float64
(the truth) are run on that input and on eight others (its negation plus noise, which takes
every second branch, fresh normal draws, a scaled one, one with negative mean). For every output tensor, with
``scale`` its largest magnitude in the truth, the fused model's error against the truth must stay
within ``4 x`` the original's own error plus ``8`` units of rounding of the dtype (``8 * eps *
scale``; a float64 model is its own truth, so there: 32 units per conv or linear layer run): a
correct fold only moves rounding around (it is computed in float64 and cast once), a wrong one (a
norm applied twice or not at all, a hook seeing other values) is off by a large part of the scale.
What observing hooks recorded is judged the same way. An output that the original itself gets
more than 5% wrong is rounding noise (a norm of batch statistics over a constant input) and is not
judged. The fused model keeps
the original's class, the call never raises, and the report names every BatchNorm left.

``pytest -m slow tests/test_properties.py`` runs many more examples than the default run.
"""

from __future__ import annotations

import copy
import itertools
import linecache
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import convfuse
from convfuse.testing import randomize_bn
from tests.conftest import norm_names

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = {name: torch.finfo(dtype).eps for name, dtype in DTYPES.items()}
ORIGINAL_FACTOR = 4.0  # the fused model's error may be this many times the original's own ...
ROUNDING_UNITS = 8.0  # ... plus this many units of rounding of its dtype (relative to the scale)
FLOAT64_UNITS = 32.0  # in float64 (the truth is the model itself): this many per layer run
CANNOT_TELL = 0.05  # an output the original itself gets this wrong (relative) is rounding noise: not judged
SHAPES = {1: (6,), 2: (5, 5), 3: (4, 4, 4)}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


# -- the program ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    transposed: bool
    groups: str  # "1", "2" or "depthwise"
    kernel: int
    dilation: int
    padding_mode: str
    same: bool  # padding="same" (plain convs with zero padding only)
    bias: bool


@dataclass(frozen=True)
class Block:
    kind: str  # pair, norm_first, reshape, sum, cat, fork, nested
    conv: Conv
    conv_b: Conv
    mid: str | None  # None, "identity", "dropout"
    holder: str | None  # None or a key of HOLDERS: the norm is also kept there ...
    via_holder: bool  # ... and called from there
    hook: tuple[str, str] | None  # (which module, "modify" | "observe" | "pre")
    branch: str | None  # the second branch of an untraceable forward: "negate", "inside", "read"
    reused: bool
    running_stats: bool


@dataclass(frozen=True)
class Program:
    rank: int
    channels: int
    dtype: str
    blocks: tuple[Block, ...]
    untraceable: bool
    head: bool
    seed: int


HOLDERS = {  # how a block keeps its norm besides the module tree, and how it takes it back
    "list": ("[self.bn]", "self.{h}[0]"),
    "tuple": ("(self.bn,)", "self.{h}[0]"),
    "dict": ("{'norm': self.bn}", "self.{h}['norm']"),
    "nested": ("[[0, {'n': (self.bn,)}]]", "self.{h}[0][1]['n'][0]"),
    "object": ("_Holder(self.bn)", "self.{h}.norm"),
}


def _conv_strategy(rank: int, transposed_ok: bool = True) -> st.SearchStrategy[Conv]:
    @st.composite
    def build(draw) -> Conv:
        transposed = transposed_ok and draw(st.integers(0, 2)) == 0
        kernel = draw(st.sampled_from([1, 3]))
        dilation = draw(st.sampled_from([1, 2])) if kernel > 1 else 1
        mode = "zeros" if transposed else draw(st.sampled_from(PADDING_MODES))
        same = not transposed and mode == "zeros" and draw(st.booleans())
        return Conv(
            transposed=transposed,
            groups=draw(st.sampled_from(["1", "2", "depthwise"])),
            kernel=kernel,
            dilation=dilation,
            padding_mode=mode,
            same=same,
            bias=draw(st.booleans()),
        )

    return build()


@st.composite
def _block(draw, rank: int, untraceable: bool) -> Block:
    kind = draw(st.sampled_from(["pair", "pair", "norm_first", "reshape", "sum", "cat", "fork", "nested"]))
    conv = draw(_conv_strategy(rank, transposed_ok=kind != "cat"))
    conv_b = draw(_conv_strategy(rank, transposed_ok=kind != "cat"))
    mid = draw(st.sampled_from([None, None, "identity", "dropout"])) if kind in ("pair", "sum", "nested") else None
    # the traps come with lower odds than plain blocks, so that most pairs are foldable
    holder = draw(st.sampled_from([*[None] * 25, *HOLDERS]))
    targets = ["conv", "bn", "block"] + (["mid", "mid"] if mid else []) + (["inner", "inner"] if kind == "nested" else [])
    hooked = draw(st.integers(0, 3)) == 0
    hook = (draw(st.sampled_from(targets)), draw(st.sampled_from(["modify", "observe", "pre"]))) if hooked else None
    branch = draw(st.sampled_from([None, None, None, "negate", "inside", "read"])) if untraceable else None
    return Block(
        kind=kind,
        conv=conv,
        conv_b=conv_b,
        mid=mid,
        holder=holder,
        via_holder=holder is not None and draw(st.booleans()),
        hook=hook,
        branch=branch,
        reused=draw(st.integers(0, 7)) == 0,
        running_stats=draw(st.integers(0, 9)) != 0,
    )


@st.composite
def programs(draw) -> Program:
    rank = draw(st.sampled_from([1, 2, 3]))
    untraceable = draw(st.booleans())
    return Program(
        rank=rank,
        channels=draw(st.sampled_from([4, 8])),
        dtype=draw(st.sampled_from(list(DTYPES))),
        blocks=tuple(draw(st.lists(_block(rank, untraceable), min_size=1, max_size=4))),
        untraceable=untraceable,
        head=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# -- its source ---------------------------------------------------------------------------------------


def _conv_source(conv: Conv, rank: int, cin: int, cout: int) -> str:
    groups = {"1": 1, "2": 2, "depthwise": min(cin, cout)}[conv.groups]
    if cin % groups or cout % groups:
        groups = 1
    padding = '"same"' if conv.same else conv.dilation * (conv.kernel // 2)
    cls = f"nn.ConvTranspose{rank}d" if conv.transposed else f"nn.Conv{rank}d"
    extra = "" if conv.transposed else f", padding_mode={conv.padding_mode!r}"
    return (f"{cls}({cin}, {cout}, {conv.kernel}, padding={padding}, dilation={conv.dilation}, "
            f"groups={groups}, bias={conv.bias}{extra})")


def _block_source(index: int, block: Block, rank: int, channels: int) -> str:
    c, half = channels, channels // 2
    norm = f"nn.BatchNorm{1 if block.kind == 'reshape' else rank}d({c}, track_running_stats={block.running_stats})"
    lines = [f"class Block{index}(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    if block.kind == "nested":
        lines.append(f"        self.inner = Inner{index}()")
    elif block.kind == "cat":
        lines.append(f"        self.conv = {_conv_source(block.conv, rank, c, half)}")
        lines.append(f"        self.conv_b = {_conv_source(block.conv_b, rank, c, c - half)}")
    else:
        lines.append(f"        self.conv = {_conv_source(block.conv, rank, c, c)}")
    if block.kind == "sum":
        lines.append(f"        self.conv_b = {_conv_source(block.conv_b, rank, c, c)}")
    if block.mid:
        lines.append("        self.mid = " + ("nn.Identity()" if block.mid == "identity" else "nn.Dropout(0.5)"))
    lines.append(f"        self.bn = {norm}")
    norm_call = "self.bn"
    if block.holder:
        make, take = HOLDERS[block.holder]
        name = f"_held_{block.holder}"
        lines.append(f"        self.{name} = {make}")
        if block.via_holder:
            norm_call = take.format(h=name)
    mid = (lambda v: f"self.mid({v})") if block.mid else (lambda v: v)
    lines += ["", "    def forward(self, x):"]
    body = {
        "pair": f"return {norm_call}({mid('self.conv(x)')})",
        "norm_first": f"return self.conv({norm_call}(torch.relu(x)))",
        "reshape": f"y = self.conv(x)\n        return {norm_call}(y.flatten(2)).view(y.shape)",
        "sum": f"return {norm_call}(self.conv(x) + {mid('self.conv_b(x)')})",
        "cat": f"return {norm_call}(torch.cat([self.conv(x), self.conv_b(x)], 1))",
        "fork": f"y = self.conv(x)\n        return {norm_call}(y) + 0.5 * y",
        "nested": f"return {norm_call}({mid('self.inner(x)')})",
    }[block.kind]
    lines.append(f"        {body}")
    source = "\n".join(lines) + "\n"
    if block.kind == "nested":
        source = (f"class Inner{index}(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                  f"        self.conv = {_conv_source(block.conv, rank, c, c)}\n\n"
                  f"    def forward(self, x):\n        return self.conv(x)\n\n\n") + source
    return source


def _second_branch(index: int, block: Block, rank: int) -> str:
    name = f"self.b{index}"
    if block.branch == "negate":
        return f"-{name}(y)"
    if block.branch == "read":
        return f"{name}(y) * {name}.bn.weight.view(1, -1{', 1' * rank})"
    if block.kind == "reshape":
        return f"{name}.bn(y.flatten(2)).view(y.shape) * 1.5"
    return f"{name}.bn(y) * 1.5"


def program_source(program: Program) -> str:
    """The Python source of ``program``: block classes, then ``Program`` whose forward calls them."""
    parts = ["import torch", "from torch import nn", "", "",
             "class _Holder:", "    def __init__(self, norm):", "        self.norm = norm", "", ""]
    for index, block in enumerate(program.blocks):
        parts.append(_block_source(index, block, program.rank, program.channels) + "\n")
    lines = ["class Program(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    for index in range(len(program.blocks)):
        lines.append(f"        self.b{index} = Block{index}()")
    if program.head:
        lines.append(f"        self.head = nn.Sequential(nn.Linear({program.channels}, 5), nn.BatchNorm1d(5))")
    lines += ["", "    def forward(self, x):"]
    if program.untraceable:
        lines.append("        first = bool(x.mean() > 0)")
    lines.append("        y = x")
    for index, block in enumerate(program.blocks):
        call = f"self.b{index}(self.b{index}(y))" if block.reused else f"self.b{index}(y)"
        if block.branch:
            lines += ["        if first:", f"            y = {call}", "        else:",
                      f"            y = {_second_branch(index, block, program.rank)}"]
        else:
            lines.append(f"        y = {call}")
    if program.head:
        dims = tuple(range(2, 2 + program.rank))
        lines.append(f"        return y, self.head(y.mean({dims}))")
    else:
        lines.append("        return y")
    return "\n\n".join(parts) + "\n".join(lines) + "\n"


_counter = itertools.count()


def build(program: Program) -> tuple[nn.Module, list]:
    """The model of ``program``, its statistics randomised and hooks set, in its dtype; and the list
    its observing hooks append to."""
    source = program_source(program)
    filename = f"<convfuse-property-{next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # readable source
    namespace: dict = {"__name__": "tests.property_program"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    torch.manual_seed(program.seed)
    model = randomize_bn(namespace["Program"](), program.seed).eval()
    seen: list = []
    for index, block in enumerate(program.blocks):
        if block.hook is None:
            continue
        where, what = block.hook
        target = getattr(model, f"b{index}")
        if where != "block":
            target = getattr(target, where) if hasattr(target, where) else target.inner.conv
        if what == "modify":
            target.register_forward_hook(lambda m, args, out: out * 1.25 + 0.1)
        elif what == "pre":
            target.register_forward_pre_hook(lambda m, args: (args[0] * 1.25 + 0.1,))
        else:
            target.register_forward_hook(lambda m, args, out: seen.append(out.detach().double().clone()))
    return model.to(DTYPES[program.dtype]), seen


def inputs(program: Program) -> list[torch.Tensor]:
    """The example (positive mean: every first branch) and eight others (its mirror image takes
    every second branch)."""
    shape = (2, program.channels, *SHAPES[program.rank])
    generator = torch.Generator().manual_seed(program.seed)
    draw = lambda: torch.randn(shape, generator=generator, dtype=torch.float64)
    example = draw().abs() + 0.1
    # Its negation with some noise, not -example itself: ReLU(-example) would be all zeros, and a
    # norm of batch statistics over a constant is pure rounding noise.
    mirrored = -example + 0.5 * draw()
    others = [mirrored, draw(), draw(), draw(), draw() * 3, draw() - 1, draw() + 1, draw().abs() * 0.3]
    return [example, *others]


# -- the oracle -------------------------------------------------------------------------------------


def _tensors(output) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else [t for item in output for t in _tensors(item)]


def _run(model: nn.Module, x: torch.Tensor, seen: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    seen.clear()
    with torch.no_grad():
        outputs = [t.double() for t in _tensors(model(x))]
    return outputs, list(seen)


def layers_run(program: Program) -> int:
    """How many conv and linear layers one forward pass runs on its longest path."""
    per_block = [(2 if b.kind in ("sum", "cat") else 1) * (2 if b.reused else 1) for b in program.blocks]
    return sum(per_block) + int(program.head)


def rounding_allowed(program: Program) -> float:
    """Rounding a correct fold may add, relative to an output's scale, beyond the original's own error.

    Below float64 the original's own error against float64 truth measures the program's rounding.
    A float64 model is its own truth (its error is 0), so the allowance is rounding alone:
    ``FLOAT64_UNITS`` units for each layer run, each fold moving rounding in one of them.
    """
    if program.dtype == "float64":
        return FLOAT64_UNITS * EPS["float64"] * layers_run(program)
    return ROUNDING_UNITS * EPS[program.dtype]


def check(program: Program) -> convfuse.FuseResult | None:
    """Fuse ``program``'s model and compare every output with float64 truth on nine inputs; None
    where convfuse refused its own result (verification failed: nothing would be written)."""
    model, seen = build(program)
    dtype = DTYPES[program.dtype]
    truth_model = copy.deepcopy(model).double()
    batches = inputs(program)
    try:
        result = convfuse.fuse(model, batches[0].to(dtype))
    except convfuse.VerificationError as error:
        # A refusal never yields a wrong model, and two are expected: a program whose own rounding
        # is too large to tell a correct fold from a wrong one (cancellation in float16), and a deep
        # float64 program, whose rounding verification's float64 floor (64 units) has no room for
        # (the model is its own truth there).
        noisy = str(error).startswith("verification failed: cannot verify")
        float64 = program.dtype == "float64" and error.report.verification.max_rel_error < 1e-11
        assert noisy or float64, str(error)
        return None
    assert type(result.model) is type(model)
    left = norm_names(result.model)
    assert {skip.norm for skip in result.report.skipped} == left
    assert {pair.norm for pair in result.report.fused}.isdisjoint(left)
    rounding = rounding_allowed(program)
    for index, x in enumerate(batches):
        truth, seen_truth = _run(truth_model, x, seen)
        original, seen_original = _run(model, x.to(dtype), seen)
        fused, seen_fused = _run(result.model, x.to(dtype), seen)
        assert len(fused) == len(truth) and len(seen_fused) == len(seen_truth)
        for what, t, o, f in zip(
            [f"output {i}" for i in range(len(truth))] + [f"observing hook call {i}" for i in range(len(seen_truth))],
            [*truth, *seen_truth], [*original, *seen_original], [*fused, *seen_fused],
        ):
            scale = t.abs().max().item() or 1.0
            own = (o - t).abs().max().item() / scale
            error = (f - t).abs().max().item() / scale
            if own > CANNOT_TELL:  # e.g. a norm of batch statistics over a constant input: noise
                continue
            bound = ORIGINAL_FACTOR * own + rounding
            assert error <= bound, (
                f"input {index}, {what}: fused error {error:.3g} of the scale, the original's own {own:.3g}, "
                f"bound {bound:.3g}; fused {[(p.producer, p.norm) for p in result.report.fused]}\n"
                + program_source(program)
            )
    return result


COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "phases": [Phase.explicit, Phase.generate, Phase.shrink],  # no example database, no patch files
    "suppress_health_check": [HealthCheck.too_slow],
}


@dataclass
class Tally:
    """What a run of the generator made: folds by kind, reasons for skips, refusals."""

    kinds: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    folded: int = 0
    skipped: int = 0
    refused: int = 0


def explore(max_examples: int) -> Tally:
    """Check ``max_examples`` random programs (the same ones on every run); what they made."""
    tally = Tally()

    @settings(max_examples=max_examples, **COMMON)
    @given(programs())
    def one(program: Program) -> None:
        result = check(program)
        if result is None:
            tally.refused += 1
            return
        tally.folded += len(result.report.fused)
        tally.skipped += len(result.report.skipped)
        tally.kinds.update(pair.kind for pair in result.report.fused)
        tally.reasons.update(skip.reason for skip in result.report.skipped)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention
    try:
        one()
    finally:
        torch.set_num_threads(threads)
    return tally


def test_random_programs_match_float64_truth() -> None:
    tally = explore(250)
    # the generator makes what it says: most pairs fold, in every combination ...
    assert tally.folded > tally.skipped / 2 and tally.refused <= 12  # refusals: ill-conditioned bfloat16 programs
    folded = " ".join(sorted(tally.kinds))
    for kind in ("ConvTranspose", "Conv1d", "Conv3d", "reshape+BatchNorm1d", " + ", "cat(", "Linear+BatchNorm1d"):
        assert kind in folded, kind
    assert any(kind.startswith("BatchNorm") for kind in tally.kinds)  # a norm before its conv
    # ... and each trap is generated and skipped
    Reason = convfuse.Reason
    for reason in (Reason.HELD_ELSEWHERE, Reason.HOOKS_BETWEEN, Reason.REACHED, Reason.DIRECT_ACCESS,
                   Reason.CALLED_TWICE, Reason.HOOKS, Reason.OTHER_USERS, Reason.ZERO_PADDING):
        assert reason in tally.reasons, reason


@pytest.mark.slow
def test_many_random_programs_match_float64_truth() -> None:
    explore(4000)
