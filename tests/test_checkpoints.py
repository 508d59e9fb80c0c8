"""Checkpoints as training frameworks write them: the model is found where each framework keeps it,
the fused one is written back in its place with every other key kept, and the framework's own
loader takes the output; safetensors and weights-only outputs; ``apply_fused_structure``.

The ultralytics files are written by ultralytics' own code (``BaseTrainer.save_model``,
``strip_optimizer``) and timm's by its ``CheckpointSaver``; the Lightning checkpoint is a faithful
imitation of ``_CheckpointConnector.dump_checkpoint`` (lightning is not installed here).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

import convfuse
from convfuse.errors import UsageError
from convfuse.structure import describe_structure
from tests.conftest import norm_names, randomize_bn
from tests.models import TinyNet
from tests.test_beyond_pairs import ConcatOfBranches, RepNet, SumOfBranches
from tests.test_cli import assert_one_line_error, invoke

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# issue 12 (the allow list) changes how these files are let in; switch them here only.
ULTRALYTICS_LOAD = {"allow": ["ultralytics"]}  # its classes, IterableSimpleNamespace among them
NAMESPACE_LOAD: dict = {}  # argparse.Namespace under `args` (timm, training loops) is plain data: no flag
SHAPE = "1,3,16,16"
YOLO_SHAPE = "1,3,32,32"  # yolov8n's smallest input (stride 32)
TIMM_NAME = "mobilenetv3_small_050"  # small, and its norms are BatchNormAct2d (a Sequential once fused)

def flags(options: dict) -> list[str]:
    """The command-line form of a load-options constant."""
    return ["--trust"] * bool(options.get("trust")) + [f"--allow={name}" for name in options.get("allow", [])]


def run(source: Path, target: Path, *extra: object) -> dict:
    """The command on ``source``, which must succeed; its JSON report."""
    report = target.with_name(target.name + ".json")
    result = invoke(source, "-o", target, "--report", report, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def norm_count(model: nn.Module) -> int:
    return len(norm_names(model))


def assert_same(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to a fraction of the output's scale: what a correct fold changes is rounding."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def check_counts(data: dict, original: nn.Module, fused: nn.Module) -> None:
    assert data["norm_layers"] == {"before": norm_count(original), "after": norm_count(fused)}
    assert len(data["fused"]) == data["norm_layers"]["before"] - data["norm_layers"]["after"] > 0


# -- ultralytics ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """yolov8n's last.pt and best.pt, written by ultralytics' trainer code and strip_optimizer."""
    environment = pytest.MonkeyPatch()
    environment.setenv("YOLO_OFFLINE", "1")  # ultralytics never reaches for the network
    pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.torch_utils import ModelEMA, strip_optimizer

    folder = tmp_path_factory.mktemp("yolo")
    model = randomize_bn(DetectionModel("yolov8n.yaml", verbose=False), 11).eval()
    model.args = get_cfg(DEFAULT_CFG)
    trainer = SimpleNamespace(  # what save_model reads of a trainer
        ema=ModelEMA(model), model=model, epoch=3, best_fitness=0.5, fitness=0.5,
        stopper=SimpleNamespace(best_fitness=0.5, best_epoch=3),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        scaler=torch.amp.GradScaler("cpu", enabled=False), args=model.args, metrics={"metrics/mAP50(B)": 0.1},
        read_results_csv=lambda: {}, wdir=folder, last=folder / "last.pt", best=folder / "best.pt", save_period=-1,
    )
    BaseTrainer.save_model(trainer)
    strip_optimizer(folder / "best.pt")
    yield SimpleNamespace(last=folder / "last.pt", best=folder / "best.pt", model=model)
    environment.undo()


def yolo_outputs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``YOLO(path).predict`` computes on a synthetic image: its detections, and the raw
    output of the network it ran."""
    import numpy as np
    from ultralytics import YOLO

    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    yolo = YOLO(str(path))
    (result,) = yolo.predict(image, imgsz=32, conf=0.0, verbose=False)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = yolo.predictor.model(x)
    return result.boxes.data, raw[0] if isinstance(raw, (list, tuple)) else raw


def test_ultralytics_best_pt_is_written_back_and_predicts_the_same(yolo, tmp_path):
    target = tmp_path / "fused.pt"

    data = run(yolo.best, target, "--input-shape", YOLO_SHAPE, *flags(ULTRALYTICS_LOAD))

    original, written = torch.load(yolo.best, weights_only=False), torch.load(target, weights_only=False)
    assert list(written) == list(original)
    assert data["checkpoint"]["key"] == "model" and data["checkpoint"]["stored"] == "module"
    for key in set(original) - {"model"}:
        assert written[key] == original[key], key
    fused = written["model"]
    assert type(fused) is type(original["model"]) and next(fused.parameters()).dtype == torch.float16
    check_counts(data, original["model"], fused)
    boxes, raw = yolo_outputs(target)
    reference_boxes, reference_raw = yolo_outputs(yolo.best)
    assert boxes.shape == reference_boxes.shape
    assert_same(raw, reference_raw, 1e-3)  # float16 weights


def test_ultralytics_last_pt_fuses_the_ema_and_keeps_the_training_state(yolo, tmp_path):
    from ultralytics.nn import tasks

    target = tmp_path / "fused.pt"

    data = run(yolo.last, target, "--input-shape", YOLO_SHAPE, *flags(ULTRALYTICS_LOAD))

    original, written = torch.load(yolo.last, weights_only=False), torch.load(target, weights_only=False)
    assert data["checkpoint"] == {"key": "ema", "stored": "module", "prefix": "", "kept": [k for k in original if k != "ema"]}
    assert written["model"] is None
    assert written["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    assert written["train_args"] == original["train_args"] and written["epoch"] == original["epoch"]
    check_counts(data, original["ema"], written["ema"])
    load = getattr(tasks, "load_checkpoint", None) or tasks.attempt_load_one_weight  # the framework's loader
    model, _ = load(str(target))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert_same(model(x)[0], original["ema"].float()(x)[0], 1e-3)


# -- Lightning --------------------------------------------------------------------------


class LitClassifier(nn.Module):
    """Stands in for a LightningModule: its network is ``self.model``, so its keys are ``model.*``."""

    def __init__(self, net: nn.Module, metric_buffer: bool = False) -> None:
        super().__init__()
        self.model = net
        if metric_buffer:  # e.g. a torchmetrics state outside the network
            self.metric = nn.Module()
            self.metric.register_buffer("total", torch.tensor(12.0))

    def forward(self, x):
        return self.model(x)


def lightning_checkpoint(module: nn.Module) -> dict:
    """The dict Lightning's ``_CheckpointConnector.dump_checkpoint`` writes for a fit with one
    optimizer, a StepLR scheduler, ModelCheckpoint and save_hyperparameters()."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    progress = {"total": {"ready": 5, "started": 5, "processed": 5, "completed": 5},
                "current": {"ready": 5, "started": 5, "processed": 5, "completed": 5}}
    return {
        "epoch": 4,
        "global_step": 500,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": module.state_dict(),
        "loops": {
            "fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 500},
                         "epoch_progress": progress},
            "validate_loop": {"state_dict": {}, "batch_progress": progress},
            "test_loop": {"state_dict": {}, "batch_progress": progress},
            "predict_loop": {"state_dict": {}, "batch_progress": progress},
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
            "'train_time_interval': None}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/ckpt/epoch=4.ckpt",
                "current_score": torch.tensor(0.25), "dirpath": "/ckpt", "best_k_models": {}, "kth_best_model_path": "",
                "kth_value": torch.tensor(float("inf")), "last_model_path": "",
            }
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "num_classes": 1000},
    }


def lightning_load(path: Path, module: nn.Module) -> nn.Module:
    """What ``LightningModule.load_from_checkpoint`` does with the file (``pl_load``, then a strict
    ``load_state_dict``)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()


def test_lightning_checkpoint_with_arch_strips_model_prefix(tmp_path):
    original = LitClassifier(randomize_bn(torchvision.models.resnet18(weights=None), 12)).eval()
    source, target = tmp_path / "epoch=4.ckpt", tmp_path / "fused.ckpt"
    torch.save(lightning_checkpoint(original), source)

    data = run(source, target, "--arch", "resnet18", "--input-shape", "1,3,64,64")

    assert data["checkpoint"]["key"] == "state_dict" and data["checkpoint"]["prefix"] == "model."
    written, before = torch.load(target, weights_only=True), torch.load(source, weights_only=True)
    assert list(written) == list(before) and written["loops"] == before["loops"]
    assert all(key.startswith("model.") for key in written["state_dict"])
    fresh = LitClassifier(torchvision.models.resnet18(weights=None))
    with pytest.raises(RuntimeError, match="Missing key"):  # the unfused module refuses the fused weights loudly
        lightning_load(target, copy.deepcopy(fresh))
    convfuse.apply_fused_structure(fresh.model, target.with_name(target.name + ".json"))
    fused = lightning_load(target, fresh)
    check_counts(data, original, fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(fused(x), original(x))


def test_state_dict_with_keys_outside_the_network_needs_prefix(tmp_path):
    original = LitClassifier(randomize_bn(TinyNet(), 13), metric_buffer=True).eval()
    source, target = tmp_path / "last.ckpt", tmp_path / "fused.ckpt"
    torch.save(lightning_checkpoint(original), source)

    line = assert_one_line_error(invoke(source, "-o", target, "--arch", "tests.models:build_tiny", "--input-shape", SHAPE))
    assert "does not fit" in line and line.endswith("add --prefix model.")
    data = run(source, target, "--arch", "tests.models:build_tiny", "--input-shape", SHAPE, "--prefix", "model.")

    written = torch.load(target, weights_only=True)["state_dict"]
    assert written["metric.total"] == 12.0
    fresh = LitClassifier(TinyNet(), metric_buffer=True)
    convfuse.apply_fused_structure(fresh.model, data)
    fused = lightning_load(target, fresh)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same(fused(x), original(x))


# -- timm -------------------------------------------------------------------------------


def timm_model(seed: int) -> nn.Module:
    timm = pytest.importorskip("timm")
    return randomize_bn(timm.create_model(TIMM_NAME, pretrained=False), seed).eval()


def test_timm_training_checkpoint_fuses_the_ema_weights_its_loader_takes(tmp_path):
    pytest.importorskip("timm")
    from timm.models import load_checkpoint
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = timm_model(14)
    ema = ModelEmaV3(model)
    randomize_bn(ema.module, 15)
    args = argparse.Namespace(model=TIMM_NAME, lr=0.05, epochs=3)
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.05), args=args, model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=2, metric=0.5)
    source, target = tmp_path / "last.pth.tar", tmp_path / "fused.pth.tar"

    data = run(source, target, "--arch", f"timm:{TIMM_NAME}", "--input-shape", "1,3,64,64", *flags(NAMESPACE_LOAD))

    assert data["checkpoint"]["key"] == "state_dict_ema"
    assert any(entry["type"] == "Sequential" for entry in data["structure"])  # BatchNormAct2d: its activation kept
    written = torch.load(target, weights_only=False)
    assert written["args"] == args and written["epoch"] == 2
    fused = convfuse.apply_fused_structure(timm_model(0), data)
    load_checkpoint(fused, str(target))  # timm's loader: state_dict_ema, strict
    check_counts(data, ema.module, fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(fused(x), ema.module.eval()(x))


def test_torchvision_name_for_a_timm_state_dict_suggests_the_timm_form(tmp_path):
    timm = pytest.importorskip("timm")
    source = tmp_path / "pytorch_model.bin"
    torch.save(timm.create_model("efficientnet_b0", pretrained=False).state_dict(), source)

    line = assert_one_line_error(invoke(source, "-o", tmp_path / "fused.pt", "--arch", "efficientnet_b0"))

    assert "does not fit --arch efficientnet_b0" in line and "--arch timm:efficientnet_b0" in line


@pytest.mark.parametrize(("arch", "message"), [("timm:mobilenetv3_smal_050", "timm:mobilenetv3_small_050"),
                                               ("timm:create_model", "not a timm model name"),
                                               ("mobilenetv3_small_050", "--arch timm:mobilenetv3_small_050")])
def test_timm_names_that_do_not_exist(tmp_path, arch, message):
    pytest.importorskip("timm")
    source = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), source)
    assert message in assert_one_line_error(invoke(source, "-o", tmp_path / "fused.pt", "--arch", arch))


# -- safetensors and weights-only outputs -----------------------------------------------


def test_safetensors_in_and_out_and_back_into_a_fresh_model(tmp_path):
    original = timm_model(16)
    source = tmp_path / "model.safetensors"
    save_file(original.state_dict(), source, metadata={"format": "pt"})
    target = tmp_path / "fused.safetensors"

    data = run(source, target, "--arch", f"timm:{TIMM_NAME}", "--input-shape", "1,3,64,64")
    weights = run(source, tmp_path / "fused.pt", "--arch", f"timm:{TIMM_NAME}", "--input-shape", "1,3,64,64")

    with safe_open(target, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    state = load_file(target)
    assert set(torch.load(tmp_path / "fused.pt", weights_only=True)) == set(state)
    assert data["structure"] == weights["structure"]
    fresh = timm_model(0)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(state)
    fused = convfuse.apply_fused_structure(fresh, target.with_name(target.name + ".json"))
    fused.load_state_dict(state, strict=True)
    check_counts(data, original, fused)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(fused(x), original(x))


def test_format_state_dict_from_a_whole_model(tmp_path):
    original = randomize_bn(TinyNet(), 17).eval()
    source = tmp_path / "model.pt"
    torch.save(original, source)

    data = run(source, tmp_path / "weights.pt", "--input-shape", SHAPE, "--format", "state_dict")

    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert "conv1.bias" in state and not any(key.startswith("bn") for key in state)  # a bias gained, norms gone
    fused = convfuse.apply_fused_structure(TinyNet(), data)
    fused.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same(fused.eval()(x), original(x))


# -- a plain training loop --------------------------------------------------------------


def test_training_loop_dict_with_namespace_args(tmp_path):
    original = randomize_bn(TinyNet(), 18).eval()
    optimizer = torch.optim.Adam(original.parameters())
    args = argparse.Namespace(lr=1e-3, batch_size=32, data=Path("/data"))
    source, target = tmp_path / "checkpoint.pth", tmp_path / "fused.pth"
    torch.save({"epoch": 9, "model_state_dict": original.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "loss": 0.125, "args": args}, source)

    data = run(source, target, "--arch", "tests.models:build_tiny", "--input-shape", SHAPE, *flags(NAMESPACE_LOAD))

    written = torch.load(target, weights_only=False)
    assert data["checkpoint"]["key"] == "model_state_dict"
    assert written["args"] == args and written["loss"] == 0.125
    assert written["optimizer_state_dict"]["param_groups"] == optimizer.state_dict()["param_groups"]
    fused = convfuse.apply_fused_structure(TinyNet(), data)
    fused.load_state_dict(written["model_state_dict"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_same(fused.eval()(x), original(x))


def test_dict_without_a_model_lists_its_keys(tmp_path):
    source = tmp_path / "last.pt"
    torch.save({"epoch": 1, "model": None, "optimizer": {"state": {}, "param_groups": []}}, source)
    line = assert_one_line_error(invoke(source, "-o", tmp_path / "fused.pt"))
    assert "'epoch' (int)" in line and "'model' (None)" in line and "'optimizer' (dict)" in line


def test_prefix_that_no_key_has(tmp_path):
    source = tmp_path / "weights.pt"
    torch.save({f"net.{k}": v for k, v in TinyNet().state_dict().items()}, source)
    line = assert_one_line_error(invoke(source, "-o", tmp_path / "f.pt", "--arch", "tests.models:build_tiny", "--prefix", "model."))
    assert "--prefix 'model.'" in line and "'net.'" in line
    line = assert_one_line_error(invoke(source, "-o", tmp_path / "f.pt", "--arch", "tests.models:build_tiny"))
    assert "--prefix net." in line  # an unknown wrapper prefix is not stripped unasked, but named


def test_prefix_for_a_whole_model(tmp_path):
    source = tmp_path / "model.pt"
    torch.save(randomize_bn(TinyNet()).eval(), source)
    assert "--prefix" in assert_one_line_error(invoke(source, "-o", tmp_path / "f.pt", "--prefix", "model."))


def test_load_with_prefix(tmp_path):
    original = randomize_bn(TinyNet(), 21).eval()
    path = tmp_path / "weights.pt"
    state = {**{f"model.{k}": v for k, v in original.state_dict().items()}, "loss.weight": torch.ones(3)}
    torch.save({"state_dict": state}, path)
    loaded = convfuse.load(path, arch="tests.models:build_tiny", prefix="model.")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


# -- apply_fused_structure --------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "inputs", "reparam"),
    [
        (lambda: torchvision.models.resnet18(weights=None), lambda: (torch.randn(2, 3, 64, 64),), False),
        (SumOfBranches, lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)), False),
        (ConcatOfBranches, lambda: (torch.randn(2, 3, 6, 6),), False),
        (RepNet, lambda: (torch.randn(2, 4, 12, 12),), True),
    ],
    ids=["resnet18", "sum", "concat", "reparam"],
)
def test_apply_fused_structure_takes_the_fused_state_dict(build, inputs, reparam):
    torch.manual_seed(1)
    result = convfuse.fuse(randomize_bn(build(), 19).eval(), inputs(), reparam=reparam)
    state = result.model.state_dict()
    fresh = build().eval()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)

    for report in (result.report, result.report.to_dict()):
        rebuilt = convfuse.apply_fused_structure(copy.deepcopy(fresh), report)
        rebuilt.load_state_dict(state, strict=True)
        assert norm_names(rebuilt) == norm_names(result.model)
        x = inputs()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(*x), result.model(*x), rtol=0, atol=0)


def test_apply_fused_structure_refuses_a_report_for_another_model():
    report = convfuse.fuse(randomize_bn(TinyNet()).eval(), torch.randn(2, 3, 16, 16)).report
    model = torchvision.models.resnet18(weights=None)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(UsageError, match="does not fit this model"):
        convfuse.apply_fused_structure(model, report)
    assert set(model.state_dict()) == set(before)  # untouched


def test_apply_fused_structure_refuses_a_second_time_and_a_changed_record():
    result = convfuse.fuse(timm_model(20), torch.randn(2, 3, 64, 64))
    result.report.structure = describe_structure(result.model, result.report)
    data = result.report.to_dict()
    model = convfuse.apply_fused_structure(timm_model(0), data)
    with pytest.raises(UsageError, match="not a BatchNorm"):
        convfuse.apply_fused_structure(model, data)
    changed = copy.deepcopy(data)
    entry = next(e for e in changed["structure"] if e["type"] == "Sequential")
    entry["children"] = {"act": "GELU"}
    with pytest.raises(UsageError, match="would get a Sequential"):
        convfuse.apply_fused_structure(timm_model(0), changed)


def test_apply_fused_structure_reads_a_report_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("not json")
    with pytest.raises(UsageError, match="report"):
        convfuse.apply_fused_structure(TinyNet(), path)
