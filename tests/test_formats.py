"""ExportedProgram (.pt2) and TorchScript models: fused in their own format, verified, saved, and
reloaded with torch's own loaders; the report has the same shape as for a pickled model."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import convfuse
from convfuse.cli import app
from convfuse.fold.reasons import Reason
from convfuse.graphs.aten import to_exported
from tests.conftest import randomize_bn

ALLOW = ["tests"]  # the test models' package

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::DeprecationWarning")

SMALL_INPUT = (1, 3, 16, 16)
RESNET_INPUT = (1, 3, 64, 64)


class FormatNet(nn.Module):
    """Reflect padding, a grouped ConvTranspose2d and circular padding, each followed by a BN;
    the first two convs have no bias, so folding must add one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False)
        self.bn_up = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 3, padding=1, padding_mode="circular")
        self.bn_head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_up(self.up(x)))
        return self.bn_head(self.head(x))


class SharedConvNet(nn.Module):
    """One conv called twice, each call followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def small_model(seed: int = 0) -> nn.Module:
    return randomize_bn(FormatNet(), seed).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return randomize_bn(torchvision.models.resnet18(weights=None), 1).eval()


@pytest.fixture(scope="module")
def pickle_report_shape() -> dict:
    """The report of the pickled-model path, as the reference shape."""
    return report_shape(convfuse.fuse(small_model(), torch.randn(SMALL_INPUT)).report.to_dict())


def report_shape(data: dict) -> dict:
    """Keys of the report and of its nested records (timings vary by format and are left out)."""
    return {
        "top": set(data),
        "verification": set(data["verification"]),
        "fused": {frozenset(pair) for pair in data["fused"]},
        "norm_layers": set(data["norm_layers"]),
        "parameters": set(data["parameters"]),
    }


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def exported_norms(program: torch.export.ExportedProgram) -> list[str]:
    return [n.name for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


def scripted_norms(module: torch.jit.ScriptModule) -> int:
    return str(module.inlined_graph).count("aten::batch_norm")


def model_for(name: str, resnet: nn.Module) -> tuple[nn.Module, tuple[int, ...]]:
    return (resnet, RESNET_INPUT) if name == "resnet18" else (small_model(), SMALL_INPUT)


# -- ExportedProgram --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "decomposed"), [("resnet18", False), ("formatnet", False), ("formatnet", True)]
)
def test_exported_round_trip(tmp_path, resnet, pickle_report_shape, name, decomposed):
    model, shape = model_for(name, resnet)
    x = torch.randn(shape)
    program = torch.export.export(model, (x,))
    if decomposed:  # the inference IR: aten.convolution and _native_batch_norm_legit_no_training
        program = program.run_decompositions()
    source, target = tmp_path / "model.pt2", tmp_path / "fused.pt2"
    torch.export.save(program, source)
    norms = len(exported_norms(program))

    loaded = convfuse.load(source, allow=ALLOW)
    result = convfuse.fuse(loaded)
    convfuse.save(result.model, target)
    fused = torch.export.load(target)

    report = result.report
    assert len(report.fused) == norms and report.skipped == []
    assert report.verification.passed is True
    assert (report.norm_layers.before, report.norm_layers.after) == (norms, 0)
    assert exported_norms(fused) == []
    norm_modules = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert not any(key.rpartition(".")[0] in norm_modules for key in fused.state_dict)
    assert report_shape(report.to_dict()) == pickle_report_shape
    y = torch.randn(shape)
    with torch.no_grad():
        assert_same(fused.module()(y), model(y))
    assert exported_norms(loaded) != []  # the input program is untouched


def test_exported_names_kinds_and_new_bias(tmp_path):
    model = small_model()
    program = torch.export.export(model, (torch.randn(SMALL_INPUT),))

    result = convfuse.fuse(program)

    pairs = {(p.producer, p.norm, p.kind) for p in result.report.fused}
    assert pairs == {
        ("conv", "bn", "Conv2d+BatchNorm2d"),
        ("up", "bn_up", "ConvTranspose2d+BatchNorm2d"),
        ("head", "bn_head", "Conv2d+BatchNorm2d"),
    }
    signature = result.model.graph_signature
    assert {"conv.bias", "up.bias"} <= set(signature.parameters)
    assert not any(t.startswith("bn") for t in (*signature.parameters, *signature.buffers))
    assert result.model.state_dict["conv.bias"].dtype == torch.float32
    parameters = sum(p.numel() for p in model.parameters())
    added, removed = 8 + 6, 2 * (8 + 6 + 4)
    counted = result.report.parameters
    assert (counted.before, counted.after) == (parameters, parameters + added - removed)
    pads = [n for n in result.model.graph.nodes if n.target == torch.ops.aten.pad.default]
    assert any("reflect" in n.args for n in pads)  # reflect padding kept, as its own op


def test_exported_shared_conv_is_skipped():
    model = randomize_bn(SharedConvNet(), 2).eval()
    program = torch.export.export(model, (torch.randn(SMALL_INPUT),))

    result = convfuse.fuse(program)

    assert result.report.fused == []
    assert {(s.norm, s.producer, s.reason) for s in result.report.skipped} == {
        ("bn1", "conv", Reason.CALLED_TWICE),
        ("bn2", "conv", Reason.CALLED_TWICE),
    }
    assert result.report.norm_layers.after == 2


# -- TorchScript ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "how"), [("resnet18", "script"), ("formatnet", "script"), ("formatnet", "trace")]
)
def test_torchscript_round_trip(tmp_path, resnet, pickle_report_shape, name, how):
    model, shape = model_for(name, resnet)
    x = torch.randn(shape)
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, (x,))
    source, target = tmp_path / "model.ts", tmp_path / "fused.ts"
    torch.jit.save(scripted, source)
    norms = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    loaded = convfuse.load(source, trust=True)  # TorchScript is code: only with trust
    result = convfuse.fuse(loaded, x)
    convfuse.save(result.model, target, format="torchscript")
    fused = torch.jit.load(target)

    report = result.report
    assert len(report.fused) == norms and report.skipped == []
    assert report.verification.passed is True
    assert (report.norm_layers.before, report.norm_layers.after) == (norms, 0)
    assert scripted_norms(fused) == 0
    assert report_shape(report.to_dict()) == pickle_report_shape
    y = torch.randn(shape)
    with torch.no_grad():
        assert_same(fused(y), model(y))
    assert scripted_norms(loaded) > 0  # the input module is untouched


def test_torchscript_folds_a_shared_conv_per_call():
    # PyTorch's module-level pass (torch._C._jit_pass_fold_convbn) gets this model wrong.
    model = randomize_bn(SharedConvNet(), 3).eval()
    x = torch.randn(SMALL_INPUT)

    result = convfuse.fuse(torch.jit.script(model), x)

    assert [(p.producer, p.norm) for p in result.report.fused] == [("conv", "bn1"), ("conv", "bn2")]
    assert scripted_norms(result.model) == 0
    with torch.no_grad():
        assert_same(result.model(x), model(x))


# -- the command line -------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None, "CONVFUSE_ALLOW": "tests"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"the CLI raised {result.exception!r}") from result.exception
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convfuse: error: ") and "Traceback" not in result.output
    return lines[0]


def test_cli_exported_to_exported(tmp_path):
    model = small_model(4)
    source, target, report = tmp_path / "m.pt2", tmp_path / "f.pt2", tmp_path / "r.json"
    torch.export.save(torch.export.export(model, (torch.randn(SMALL_INPUT),)), source)

    result = invoke(source, "-o", target, "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert len(data["fused"]) == 3 and data["norm_layers"] == {"before": 3, "after": 0}
    fused = torch.export.load(target)
    assert exported_norms(fused) == []
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        assert_same(fused.module()(x), model(x))


def test_cli_pickle_to_exported(tmp_path):
    model = small_model(5)
    source, target = tmp_path / "m.pt", tmp_path / "f.pt2"
    torch.save(model, source)

    result = invoke(source, "-o", target, "--input-shape", ",".join(map(str, SMALL_INPUT)))

    assert result.exit_code == 0, result.output
    assert convfuse.files.detect_format(target) == "exported"
    fused = torch.export.load(target)
    assert exported_norms(fused) == []
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        assert_same(fused.module()(x), model(x))


@pytest.mark.parametrize("source_format", ["pickle", "torchscript"])
def test_cli_to_torchscript(tmp_path, source_format):
    model = small_model(6)
    source, target = tmp_path / "m.pt", tmp_path / "f.ts"
    if source_format == "pickle":
        torch.save(model, source)
    else:
        torch.jit.save(torch.jit.script(model), source)

    trust = ["--trust"] if source_format == "torchscript" else []
    result = invoke(source, "-o", target, "--format", "torchscript", "--input-shape", "1,3,16,16", *trust)

    assert result.exit_code == 0, result.output
    fused = torch.jit.load(target)
    assert scripted_norms(fused) == 0
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        assert_same(fused(x), model(x))


@pytest.fixture
def program_file(tmp_path) -> Path:
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(small_model(), (torch.randn(SMALL_INPUT),)), path)
    return path


def rewrite_archive(source: Path, target: Path, edit) -> None:
    """Copy a zip archive, passing each member's bytes through ``edit(name, data)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, edit(info.filename, old.read(info.filename)))


def test_cli_truncated_pt2(tmp_path, program_file):
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(program_file.read_bytes()[: program_file.stat().st_size // 2])

    line = one_error_line(invoke(damaged, "-o", tmp_path / "f.pt2"))

    assert str(damaged) in line and "damaged" in line
    assert not (tmp_path / "f.pt2").exists()


def test_cli_pt2_with_a_broken_program(tmp_path, program_file):
    damaged = tmp_path / "broken.pt2"
    def truncate_program(name: str, data: bytes) -> bytes:
        return data[:50] if name.endswith("models/model.json") else data

    rewrite_archive(program_file, damaged, truncate_program)

    line = one_error_line(invoke(damaged, "-o", tmp_path / "f.pt2"))

    assert "ExportedProgram cannot be loaded" in line


def test_cli_pt2_with_pickled_weights_is_refused(tmp_path, program_file):
    def pickled(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            for payload in config["config"].values():
                payload["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    unsafe = tmp_path / "unsafe.pt2"
    rewrite_archive(program_file, unsafe, pickled)

    line = one_error_line(invoke(unsafe, "-o", tmp_path / "f.pt2"))

    assert "refused to load" in line and "--trust" in line


def test_cli_exported_cannot_be_pickled(tmp_path, program_file):
    line = one_error_line(invoke(program_file, "-o", tmp_path / "f.pt", "--format", "pickle"))

    assert "--format exported" in line
    assert not (tmp_path / "f.pt").exists()


def test_cli_truncated_torchscript(tmp_path):
    source = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(small_model()), source)
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(source.read_bytes()[:-200])

    line = one_error_line(invoke(damaged, "-o", tmp_path / "f.ts"))

    assert str(damaged) in line


def test_cli_torchscript_cannot_be_exported(tmp_path):
    source = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(small_model()), source)

    line = one_error_line(invoke(source, "-o", tmp_path / "f.pt2", "--trust"))

    assert "--format torchscript" in line
    assert not (tmp_path / "f.pt2").exists()


def test_to_exported_needs_inputs():
    with pytest.raises(convfuse.SaveError, match="--input-shape"):
        to_exported(small_model(), None)


def test_load_exported_checks_sample_inputs(tmp_path, program_file):
    """A sample-inputs pickle that torch's weights-only loader rejects would be unpickled freely."""

    class Payload:
        def __reduce__(self):
            return (print, ("ran code from the file",))

    def evil(name: str, data: bytes) -> bytes:
        if "sample_inputs" in name:
            buffer = io.BytesIO()
            torch.save(Payload(), buffer)
            return buffer.getvalue()
        return data

    unsafe = tmp_path / "unsafe.pt2"
    rewrite_archive(program_file, unsafe, evil)

    with pytest.raises(convfuse.UnsafeFileError, match="weights-only"):
        convfuse.load(unsafe, allow=ALLOW)


@pytest.mark.parametrize("shape", [(2, 3, 8), (3, 8)], ids=["batched", "unbatched"])
def test_sequential_conv1d_in_graph_formats(shape) -> None:
    """nn.Sequential names its input ``input`` (a builtin, renamed by graph copies); an unbatched
    Conv1d output puts BatchNorm1d on the wrong axis and must be skipped, not folded."""
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8))).eval()
    x = torch.randn(*shape)
    programs = {
        "exported": torch.export.export(model, (x,)),
        "torchscript": torch.jit.script(model),
    }
    for name, program in programs.items():
        result = convfuse.fuse(program, x)
        assert result.report.verification.passed, name
        if len(shape) == 3:
            assert len(result.report.fused) == 1, name
        else:
            assert result.report.fused == [], name
            assert [s.reason for s in result.report.skipped] == [convfuse.Reason.NOT_CHANNELS], name
        runner = result.model.module() if name == "exported" else result.model
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)
