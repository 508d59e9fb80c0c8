"""Verification: a correct fold passes, a wrong one (even slightly wrong) fails, nested outputs
compare leaf by leaf, inputs are inferred where the first layer tells, and problems get a clear
message rather than a false failure."""

from __future__ import annotations

import dataclasses
import importlib
from collections import namedtuple

import pytest
import torch
from torch import nn

import convfuse

fuse_module = importlib.import_module("convfuse.graphs.fx_fold")
arithmetic = importlib.import_module("convfuse.fold.arithmetic")
from convfuse import verify
from convfuse.fold.arithmetic import fuse_conv_bn_weights
from tests.conftest import norm_names, randomize_bn


class ConvNet(nn.Module):
    """conv-BN-ReLU twice, then a max-pool: small, but deep enough to have rounding noise."""

    def __init__(self, dims: int = 2, channels: int = 8) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
        self.conv1, self.bn1 = conv(3, channels, 3, padding=1), bn(channels)
        self.conv2, self.bn2 = conv(channels, channels, 3, padding=1, bias=False), bn(channels)
        self.pool = pool(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pool(torch.relu(self.bn2(self.conv2(x))))


def _model(dtype: torch.dtype = torch.float32, dims: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ConvNet(dims)).eval().to(dtype)


def _off_by(relative: float):
    """A folding function that is wrong by ``relative`` of each folded bias's magnitude."""

    def wrong(*args, **kwargs):
        weight, bias = fuse_conv_bn_weights(*args, **kwargs)
        return weight, bias + relative * bias.abs().max()

    return wrong


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_correct_fold_passes_default_tolerance(dtype: torch.dtype) -> None:
    model = _model(dtype)
    x = torch.randn(2, 3, 16, 16).to(dtype)
    result = convfuse.fuse(model, x)
    v = result.report.verification
    assert v.passed is True
    assert v.batches == 3
    assert 0 < v.rtol <= verify.tolerance_for(dtype).cap
    assert v.max_rel_error <= v.rtol
    assert norm_names(result.model) == set()


@pytest.mark.parametrize(
    ("dtype", "relative"),
    [(torch.float32, 1e-4), (torch.float64, 1e-8), (torch.bfloat16, 0.25), (torch.float16, 0.05)],
)
def test_slightly_wrong_fold_fails_default_tolerance(monkeypatch, dtype, relative) -> None:
    """Errors far below a fixed 1e-3 check are still caught: they exceed the model's own noise."""
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _off_by(relative))
    model = _model(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(convfuse.VerificationError, match="differs from the original") as raised:
        convfuse.fuse(model, torch.randn(2, 3, 16, 16).to(dtype))
    report = raised.value.report
    assert report.verification.passed is False
    assert report.verification.max_rel_error > report.verification.rtol
    assert report.to_dict()["verification"]["passed"] is False
    # the input model is untouched (inplace=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert norm_names(model) == {"bn1", "bn2"}


def test_user_tolerance_overrides_defaults(monkeypatch) -> None:
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    strict = convfuse.fuse(model, x, atol=1.0)  # generous: passes
    assert strict.report.verification.rule == "float64 proof + user tolerance"
    assert strict.report.verification.atol == 1.0
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _off_by(1e-3))
    with pytest.raises(convfuse.VerificationError):
        convfuse.fuse(model, x, rtol=1e-6)
    # a user tolerance bounds the check in the model's dtype, not the float64 proof of the fold
    with pytest.raises(convfuse.VerificationError, match="the fold is wrong") as raised:
        convfuse.fuse(model, x, rtol=0.5)
    assert raised.value.report.verification.rounding.passed is True
    assert raised.value.report.verification.proof.passed is False


def test_negative_tolerance_is_a_usage_error() -> None:
    with pytest.raises(convfuse.UsageError, match="negative"):
        convfuse.fuse(_model(), torch.randn(2, 3, 8, 8), atol=-1.0)


def test_verify_false_reports_skipped() -> None:
    result = convfuse.fuse(_model(), torch.randn(2, 3, 8, 8), verify=False)
    assert result.report.verification.passed is None
    assert result.report.to_dict()["verification"]["passed"] is None
    assert "not verified" in result.report.summary()


@pytest.mark.parametrize("convert", ["in_float64", "float64_while_running"])
def test_float64_reference_restores_the_model_exactly(convert: str) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    with getattr(verify, convert)(model):
        out = model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        assert out.dtype == torch.float64
    assert [id(p) for p in model.parameters()] == params
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_float64_reference_falls_back_where_a_forward_reads_another_modules_weight() -> None:
    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(torch.nn.functional.linear(x, self.fc.weight))  # fc itself never runs

    model = randomize_bn(Reader()).eval()
    batches = [((torch.randn(2, 4),), {})]
    truth, problem = verify.float64_outputs(model, batches)
    assert problem is None and truth[0].dtype == torch.float64
    assert model.fc.weight.dtype == torch.float32


Pair = namedtuple("Pair", "left right")


@dataclasses.dataclass
class Detections:
    boxes: torch.Tensor
    labels: torch.Tensor
    extra: dict


class NestedNet(nn.Module):
    """Outputs nested as detection models do: dicts of lists of namedtuples and dataclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return {
            "features": [y, Pair(y.mean(dim=(2, 3)), y.amax(dim=(2, 3)))],
            "detections": Detections(y.flatten(1)[:, :4], y.flatten(1).argmax(dim=1), {"score": y.amax()}),
            "name": "nested",
        }


def test_nested_outputs_compare_every_leaf(monkeypatch) -> None:
    model = randomize_bn(NestedNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    result = convfuse.fuse(model, x)
    assert result.report.verification.passed
    assert len(result.report.fused) == 1
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _off_by(1e-2))
    with pytest.raises(convfuse.VerificationError) as raised:
        convfuse.fuse(model, x)
    assert "output[" in raised.value.report.verification.worst_output or "output[" in str(raised.value)


def test_structure_change_is_a_failure_naming_the_place() -> None:
    class Swapping(nn.Module):
        def __init__(self, extra: bool) -> None:
            super().__init__()
            self.extra = extra

        def forward(self, x):
            return {"a": x, "b": [x, x]} if self.extra else {"a": x, "b": [x]}

    x = torch.randn(2, 3)
    reference = verify.record_reference(Swapping(True), x)
    result = verify.compare(Swapping(False), reference)
    assert result.passed is False
    assert "['b']" in result.message


def test_detection_model_verifies_on_nested_outputs() -> None:
    """Detection outputs (lists of dicts of boxes/scores/labels) are compared; where NMS and
    top-k make them discontinuous, the backbone and heads' outputs decide."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96
    )
    model = randomize_bn(model).eval()
    result = convfuse.fuse(model, ([torch.rand(3, 96, 96)],))
    assert result.report.verification.passed
    assert norm_names(result.model) == set()
    assert any(u.module == "(model)" for u in result.report.untraced)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (lambda: nn.Sequential(nn.Conv1d(5, 4, 3), nn.BatchNorm1d(4)), (2, 5, 256)),
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 224, 224)),
        (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)), (2, 2, 8, 112, 112)),
        (lambda: nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4)), (2, 7)),
    ],
    ids=["conv1d", "conv2d", "conv3d", "linear"],
)
def test_inputs_are_inferred_from_the_first_layer(model, shape) -> None:
    result = convfuse.fuse(randomize_bn(model()).eval())
    assert result.report.verification.passed
    assert len(result.report.fused) == 1
    args, _ = result.example_inputs
    assert tuple(args[0].shape) == shape


def test_inference_tries_a_second_size() -> None:
    """A CIFAR-style net with a Linear after flatten rejects 224x224 and accepts 32x32."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    result = convfuse.fuse(randomize_bn(model).eval())
    assert tuple(result.example_inputs[0][0].shape) == (2, 3, 32, 32)
    assert result.report.verification.passed


def test_uninferable_input_asks_for_shapes() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(convfuse.InputError, match="input-shape"):
        convfuse.fuse(randomize_bn(model).eval())


def test_input_spec_gives_shapes_and_dtype() -> None:
    model = randomize_bn(ConvNet()).eval()
    spec = convfuse.InputSpec(shapes=((2, 3, 12, 12),), dtype=torch.float32)
    result = convfuse.fuse(model, spec)
    assert tuple(result.example_inputs[0][0].shape) == (2, 3, 12, 12)
    assert result.report.verification.passed


def test_model_rejecting_example_inputs_is_an_input_error() -> None:
    with pytest.raises(convfuse.InputError, match="raised"):
        convfuse.fuse(_model(), torch.randn(2, 5, 8, 8))


def test_dropout_left_in_training_mode_is_verified_with_seeded_runs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model = randomize_bn(model).eval()
    model[2].train()
    result = convfuse.fuse(model, torch.randn(2, 3, 8, 8))
    assert result.report.verification.passed
    assert norm_names(result.model) == set()


class Drifting(nn.Module):
    """Its output changes from call to call (state kept between calls): cannot be verified."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x)) * self.calls


def test_nondeterministic_model_gets_a_clear_message() -> None:
    with pytest.raises(convfuse.VerificationError, match="different outputs on two runs"):
        convfuse.fuse(randomize_bn(Drifting()).eval(), torch.randn(2, 3, 8, 8))


def test_fused_model_that_raises_fails_verification(monkeypatch) -> None:
    model = _model()
    reference = verify.record_reference(model, torch.randn(2, 3, 8, 8))

    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", broken)
    result = verify.compare(model, reference)
    assert result.passed is False
    assert "boom" in result.message


class Quantising(nn.Module):
    """A traceable part with a fused pair, then discontinuous code in an untraceable root: the
    integer output flips with any rounding difference, as detections do after NMS."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: the root is not traceable
            features = self.backbone(x)
        codes = (features * 1e6).long()  # discontinuous: rounding-level changes flip codes
        order = codes.flatten(1).sum(1).argsort()
        return codes, self.head(features[order])


def test_discontinuous_outputs_are_verified_at_the_traced_parts_on_their_inputs(monkeypatch) -> None:
    model = randomize_bn(Quantising()).eval()
    x = torch.randn(4, 3, 8, 8)
    result = convfuse.fuse(model, x)
    v = result.report.verification
    assert v.passed
    assert "on their recorded inputs" in v.rule
    assert "not continuous" in v.message
    assert norm_names(result.model) == set()
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _off_by(1e-4))
    with pytest.raises(convfuse.VerificationError, match="backbone|head"):
        convfuse.fuse(model, x)


# -- the float64 proof, the rounding check, and what was compared ---------------------------


def _scaled_by(relative: float, what: str):
    """A folding function whose float64 result is wrong by ``relative`` of the layer's own
    magnitude: the weight scaled by (1 + relative), or the bias shifted by relative x max|bias|."""

    def wrong(*args, **kwargs):
        weight, bias = fuse_conv_bn_weights(*args, **kwargs)
        if what == "weight":
            return weight * (1 + relative), bias
        return weight, bias + relative * bias.abs().max()

    return wrong


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("what", ["weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_mis_fold_of_one_millionth_in_the_arithmetic_fails_in_every_dtype(monkeypatch, dtype, what) -> None:
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _scaled_by(1e-6, what))
    with pytest.raises(convfuse.VerificationError, match="the fold is wrong") as raised:
        convfuse.fuse(_model(dtype), torch.randn(2, 3, 16, 16).to(dtype))
    v = raised.value.report.verification
    assert v.proof.passed is False and v.proof.error > v.proof.allowed
    assert v.rtol == v.proof.allowed and v.worst_output == v.proof.worst_output  # one number per verdict


@pytest.mark.parametrize("what", ["weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_unit_of_rounding_wrong_at_the_write_step_fails_in_every_dtype(monkeypatch, dtype, what) -> None:
    """An error at the write step that survives rounding (here: every element one unit of
    rounding off, the smallest such error of the whole tensor; one element alone may sit in a
    channel that a ReLU zeroes for every input) shows in the float64 proof: the remainders come
    from the computed fold, not from what was written."""
    write = fuse_module._write

    def wrong_write(producer, weight, bias):
        write(producer, weight, bias)
        tensor = producer.weight if what == "weight" else producer.bias
        with torch.no_grad():
            tensor.copy_(torch.nextafter(tensor, tensor + torch.sign(tensor)))

    monkeypatch.setattr(fuse_module, "_write", wrong_write)
    with pytest.raises(convfuse.VerificationError, match="the fold is wrong") as raised:
        convfuse.fuse(_model(dtype), torch.randn(2, 3, 16, 16).to(dtype))
    assert raised.value.report.verification.proof.passed is False


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_a_correct_fold_passes_the_proof_well_inside_its_bound(dtype) -> None:
    result = convfuse.fuse(_model(dtype), torch.randn(2, 3, 16, 16).to(dtype))
    v = result.report.verification
    assert v.proof.passed is True and v.rounding.passed is True
    assert v.proof.allowed <= 1e-9
    assert v.proof.error < v.proof.allowed / 4
    assert v.rule == f"float64 proof + {verify.ROUNDING_FACTOR:g}x the original's rounding error"
    assert v.rounding.error <= verify.ROUNDING_FACTOR * v.rounding.original_error + verify.tolerance_for(dtype).floor


class Chaotic(nn.Module):
    """conv-BN-sin(8x) six times: float32 rounding error grows to ~2e-3 of the output's scale."""

    def __init__(self, depth: int = 6, channels: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels if i else 3, channels, 3, padding=1) for i in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(depth))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.sin(8.0 * bn(conv(x)))
        return x


def _chaotic() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Chaotic()).eval()


def test_a_chaotic_model_with_an_exact_fold_passes(monkeypatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    v = convfuse.fuse(_chaotic(), x).report.verification
    assert v.passed is True
    assert v.rounding.original_error > verify.tolerance_for(torch.float32).cap  # the old rule refused this
    assert v.proof.passed is True
    # and it still catches a wrong fold: the proof's bound grows with the model's amplification only
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _scaled_by(1e-6, "bias"))
    with pytest.raises(convfuse.VerificationError, match="the fold is wrong"):
        convfuse.fuse(_chaotic(), x)


class Vanishing(nn.Module):
    """A conv-BN pair whose result never reaches the output: NaN, nothing, or a constant."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.mode = mode

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.mode == "nan":
            return y * float("nan")
        if self.mode == "empty":
            return y[:, :0], y.flatten()[:0]
        return self.bn(self.conv(torch.ones_like(x)))


@pytest.mark.parametrize(
    ("mode", "why"),
    [("nan", "empty or non-finite"), ("empty", "empty or non-finite"), ("constant", "same for every batch")],
)
def test_outputs_that_are_no_evidence_never_pass(mode, why) -> None:
    model = randomize_bn(Vanishing(mode)).eval()
    with pytest.raises(convfuse.VerificationError, match=f"nothing to compare: .*{why}.*--input-shape") as raised:
        convfuse.fuse(model, torch.randn(2, 3, 8, 8))
    v = raised.value.report.verification
    assert v.passed is False
    if mode != "constant":
        assert not any(v.compared.values())


def test_a_nan_float16_model_is_not_verified() -> None:
    model = randomize_bn(Vanishing("nan")).eval().half()
    with pytest.raises(convfuse.VerificationError, match="nothing to compare"):
        convfuse.fuse(model, torch.randn(2, 3, 8, 8).half())


class NoDetections(nn.Module):
    """Untraceable root over a traced backbone; its "detections" above a threshold are none."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: the root is not traceable
            features = self.backbone(x)
        scores = features.flatten(1)
        return scores[scores > 1e9]


def test_empty_final_outputs_fall_back_to_the_traced_parts(monkeypatch) -> None:
    model = randomize_bn(NoDetections()).eval()
    x = torch.randn(2, 3, 8, 8)
    v = convfuse.fuse(model, x).report.verification
    assert v.passed is True
    assert v.probed == ["backbone"]
    assert v.compared["output"] == 0 and v.compared["backbone()"] == 3 * 2 * 8 * 8 * 8
    assert "no evidence" in v.message
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _scaled_by(1e-6, "weight"))
    with pytest.raises(convfuse.VerificationError, match="backbone"):
        convfuse.fuse(model, x)


def test_the_report_says_what_was_compared() -> None:
    result = convfuse.fuse(_model(), convfuse.InputSpec(shapes=((2, 3, 12, 12),)))
    data = result.report.to_dict()["verification"]
    assert {"passed", "max_abs_error", "max_rel_error", "atol", "rtol"} <= data.keys()  # DESIGN.md keys
    assert data["inputs"] == [[2, 3, 12, 12]] and data["inputs_inferred"] is False
    assert data["compared"] == {"output": 3 * 2 * 8 * 6 * 6}  # 3 batches of (2, 8, 6, 6)
    assert data["probed"] == []
    assert data["proof"]["passed"] is True and data["proof"]["batches"] == verify.PROOF_BATCHES
    assert data["rounding"]["passed"] is True and data["rounding"]["batches"] == 3
    assert data["rounding"]["original_error"] > 0
    inferred = convfuse.fuse(randomize_bn(nn.Sequential(nn.Linear(7, 4), nn.BatchNorm1d(4))).eval())
    assert inferred.report.to_dict()["verification"]["inputs_inferred"] is True


def test_without_remainders_the_fallback_rule_applies_and_says_so() -> None:
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    reference = verify.record_reference(model, x)
    result = verify.compare(model, reference)  # no remainders: e.g. TorchScript, ExportedProgram
    assert result.passed is True
    assert result.proof.passed is None and "remainders" in result.proof.note
    assert "no float64 proof" in result.rule


class _Part(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class ThresholdAfterPart(nn.Module):
    """A traced part (conv+bn), then unchanged code that thresholds its output, as a detector's
    proposal selection does: a rounding-level change of one value flips a 0/1 output. The root's
    data-dependent branch keeps it from being traced whole, so the part is traced (and probed) alone."""

    def __init__(self) -> None:
        super().__init__()
        self.part = _Part()
        self.threshold = 0.0

    def forward(self, x):
        y = self.part(x)
        if x.sum() > -1e9:  # data-dependent: the root is not traceable
            return (y > self.threshold).to(y.dtype)
        return y


def _threshold_model_and_input():
    """The model with its threshold set between the original's and the fused model's float32 value
    of one element (the original agreeing with float64 there): only rounding separates them."""
    torch.manual_seed(3)
    model = randomize_bn(ThresholdAfterPart(), 3).eval()
    x = torch.randn(1, 3, 8, 8)
    fused = convfuse.fuse(model, x, verify=False).model
    with torch.no_grad():
        original, refolded = model.part(x), fused.part(x)
        exact = model.double().part(x.double())
        model.float()
    for o, f, e in zip(original.flatten().tolist(), refolded.flatten().tolist(), exact.flatten().tolist()):
        if f != o and (f - e) * (o - e) >= 0 and abs(f - e) > abs(o - e):  # the fused value is further out
            model.threshold = (f + (o if abs(o - e) > 0 else e)) / 2
            return model, x
    pytest.skip("no element where rounding separates the fused value from the original")


def test_an_exact_fold_whose_final_outputs_amplify_rounding_is_judged_on_the_part() -> None:
    """The float64 proof passes on the final outputs, the dtype check fails there only because
    unchanged code after the part flips on rounding: the part, which holds every fused pair, is
    compared instead on the inputs it saw (detection models' case, fasterrcnn_resnet50_fpn)."""
    model, x = _threshold_model_and_input()
    with torch.no_grad():
        flipped = (convfuse.fuse(model, x, verify=False).model(x) != model(x)).sum().item()
    assert flipped >= 1  # the final outputs really differ in the dtype
    result = convfuse.fuse(model, x)
    v = result.report.verification
    assert v.passed and v.probed == ["part"] and v.proof.passed
    assert "amplify the dtype's rounding" in v.message


def test_a_wrong_fold_behind_such_outputs_still_fails(monkeypatch) -> None:
    """The part is judged instead only where the float64 proof passed on the final outputs: a fold
    wrong enough to change them fails (one too small to change a 0/1 output on any input tried is
    invisible there, as it is to any comparison of final outputs)."""
    model, x = _threshold_model_and_input()
    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", _off_by(0.3))
    with torch.no_grad():
        assert (convfuse.fuse(model, x, verify=False).model(x) != model(x)).sum().item() > 1
    with pytest.raises(convfuse.VerificationError, match="the fold is wrong"):
        convfuse.fuse(model, x)
