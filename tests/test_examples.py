"""Every script in examples/ runs and prints what it promises; the CI gate script maps convfuse's
exit codes and forwards its options; the GitHub Actions workflow is valid YAML that gates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from convfuse import Reason
from tests.conftest import randomize_bn

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GATE = EXAMPLES / "ci" / "convfuse-gate.sh"
WORKFLOW = EXAMPLES / "ci" / "github-actions.yml"

# One thread: on a shared machine a second OpenMP thread that has to wait for a core makes
# every forward pass many times slower. NO_COLOR keeps rich's output plain.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "CONVFUSE_DEBUG": ""}
ENV.pop("GITHUB_ACTIONS", None)

EXPECTED = {
    "fuse_torchvision.py": [
        "convfuse: fused 20 of 20 BatchNorm layers, verified",
        "BatchNorm layers: 20 -> 0",
        "verification: passed=True on 3 batches",
        "speed-up: ",
    ],
    "custom_padding_modes.py": [
        "convfuse: fused 5 of 5 BatchNorm layers, verified",
        "conv_reflect    <- bn_reflect    Conv2d padding_mode='reflect' padding=(1, 1)",
        "conv_replicate  <- bn_replicate  Conv2d padding_mode='replicate' padding=(2, 2)",
        "conv_circular   <- bn_circular   Conv2d padding_mode='circular' padding=(1, 1)",
        "conv_same       <- bn_same       Conv2d padding_mode='reflect' padding='same'",
        "conv_head       <- bn_before     Conv2d padding_mode='reflect' padding=(1, 1)",
        "BatchNorm layers left: []",
        "outputs equal: ",
        f"left unfused: {Reason.ZERO_PADDING}",
    ],
    "python_api.py": [
        "summary: fused 2 of 3 BatchNorm layers, 1 left, verified",
        "fused    stem_bn into stem (Conv2d+BatchNorm2d)",
        f"skipped  branch_bn (producer branch): {Reason.OTHER_USERS}",
        '"norm_layers": {',
        "VerificationError for a model whose output changes between calls:",
        "passed=False, rule='nondeterministic'",
        "VerificationError for a correct fold with zero tolerance:",
        "passed=False, rule='float64 proof + user tolerance'",
        "saved and loaded ApiNet from fused.pt: outputs match the original's",
    ],
    "untraceable_model.py": [
        "convfuse: fused 3 of 4 BatchNorm layers, 1 left, verified",
        "(model): TraceError: ",
        "features.0 + features.1 (Conv2d+BatchNorm2d)",
        "features.3 + features.4 (Conv2d+BatchNorm2d)",
        "head.0 + head.1 (Linear+BatchNorm1d)",
        f"stem_bn: {Reason.NOT_TRACED} (called from (model))",
        "verification passed=True",
    ],
}


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    for line in EXPECTED[script]:
        assert line in done.stdout, f"{script}: {line!r} not in its output:\n{done.stdout}"


# -- the CI gate script ------------------------------------------------------------------


def run_gate(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "CONVFUSE": f"{sys.executable} -m convfuse"}
    return subprocess.run(
        ["sh", str(GATE), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def save(model: nn.Module, path: Path) -> Path:
    torch.save(randomize_bn(model).eval(), path)
    return path


needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")


@needs_sh
def test_gate_passes_and_writes_the_report(tmp_path: Path) -> None:
    model = save(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), tmp_path / "model.pt")
    done = run_gate(model, "fused.pt", "report.json", "--input-shape", "1,3,8,8", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stderr and "deploy it" in done.stderr
    assert (tmp_path / "fused.pt").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verification"]["passed"] is True
    assert report["norm_layers"] == {"before": 1, "after": 0}


@needs_sh
def test_gate_blocks_a_model_that_fails_a_check(tmp_path: Path) -> None:
    """--strict (forwarded to convfuse) with a BatchNorm that cannot be folded: exit 1, nothing written."""
    model = save(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)), tmp_path / "model.pt")
    done = run_gate(model, "fused.pt", "report.json", "--input-shape", "1,3,8,8", "--strict", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "BLOCKED" in done.stderr and "do not deploy" in done.stderr
    assert not (tmp_path / "fused.pt").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["reason"] for s in report["skipped"]] == [Reason.NO_PRODUCER]


@needs_sh
@pytest.mark.parametrize("args", [("missing.pt", "fused.pt", "report.json"), ("only-two.pt", "args.pt")])
def test_gate_reports_a_configuration_problem(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = run_gate(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CONFIGURATION PROBLEM" in done.stderr or "usage:" in done.stderr
    assert not (tmp_path / "fused.pt").exists()


# -- the GitHub Actions workflow -----------------------------------------------------------


def test_workflow_gates_and_always_uploads_the_report() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "workflow_dispatch"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    setup = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    assert str(setup["with"]["python-version"]) == "3.11"
    assert any("pip install" in s.get("run", "") and s["run"].rstrip().endswith(" .") for s in steps)
    gate = next(s for s in steps if "convfuse-gate.sh" in s.get("run", ""))
    assert "|| true" not in gate["run"] and not gate.get("continue-on-error")
    report_path = gate["run"].split("convfuse-gate.sh")[1].split()[2]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")
                  and s["with"]["path"] == report_path)
    assert upload["if"] == "always()"
