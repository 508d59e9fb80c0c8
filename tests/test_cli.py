"""The ``convfuse`` command: every exit code of DESIGN.md, its messages, the JSON report, and that
nothing is written (and the input never changes) when a run fails."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import convfuse
from convfuse.cli import app
from convfuse.fold.table import is_norm
from tests.conftest import randomize_bn
from tests.models import NoNormNet, NormAfterActNet, ReflectNet, TinyNet, TwoInputNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
SHAPE = "1,3,16,16"
ANSI = "\x1b["
DESIGN_KEYS = {"fused", "skipped", "untraced", "verification", "norm_layers", "parameters"}
VERIFICATION_KEYS = {"passed", "max_abs_error", "max_rel_error", "atol", "rtol"}
ALLOW = ["tests"]  # the test models' package (CONVFUSE_ALLOW in invoke)

runner = CliRunner()


def invoke(*args: object, env: dict[str, str | None] | None = None):
    """Run the command in-process; an exception that escaped the CLI fails the test."""
    result = runner.invoke(app, [str(a) for a in args], env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None, "CONVFUSE_ALLOW": "tests", **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"the CLI raised {result.exception!r}") from result.exception
    return result


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def save_model(tmp_path: Path, model: nn.Module, name: str = "model.pt", *, seed: int = 0) -> Path:
    randomize_bn(model, seed)
    path = tmp_path / name
    torch.save(model, path)
    return path


def tiny_file(tmp_path: Path, name: str = "model.pt") -> Path:
    return save_model(tmp_path, TinyNet().eval(), name)


def norm_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_norm(m))


def stdout_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


PROGRESS = re.compile(r"convfuse: \w+ done \(\d+\.\d\ds\)")
"""A progress line: one per finished step on stdout where it is not a terminal (not with -q)."""


def progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if PROGRESS.fullmatch(line)]


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_same_outputs(original: nn.Module, fused: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(fused(*inputs), original(*inputs))


def assert_one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("convfuse: ")
    return lines[0]


# -- exit 0 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "shapes"),
    [(TinyNet, [SHAPE]), (ReflectNet, [SHAPE]), (TwoInputNet, [SHAPE, "1,2,16,16"])],
)
def test_success_writes_a_model_that_loads_and_computes_the_same(tmp_path, cls, shapes):
    original = randomize_bn(cls(), 1).eval()
    source = save_model(tmp_path, original, seed=1)
    source_bytes = source.read_bytes()
    target = tmp_path / "out" / "fused.pt"
    shape_args = [arg for shape in shapes for arg in ("--input-shape", shape)]

    result = invoke(source, "-o", target, *shape_args)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert source.read_bytes() == source_bytes
    assert sorted(p.name for p in target.parent.iterdir()) == ["fused.pt"]
    inputs = [torch.randn(*map(int, shape.split(","))) for shape in shapes]
    for fused in (convfuse.load(target, allow=ALLOW), torch.load(target, weights_only=False)):
        assert type(fused) is cls
        assert not fused.training
        assert norm_count(fused) == 0
        assert conv_settings(fused) == conv_settings(original)
        assert_same_outputs(original, fused, *inputs)


def conv_settings(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (type(m), m.padding_mode, m.padding, m.stride, m.dilation, m.groups, m.weight.dtype)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }


def test_nothing_to_fuse_is_success(tmp_path):
    original = NoNormNet().eval()
    source = save_model(tmp_path, original)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["fused"] == [] and data["norm_layers"] == {"before": 0, "after": 0}
    assert data["verification"]["passed"] is True
    fused = convfuse.load(target, allow=ALLOW)
    assert type(fused) is NoNormNet
    assert_same_outputs(original, fused, torch.randn(1, 3, 16, 16))


def test_state_dict_with_factory_arch_is_written_back_in_its_container(tmp_path):
    original = randomize_bn(TinyNet(), 2).eval()
    source = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}, "epoch": 7}, source)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--arch", "tests.models:build_tiny", "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 0, result.output
    written = torch.load(target, weights_only=True)
    assert written["epoch"] == 7
    assert all(key.startswith("module.") for key in written["state_dict"])
    assert json.loads(report.read_text())["checkpoint"] == {
        "key": "state_dict", "stored": "state_dict", "prefix": "module.", "kept": ["epoch"]
    }
    fused = convfuse.apply_fused_structure(TinyNet().eval(), report)
    fused.load_state_dict({k.removeprefix("module."): v for k, v in written["state_dict"].items()})
    assert norm_count(fused) == 0
    assert_same_outputs(original, fused, torch.randn(1, 3, 16, 16))


def test_state_dict_with_torchvision_arch(tmp_path):
    original = randomize_bn(torchvision.models.resnet18(weights=None), 3).eval()
    source = tmp_path / "resnet18.pt"
    torch.save(original.state_dict(), source)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--arch", "resnet18", "--input-shape", "1,3,64,64", "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["norm_layers"] == {"before": norm_count(original), "after": 0}
    assert len(data["fused"]) == norm_count(original)
    fused = convfuse.load(target, allow=ALLOW)
    assert type(fused) is torchvision.models.ResNet and norm_count(fused) == 0
    assert_same_outputs(original, fused, torch.randn(1, 3, 64, 64))


def test_training_mode_with_eval_is_fused_in_eval_mode(tmp_path):
    original = randomize_bn(TinyNet(), 4).train()
    source = save_model(tmp_path, original, seed=4)
    target = tmp_path / "fused.pt"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--eval")

    assert result.exit_code == 0, result.output
    fused = convfuse.load(target, allow=ALLOW)
    assert not fused.training and norm_count(fused) == 0
    assert_same_outputs(original.eval(), fused, torch.randn(1, 3, 16, 16))


def test_overwrite_input_replaces_the_input(tmp_path):
    original = randomize_bn(TinyNet(), 5).eval()
    source = save_model(tmp_path, original, seed=5)

    result = invoke(source, "-o", source, "--input-shape", SHAPE, "--overwrite-input")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    fused = convfuse.load(source, allow=ALLOW)
    assert norm_count(fused) == 0
    assert_same_outputs(original, fused, torch.randn(1, 3, 16, 16))


def test_strict_passes_when_everything_is_fused(tmp_path):
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"
    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--strict")
    assert result.exit_code == 0, result.output
    assert target.exists()


def test_torchscript_output(tmp_path):
    # ReflectNet is scripted nowhere else, so its code path is not mangled by an earlier test
    # (test_torchscript_input_gives_a_torchscript_output covers the mangled case).
    original = randomize_bn(ReflectNet(), 6).eval()
    source = save_model(tmp_path, original, seed=6)
    target = tmp_path / "fused.ts"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--format", "torchscript")

    assert result.exit_code == 0, result.output
    assert convfuse.files.detect_format(target) == "torchscript"
    fused = convfuse.load(target, trust=True)
    assert isinstance(fused, torch.jit.ScriptModule)
    assert_same_outputs(original, fused, torch.randn(1, 3, 16, 16))


def test_pt2_output_is_an_exported_program(tmp_path):
    original = randomize_bn(TinyNet(), 9).eval()
    source = save_model(tmp_path, original, seed=9)
    target = tmp_path / "fused.pt2"

    result = invoke(source, "-o", target, "--input-shape", SHAPE)

    assert result.exit_code == 0, result.output
    assert convfuse.files.detect_format(target) == "exported"
    fused = convfuse.load(target, allow=ALLOW)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert_same_outputs(original, fused.module(), torch.randn(1, 3, 16, 16))


def test_torchscript_input_gives_a_torchscript_output(tmp_path):
    original = randomize_bn(TwoInputNet(), 10).eval()
    source = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(original), source)
    target = tmp_path / "fused.pt"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--input-shape", "1,2,16,16", "--trust")

    assert result.exit_code == 0, result.output
    assert convfuse.files.detect_format(target) == "torchscript"
    fused = convfuse.load(target, trust=True)
    assert isinstance(fused, torch.jit.ScriptModule)
    assert_same_outputs(original, fused, torch.randn(1, 3, 16, 16), torch.randn(1, 2, 16, 16))


def test_arch_without_input_is_a_demo(tmp_path):
    result = invoke("--arch", "tests.models:build_tiny", "--dry-run", "--input-shape", SHAPE)
    assert result.exit_code == 0, result.output
    assert "nothing written" in stdout_lines(result)[-1]
    assert list(tmp_path.iterdir()) == []


# -- the report and the summary ---------------------------------------------------------


def check_report_shape(data: dict) -> None:
    assert DESIGN_KEYS <= set(data)
    assert set(data) - DESIGN_KEYS <= {"timings", "reparam", "structure", "checkpoint", "strict", "written"}
    for pair in data["fused"]:
        assert set(pair) == {"producer", "norm", "kind"}
        assert all(isinstance(v, str) for v in pair.values())
    for skipped in data["skipped"]:
        assert {"norm", "producer", "reason"} <= set(skipped) <= {"norm", "producer", "reason", "detail"}
        assert isinstance(skipped["norm"], str) and isinstance(skipped["reason"], str) and skipped["reason"]
        assert skipped["producer"] is None or isinstance(skipped["producer"], str)
    for untraced in data["untraced"]:
        assert set(untraced) == {"module", "reason"}
    assert VERIFICATION_KEYS <= set(data["verification"])
    assert data["verification"]["passed"] in (True, False, None)
    for key in VERIFICATION_KEYS - {"passed"}:
        assert isinstance(data["verification"][key], (int, float))
    for key in ("norm_layers", "parameters"):
        assert set(data[key]) == {"before", "after"}
        assert all(isinstance(v, int) for v in data[key].values())


def test_report_has_the_design_keys(tmp_path):
    original = NormAfterActNet().eval()
    source = save_model(tmp_path, original)
    report = tmp_path / "reports" / "report.json"

    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    check_report_shape(data)
    assert data["fused"] == [{"producer": "conv1", "norm": "bn1", "kind": "Conv2d+BatchNorm2d"}]
    assert [s["norm"] for s in data["skipped"]] == ["bn2"]
    assert data["norm_layers"] == {"before": norm_count(original), "after": 1}
    parameters = sum(p.numel() for p in original.parameters())
    assert data["parameters"]["before"] == parameters
    assert data["parameters"]["after"] == parameters - 2 * original.bn1.num_features
    verification = data["verification"]
    assert verification["passed"] is True
    assert verification["max_rel_error"] <= verification["rtol"]


def test_last_stdout_line_is_the_summary(tmp_path):
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    last = stdout_lines(result)[-1]
    assert last.startswith("convfuse: ")
    assert f"fused {len(data['fused'])} of {data['norm_layers']['before']}" in last
    assert "verified" in last
    assert last.endswith(f"wrote {target}")
    assert len(stdout_lines(result)) > 1  # the table came before it


def test_quiet_prints_only_the_summary(tmp_path):
    source = tiny_file(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "-q")
    assert result.exit_code == 0, result.output
    lines = stdout_lines(result)
    assert len(lines) == 1 and lines[0].startswith("convfuse: fused ")


def test_dry_run_writes_no_model(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--dry-run", "--report", report)

    assert result.exit_code == 0, result.output
    assert not target.exists()
    assert set(snapshot(tmp_path)) - set(before) == {"report.json"}
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True
    assert len(data["fused"]) == 2
    assert "nothing written" in stdout_lines(result)[-1]


def test_dry_run_needs_no_output(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(source, "--input-shape", SHAPE, "--dry-run")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before


def test_no_verify_reports_verification_skipped(tmp_path):
    original = randomize_bn(TinyNet(), 7).eval()
    source = save_model(tmp_path, original, seed=7)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--no-verify", "--report", report)

    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    check_report_shape(data)
    assert data["verification"]["passed"] is None
    assert "not verified" in stdout_lines(result)[-1]
    assert_same_outputs(original, convfuse.load(target, allow=ALLOW), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize(
    "env",
    [
        {"NO_COLOR": "1"},
        {"NO_COLOR": None, "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TERM": "xterm-256color",
         "COLORTERM": "truecolor"},
    ],
    ids=["NO_COLOR", "not-a-terminal"],
)
@pytest.mark.parametrize("outcome", ["success", "check-failed", "usage-error"])
def test_no_ansi_codes_without_a_terminal(tmp_path, env, outcome):
    if outcome == "check-failed":
        source = save_model(tmp_path, NormAfterActNet().eval())
        extra = ["--strict"]
    else:
        source = tiny_file(tmp_path)
        extra = ["--input-shape", "0,3"] if outcome == "usage-error" else []
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, *extra, env=env)
    assert result.exit_code == {"success": 0, "check-failed": 1, "usage-error": 2}[outcome], result.output
    assert result.output.strip()
    assert ANSI not in result.stdout
    assert ANSI not in result.stderr


def test_progress_is_one_line_per_step_before_the_tables_and_quiet_silences_it(tmp_path):
    source = tiny_file(tmp_path)
    report = tmp_path / "report.json"

    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 0, result.output
    steps = [line.split()[1] for line in progress_lines(result.stdout)]
    assert steps == list(json.loads(report.read_text())["timings"])  # each step once, in order, as it ended
    assert steps[0] == "load" and steps[-1] == "save"
    lines = stdout_lines(result)
    assert lines[: len(steps)] == progress_lines(result.stdout)  # then the tables, then the summary
    assert lines[-1].startswith("convfuse: fused ")
    assert result.stderr == ""
    quiet = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "-q")
    assert quiet.exit_code == 0 and progress_lines(quiet.stdout) == []


def test_a_failing_step_prints_no_progress_line(tmp_path):
    result = invoke(tmp_path / "missing.pt", "-o", tmp_path / "fused.pt")
    assert "no such file" in assert_one_line_error(result)
    assert result.stdout == ""


def test_report_says_whether_strict_passed_and_what_was_written(tmp_path):
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"
    for source, extra, strict, written in [
        (tiny_file(tmp_path), ["--strict"], {"passed": True, "left": 0}, str(target)),
        (save_model(tmp_path, NormAfterActNet().eval(), "left.pt"), ["--strict"], {"passed": False, "left": 1}, None),
        (tiny_file(tmp_path), [], None, str(target)),
        (tiny_file(tmp_path), ["--dry-run"], None, None),
    ]:
        target.unlink(missing_ok=True)
        result = invoke(source, "-o", target, "--input-shape", SHAPE, "--report", report, *extra)
        data = json.loads(report.read_text())
        assert result.exit_code == (1 if strict and not strict["passed"] else 0), result.output
        assert data["verification"]["passed"] is True
        assert data["strict"] == strict and data["written"] == written
        assert target.exists() == (written is not None)
        assert data["checkpoint"] is None  # the file held the model itself


# -- exit 1: the model failed a check ---------------------------------------------------


@pytest.fixture
def wrong_fold(monkeypatch):
    """Make every Conv+BN fold slightly wrong, as a bug in the math would."""
    arithmetic = importlib.import_module("convfuse.fold.arithmetic")

    real = arithmetic.fuse_conv_bn_weights

    def fold(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        return weight, bias + 1e-3 * (bias.abs().max() + 1)

    monkeypatch.setattr(arithmetic, "fuse_conv_bn_weights", fold)


@pytest.mark.usefixtures("wrong_fold")
@pytest.mark.parametrize("existing_output", [False, True])
def test_verification_failure_exits_1_and_writes_nothing(tmp_path, existing_output):
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"
    if existing_output:
        target.write_bytes(b"the previous fused model")
    before = snapshot(tmp_path)

    result = invoke(source, "-o", target, "--input-shape", SHAPE)

    line = assert_one_line_error(result, 1)
    assert "verification failed" in line.lower()
    assert "nothing written" in stdout_lines(result)[-1]
    assert snapshot(tmp_path) == before


@pytest.mark.usefixtures("wrong_fold")
def test_verification_failure_leaves_the_input_with_overwrite_input(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(source, "-o", source, "--input-shape", SHAPE, "--overwrite-input")
    assert result.exit_code == 1, result.output
    assert snapshot(tmp_path) == before


def test_user_tolerance_decides(tmp_path):
    """A user's tolerance bounds the check in the model's dtype."""
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--atol", "0.5", "--rtol", "0", "--report", report)

    assert result.exit_code == 0, result.output
    verification = json.loads(report.read_text())["verification"]
    assert verification["passed"] is True
    assert verification["atol"] == 0.5 and verification["rtol"] == 0
    assert 0 < verification["max_abs_error"] <= 0.5
    assert target.exists()


@pytest.mark.usefixtures("wrong_fold")
def test_user_tolerance_does_not_excuse_a_wrong_fold(tmp_path):
    """The float64 proof judges the fold itself, whatever tolerance the dtype check is given."""
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"

    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--atol", "0.5", "--rtol", "0")

    assert result.exit_code == 1, result.output
    assert "the fold is wrong" in result.output
    assert not target.exists()


@pytest.mark.usefixtures("wrong_fold")
def test_verification_failure_still_writes_the_report(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    report = tmp_path / "report.json"

    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--report", report)

    assert result.exit_code == 1, result.output
    assert set(snapshot(tmp_path)) - set(before) == {"report.json"}
    data = json.loads(report.read_text())
    check_report_shape(data)
    verification = data["verification"]
    assert verification["passed"] is False
    assert verification["max_rel_error"] > verification["rtol"]
    assert verification["max_abs_error"] > 0


def test_strict_with_a_norm_left_exits_1_and_writes_nothing(tmp_path):
    source = save_model(tmp_path, NormAfterActNet().eval())
    before = snapshot(tmp_path)
    report = tmp_path / "report.json"

    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--strict", "--report", report)

    assert result.exit_code == 1, result.output
    line = assert_one_line_error(result, 1)
    assert "--strict" in line
    assert set(snapshot(tmp_path)) - set(before) == {"report.json"}
    data = json.loads(report.read_text())
    assert [s["norm"] for s in data["skipped"]] == ["bn2"]
    assert data["norm_layers"]["after"] == 1
    assert "nothing written" in stdout_lines(result)[-1]


def test_without_strict_a_norm_left_is_success(tmp_path):
    source = save_model(tmp_path, NormAfterActNet().eval())
    target = tmp_path / "fused.pt"
    result = invoke(source, "-o", target, "--input-shape", SHAPE)
    assert result.exit_code == 0, result.output
    assert norm_count(convfuse.load(target, allow=ALLOW)) == 1


# -- exit 2: the user must fix something ------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsConstructor:
    def __reduce__(self):
        return (TinyNet, ())


def _truncated(path: Path) -> None:
    tiny_file(path.parent, "whole.pt")
    data = (path.parent / "whole.pt").read_bytes()
    (path.parent / "whole.pt").unlink()
    path.write_bytes(data[: len(data) // 2])


def _truncated_safetensors(path: Path) -> None:
    from safetensors.torch import save

    data = save(TinyNet().state_dict())
    path.write_bytes(data[: len(data) - 64])


def _state_dict(path: Path, mutate=None) -> None:
    state = randomize_bn(TinyNet(), 0).state_dict()
    if mutate is not None:
        mutate(state)
    torch.save(state, path)


# name -> (make the input at the given path, extra arguments, what the message must contain)
INPUT_ERRORS = {
    "missing": (lambda p: None, [], "no such file"),
    "directory": (lambda p: p.mkdir(), [], "directory"),
    "garbage": (lambda p: p.write_bytes(b"\x00\x01garbage" * 64), [], "not a PyTorch model"),
    "truncated": (_truncated, [], "truncated"),
    "empty": (lambda p: p.write_bytes(b""), [], "empty"),
    "tensor-only": (lambda p: torch.save(torch.randn(2, 3), p), [], "Tensor"),
    "state-dict-without-arch": (_state_dict, [], "--arch"),
    "state-dict-in-a-checkpoint-without-arch": (lambda p: torch.save({"state_dict": TinyNet().state_dict(), "epoch": 1}, p),
                                                [], "under 'state_dict'"),
    "safetensors-truncated": (_truncated_safetensors, [], "damaged"),
    "unknown-arch": (_state_dict, ["--arch", "resnet81"], "resnet81"),
    "unknown-arch-factory": (_state_dict, ["--arch", "tests.models:nope"], "nope"),
    "state-dict-does-not-fit": (
        lambda p: _state_dict(p, lambda s: s.pop("bn2.running_mean")), ["--arch", "tests.models:build_tiny"],
        "bn2.running_mean",
    ),
    "module-constructor-pickle": (lambda p: torch.save(_CallsConstructor(), p), [], "--trust"),
    "graph-module-pickle": (lambda p: torch.save(torch.fx.symbolic_trace(randomize_bn(TinyNet().eval())), p), [],
                            "--trust"),
    "training-mode": (lambda p: torch.save(randomize_bn(TinyNet()).train(), p), [], "--eval"),
}


@pytest.mark.parametrize("case", list(INPUT_ERRORS))
def test_input_errors_exit_2(tmp_path, case):
    make, extra, message = INPUT_ERRORS[case]
    source = tmp_path / "model.pt"
    make(source)
    before = snapshot(tmp_path)

    result = invoke(source, "-o", tmp_path / "out" / "fused.pt", "--input-shape", SHAPE, *extra)

    line = assert_one_line_error(result)
    assert message in line
    assert snapshot(tmp_path) == before


def test_malicious_pickle_exits_2_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    source = tmp_path / "model.pt"
    torch.save(_System(marker), source)
    before = snapshot(tmp_path)

    result = invoke(source, "-o", tmp_path / "fused.pt")

    line = assert_one_line_error(result)
    assert "--trust" in line and f"{os.system.__module__}.system" in line
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_malicious_pickle_runs_with_trust(tmp_path):
    """The control for the test above: the same file does run its code under --trust."""
    marker = tmp_path / "pwned"
    source = tmp_path / "model.pt"
    torch.save(_System(marker), source)

    result = invoke(source, "-o", tmp_path / "fused.pt", "--trust")

    assert_one_line_error(result)  # os.system returned an int, not a model
    assert marker.exists()
    assert not (tmp_path / "fused.pt").exists()


# name -> (extra arguments, what the message must contain); the input is a valid TinyNet
USAGE_ERRORS = {
    "shape-not-numbers": (["--input-shape", "1,3,a,b"], "--input-shape"),
    "shape-zero": (["--input-shape", "0,3,16,16"], "--input-shape"),
    "shape-negative": (["--input-shape", "1,3,-16,16"], "--input-shape"),
    "shape-empty": (["--input-shape", ""], "--input-shape"),
    "shape-rejected-by-model": (["--input-shape", "1,5,16,16"], "channels"),
    "dtype": (["--input-shape", SHAPE, "--dtype", "float7"], "--dtype"),
    "format": (["--input-shape", SHAPE, "--format", "onnx"], "--format"),
    "negative-atol": (["--input-shape", SHAPE, "--atol", "-1"], "--atol"),
    "device": (["--input-shape", SHAPE, "--device", "bogus"], "--device"),
    "arch-with-whole-model": (["--input-shape", SHAPE, "--arch", "resnet18"], "--arch"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2(tmp_path, case):
    extra, message = USAGE_ERRORS[case]
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)

    result = invoke(source, "-o", tmp_path / "fused.pt", *extra)

    line = assert_one_line_error(result)
    assert message in line
    assert snapshot(tmp_path) == before


def test_device_that_cannot_run_the_model(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--device", "meta")
    assert "--device" in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_device_cpu(tmp_path):
    source = tiny_file(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert norm_count(convfuse.load(tmp_path / "fused.pt", allow=ALLOW)) == 0


def test_two_inputs_without_input_shape_asks_for_it(tmp_path):
    source = save_model(tmp_path, TwoInputNet().eval())
    before = snapshot(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt")
    assert "--input-shape" in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_missing_output_without_dry_run(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(source, "--input-shape", SHAPE)
    line = assert_one_line_error(result)
    assert "-o" in line and "--dry-run" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spelling", ["same", "dotdot", "relative", "symlink"])
def test_output_equal_to_input_needs_overwrite_input(tmp_path, monkeypatch, spelling):
    source = tiny_file(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        (tmp_path / "link.pt").symlink_to(source)
    target = {
        "same": source,
        "dotdot": tmp_path / "sub" / ".." / source.name,
        "relative": Path(source.name),
        "symlink": tmp_path / "link.pt",
    }[spelling]
    before = snapshot(tmp_path)

    result = invoke(source, "-o", target, "--input-shape", SHAPE)

    assert "--overwrite-input" in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_report_path_equal_to_input_is_refused(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE, "--report", source)
    assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_report_path_equal_to_output_is_refused(tmp_path):
    source = tiny_file(tmp_path)
    target = tmp_path / "fused.pt"
    before = snapshot(tmp_path)
    result = invoke(source, "-o", target, "--input-shape", SHAPE, "--report", target)
    assert_one_line_error(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["output", "report"])
def test_output_under_a_regular_file(tmp_path, what):
    source = tiny_file(tmp_path)
    (tmp_path / "afile").write_bytes(b"just a file")
    bad = tmp_path / "afile" / "out.pt"
    args = ["-o", bad] if what == "output" else ["-o", tmp_path / "fused.pt", "--report", bad.with_suffix(".json")]
    before = snapshot(tmp_path)

    result = invoke(source, "--input-shape", SHAPE, *args)

    assert "afile" in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_output_is_a_directory(tmp_path):
    source = tiny_file(tmp_path)
    (tmp_path / "outdir").mkdir()
    before = snapshot(tmp_path)
    result = invoke(source, "-o", tmp_path / "outdir", "--input-shape", SHAPE)
    assert "directory" in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_output_in_a_read_only_folder(tmp_path):
    source = tiny_file(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        result = invoke(source, "-o", folder / "fused.pt", "--input-shape", SHAPE)
        assert "cannot be written" in assert_one_line_error(result)
        assert snapshot(tmp_path) == before
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("fused.onnx", []), ("fused.engine", []), ("fused.tflite", []), ("fused.pt", ["--format", "safetensors"]),
     ("fused.safetensors", ["--format", "pickle"]), ("fused.pt2", ["--format", "torchscript"])],
)
def test_output_names_convfuse_does_not_write(tmp_path, name, extra):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)

    result = invoke(source, "-o", tmp_path / name, "--input-shape", SHAPE, *extra)

    line = assert_one_line_error(result)
    assert name in line
    if not extra:  # names the formats it writes, with their extensions
        assert "pickle (.pt" in line and "safetensors (.safetensors)" in line and "exported (.pt2" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "fmt"), [("fused", "pickle"), ("fused-1.5", "pickle"), ("fused.safetensors", "safetensors"),
                                           ("fused.pth.tar", "pickle")])
def test_output_names_choose_the_format(tmp_path, name, fmt):
    source = tiny_file(tmp_path)
    result = invoke(source, "-o", tmp_path / name, "--input-shape", SHAPE, "-q")
    assert result.exit_code == 0, result.output
    assert convfuse.files.detect_format(tmp_path / name) == fmt


MAIN_SCRIPT = """
import sys, torch
from torch import nn
from convfuse.testing import randomize_bn

class ScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))

torch.save(randomize_bn(ScriptNet()).eval(), sys.argv[1])
"""


@pytest.mark.parametrize("trust", [False, True])
def test_class_defined_in_a_script_gets_a_hint(tmp_path, trust):
    source = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-c", MAIN_SCRIPT, str(source)], env=_subprocess_env(), check=True, timeout=120)

    result = invoke(source, "-o", tmp_path / "fused.pt", *(["--trust"] if trust else []))

    line = assert_one_line_error(result)
    assert "__main__" in line
    if trust:  # torch's own unpickler says only that it cannot find the class: convfuse says why and what to do
        assert "defined in the script that saved it" in line and "move the class into a module" in line


def test_arch_factory_in_the_current_folder_needs_pythonpath(tmp_path):
    (tmp_path / "my_arch_cf.py").write_text("from tests.models import build_tiny as build\n")
    command = [shutil.which("convfuse"), "--arch", "my_arch_cf:build", "--dry-run", "--input-shape", SHAPE, "-q"]
    env = _subprocess_env()  # PYTHONPATH is the repository only: the current folder is not searched

    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "my_arch_cf" in proc.stderr and "PYTHONPATH=." in proc.stderr and "Traceback" not in proc.stderr
    env["PYTHONPATH"] += os.pathsep + "."
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- exit 3: a bug of ours --------------------------------------------------------------


@pytest.fixture
def internal_bug(monkeypatch):
    """Make the library fail with an exception that is not a ConvfuseError, as a bug would."""
    fuse_module = importlib.import_module("convfuse.api")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(fuse_module, "fuse", broken)


@pytest.mark.usefixtures("internal_bug")
def test_internal_error_exits_3_without_traceback(tmp_path):
    source = tiny_file(tmp_path)
    before = snapshot(tmp_path)

    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE)

    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("convfuse: internal error: RuntimeError: simulated bug")
    assert "CONVFUSE_DEBUG" in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.usefixtures("internal_bug")
def test_internal_error_is_one_line(tmp_path):
    source = tiny_file(tmp_path)
    result = invoke(source, "-o", tmp_path / "fused.pt", "--input-shape", SHAPE)
    assert "internal error" in assert_one_line_error(result, 3)


# -- --version, --help ------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert convfuse.__version__ in result.stdout
    assert torch.__version__ in result.stdout


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag):
    result = invoke(flag)
    assert result.exit_code == 0
    for option in ("--output", "--input-shape", "--dtype", "--atol", "--rtol", "--report", "--dry-run", "--strict",
                   "--arch", "--prefix", "--trust", "--format", "--no-verify", "--eval", "--overwrite-input", "--version",
                   "timm:NAME", "safetensors", "state_dict"):
        assert option in result.stdout, option
    assert "Exit codes" in result.stdout
    assert "3 an internal error" in " ".join(result.stdout.split())


# -- the installed command --------------------------------------------------------------


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONVFUSE_DEBUG", "FORCE_COLOR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["NO_COLOR"] = "1"
    env["CONVFUSE_ALLOW"] = "tests"
    return env


def test_installed_script(tmp_path):
    script = shutil.which("convfuse")
    assert script is not None, "the convfuse script is not installed (pip install -e .)"
    original = randomize_bn(TinyNet(), 8).eval()
    source = save_model(tmp_path, original, seed=8)
    target = tmp_path / "fused.pt"
    report = tmp_path / "report.json"

    proc = subprocess.run(
        [script, str(source), "-o", str(target), "--input-shape", SHAPE, "--report", str(report)],
        capture_output=True, text=True, env=_subprocess_env(), cwd=tmp_path, timeout=120,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ANSI not in proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"convfuse: fused {len(data['fused'])} of {data['norm_layers']['before']}")
    assert_same_outputs(original, convfuse.load(target, allow=ALLOW), torch.randn(1, 3, 16, 16))


def test_python_dash_m(tmp_path):
    marker = tmp_path / "pwned"
    source = tmp_path / "model.pt"
    torch.save(_System(marker), source)

    proc = subprocess.run(
        [sys.executable, "-m", "convfuse", str(source), "-o", str(tmp_path / "fused.pt")],
        capture_output=True, text=True, env=_subprocess_env(), cwd=tmp_path, timeout=120,
    )

    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--trust" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


PROJECT_MODEL = '''
import torch
from torch import nn


class ProjectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))
'''


def test_script_imports_model_classes_only_from_where_it_is_told(tmp_path):
    """A model class in the user's folder loads with --allow and PYTHONPATH=., and not without
    either: a .py file lying next to a downloaded model is never imported on the file's say-so."""
    (tmp_path / "project_model_cwd.py").write_text(PROJECT_MODEL)
    saver = (
        "import sys, torch; sys.path.insert(0, '.'); from project_model_cwd import ProjectNet; "
        "from convfuse.testing import randomize_bn; torch.save(randomize_bn(ProjectNet()).eval(), 'model.pt')"
    )
    env = {k: v for k, v in _subprocess_env().items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", saver], cwd=tmp_path, env=env, check=True, timeout=120)
    command = [shutil.which("convfuse"), "model.pt", "-o", "fused.pt", "--input-shape", SHAPE, "-q"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**env, "PYTHONPATH": "."}, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    assert "--allow project_model_cwd" in proc.stderr
    command += ["--allow", "project_model_cwd"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "project_model_cwd.ProjectNet cannot be imported" in proc.stderr
    assert "PYTHONPATH=." in proc.stderr
    assert not (tmp_path / "fused.pt").exists()
    proc = subprocess.run(command, capture_output=True, text=True, env={**env, "PYTHONPATH": "."}, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "fused.pt").is_file()
