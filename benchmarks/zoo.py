"""Zoo coverage: how many BatchNorms convfuse and PyTorch's fuser remove, and whether the result is right.

For every torchvision model (classification, detection, segmentation, video, optical flow;
not the quantized ones), built with ``weights=None`` (detection: also ``weights_backbone=None``),
BatchNorm statistics randomised (a fresh BN is the identity at eval and hides folding bugs), in
eval mode, on small fixed random inputs, this script runs

* ``convfuse.fuse(model, inputs)`` (with its own verification, as users run it), and
* ``torch.fx.experimental.optimization.fuse(model)``, the fuser users would otherwise pick,

and reports for each: status, norms executed before and after, the worst relative output error
and the wall time of the fuse call. ``--timm`` adds a fixed sample of timm models,
``--ultralytics`` the YOLO models built from ultralytics' bundled configs (no download; skipped
with a note where ultralytics is not installed).

How norms are counted (what runs, not what is registered): the original model, convfuse's
result and PyTorch's result (a GraphModule) each run once under a TorchFunctionMode
(``_common.NormCounter``) that counts ``batch_norm`` calls (every nn.BatchNormNd/SyncBatchNorm
forward, also when a graph calls it functionally) plus the arithmetic of torchvision's
FrozenBatchNorm2d: a ``mul`` by a (1, C, 1, 1) tensor whose result is ``add``-ed to a (1, C, 1, 1)
tensor. torch.fx inlines FrozenBatchNorm2d and constant-folds its scale and bias, so a GraphModule
that "fused" the model still runs those layers without having the modules; the counter sees them.
On each original model the count is cross-checked against forward hooks on its norm modules
(``convfuse.graphs.fx_pairs.is_norm``); a mismatch is flagged in the notes. The counts are executions
per forward pass (a norm called twice counts twice).

Status of a tool on a model:
  ok       the fuse call returned and the result's outputs match the original's: every float
           output tensor within 1e-4 of the original's largest magnitude (nested outputs, e.g.
           detection's list of dicts, are compared leaf by leaf; integer outputs exactly);
  ok (r)   beyond 1e-4, but within 10x the original's own float32 rounding error, measured
           against a float64 run of the original (deep random-weight models amplify rounding);
  ok (b)   the original's own float32 rounding already changes its discrete outputs (detections
           re-ordered among tied scores), so final outputs cannot tell; the backbone's feature
           maps match (same rule as "ok"/"ok (r)").
           Detection models are always also judged on their backbone's feature maps (with random
           weights their final detections may be few or none), and "max rel err" is the backbone's;
  WRONG    anything else: a structure/shape/integer change or an error beyond those bounds;
  refused  convfuse's own verification rejected its result (VerificationError): nothing would
           be saved, so nothing is removed; the BN count "after" is then the original's;
  crashed  the fuse call (or the first forward of its result) raised; the error is shown.

"wall s" is the fuse call alone: convfuse's includes its copy of the model and its verification
(about ten forward passes, three of them in float64); "trace+fold s" is convfuse's own
tracing, matching and folding (report timings). PyTorch's includes its copy and fx trace.

Exit status: 1 when convfuse produced a WRONG output on any model, else 0.

    python benchmarks/zoo.py [--quick] [--timm] [--ultralytics] [--all] [--only NAME ...] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torchvision
from _common import (
    REL_TOL,
    Difference,
    difference,
    emit,
    fmt_err,
    fmt_s,
    header,
    markdown_table,
    randomize_bn,
    run,
    run_counted,
    short_error,
)
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fuse
from torchvision.ops.misc import FrozenBatchNorm2d

import convfuse

warnings.filterwarnings("ignore")

SEED = 0
NOISE_FACTOR = 10.0
"""A difference within this many times the original's own float32 rounding error is rounding."""

# Detection builders that use FrozenBatchNorm2d in the backbone whenever weights are loaded
# (``norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d``). With weights=None they
# build nn.BatchNorm2d; users who fuse these models have pretrained ones, so the backbone's BNs
# are converted to FrozenBatchNorm2d, as loading weights would.
FROZEN_WHEN_PRETRAINED = {
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
}

# Left out of the default run (each costs minutes on 2 cores); --all includes them.
HEAVY = {
    "vit_h_14": "632M parameters, no BatchNorm",
    "regnet_y_128gf": "645M parameters (same blocks as regnet_y_32gf)",
    "mvit_v1_b": "needs 16x224x224 clips, no BatchNorm",
    "mvit_v2_s": "needs 16x224x224 clips, no BatchNorm",
}

QUICK = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
    "googlenet",
    "inception_v3",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "r3d_18",
    "raft_small",
]

TIMM_SAMPLE = [
    "resnet50d",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "regnety_016",
    "cspdarknet53",
    "dla34",
    "ghostnet_100",
    "hrnet_w18_small",
    "rexnet_100",
    "repvgg_a2",
    "levit_128s",
    "dpn68",
    "res2net50_26w_4s",
    "selecsls42b",
    "ese_vovnet19b_dw",
    "densenet121",
    "mixnet_s",
    "resnest14d",
    "skresnet18",
    "xception41",
    "fastvit_t8",
    "mobileone_s0",
    "efficientvit_b0",
    "lcnet_100",
    "mobilevit_xxs",
    "coatnet_0_rw_224",
    "mobilenetv4_conv_small",
    "hgnetv2_b0",
    "repvit_m1",
    "tiny_vit_5m_224",
    "efficientformerv2_s0",
    "nf_resnet50",
    "convnext_nano",
]
TIMM_QUICK = ["efficientnet_b0", "levit_128s", "repvgg_a2", "fastvit_t8", "hrnet_w18_small"]

# ultralytics models from the configs bundled with the package (random weights, nothing downloaded)
ULTRALYTICS = {
    "yolov8n": ("yolov8n.yaml", "detection", 256),
    "yolo11n": ("yolo11n.yaml", "detection", 256),
    "yolov8n-cls": ("yolov8n-cls.yaml", "classification", 224),
}


# -- the models ---------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]  # convfuse example_inputs: a tensor, a list (one argument) or a dict (kwargs)
    note: str = ""
    probe: Callable[[nn.Module, tuple], Any] | None = None
    """Continuous intermediate outputs, to judge a model whose final outputs are discontinuous."""


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED))


def _images(count: int, size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    return [torch.rand((3, size, size), generator=generator) for _ in range(count)]


def _to_frozen(module: nn.Module) -> None:
    """Replace every nn.BatchNorm2d below ``module`` with an equivalent FrozenBatchNorm2d."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _to_frozen(child)


def _detection_backbone(model: nn.Module, batch: tuple) -> Any:
    """The backbone's feature maps of a detection model (before its discontinuous post-processing)."""
    images, _ = model.transform(batch[0][0])
    return model.backbone(images.tensors)


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if name in FROZEN_WHEN_PRETRAINED:
            _to_frozen(model.backbone.body)
        return model

    return build


def torchvision_specs() -> list[Spec]:
    from torchvision import models

    specs: list[Spec] = []
    for name in models.list_models(module=models):
        if name.startswith("vit_"):
            size = 112 if name.endswith("_14") else 128  # image size must be a multiple of the patch
            specs.append(
                Spec(name, "classification", _tv(name, image_size=size), lambda s=size: _randn(1, 3, s, s))
            )
        elif name == "maxvit_t":  # window partitions need 224
            specs.append(Spec(name, "classification", _tv(name), lambda: _randn(1, 3, 224, 224), "224x224"))
        else:
            specs.append(Spec(name, "classification", _tv(name), lambda: _randn(1, 3, 128, 128)))
    for name in models.list_models(module=models.detection):
        kwargs: dict[str, Any] = {"weights_backbone": None}
        if not name.startswith("ssd"):  # SSD resizes to its fixed 300/320 input
            kwargs.update(min_size=224, max_size=224)
        note = "frozen BN" if name in FROZEN_WHEN_PRETRAINED else ""
        specs.append(
            Spec(name, "detection", _tv(name, **kwargs), lambda: _images(2, 224), note, _detection_backbone)
        )
    for name in models.list_models(module=models.segmentation):
        specs.append(
            Spec(name, "segmentation", _tv(name, weights_backbone=None), lambda: _randn(1, 3, 128, 128))
        )
    for name in models.list_models(module=models.video):
        if name == "s3d" or name.startswith("mvit"):  # its final 2x7x7 pooling needs 16x224x224
            specs.append(Spec(name, "video", _tv(name), lambda: _randn(1, 3, 16, 224, 224), "16x224x224"))
        else:
            specs.append(Spec(name, "video", _tv(name), lambda: _randn(1, 3, 8, 112, 112)))
    for name in models.list_models(module=models.optical_flow):
        specs.append(
            Spec(
                name,
                "optical_flow",
                _tv(name),
                lambda: {
                    "image1": _randn(1, 3, 128, 128),
                    "image2": _randn(1, 3, 128, 128) * 0.5,
                    "num_flow_updates": 3,
                },
                "3 flow updates",
            )
        )
    return specs


def timm_specs(names: list[str]) -> list[Spec]:
    import timm

    specs = []
    for name in names:

        def build(name: str = name) -> nn.Module:
            return timm.create_model(name, pretrained=False)

        def inputs(name: str = name) -> torch.Tensor:
            cfg = timm.get_pretrained_cfg(name)
            size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
            return _randn(1, *size)

        specs.append(Spec(name, "timm", build, inputs))
    return specs


def ultralytics_specs() -> tuple[list[Spec], str | None]:
    """The ULTRALYTICS models, or none and why (ultralytics is not installed)."""
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")  # build from the bundled configs, never download
    try:
        from ultralytics.nn.tasks import ClassificationModel, DetectionModel
    except ImportError as error:
        return [], f"ultralytics is not installed ({error})"
    specs = []
    for name, (config, family, size) in ULTRALYTICS.items():

        def build(config: str = config, family: str = family) -> nn.Module:
            cls = ClassificationModel if family == "classification" else DetectionModel
            return cls(config, verbose=False)

        specs.append(Spec(name, f"ultralytics {family}", build, lambda s=size: _randn(1, 3, s, s), f"{size}x{size}"))
    return specs, None


# -- running one model --------------------------------------------------------------------


def _batch(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), example
    return (example,), {}


@dataclass
class ToolResult:
    status: str = "-"  # ok, WRONG, refused, crashed
    detail: str = ""
    after: int | None = None
    rel_error: float | None = None
    seconds: float | None = None
    core_seconds: float | None = None  # convfuse: trace + fold
    left: Counter = field(default_factory=Counter)  # convfuse: reasons BNs were left unfused
    judged: str = (
        ""  # "" final outputs within REL_TOL; "r" within the original's rounding; "b" at the backbone
    )


@dataclass
class Row:
    spec: Spec
    before: int | None = None
    hooked: int | None = None
    build_s: float = 0.0
    convfuse: ToolResult = field(default_factory=ToolResult)
    torch: ToolResult = field(default_factory=ToolResult)
    error: str = ""  # the model itself failed to build or run
    notes: list[str] = field(default_factory=list)


def _to_double(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_double(v) for v in obj)
    return obj


class Judge:
    """Decides whether a fused model's output is right, against the original's own rounding error.

    Within ``REL_TOL`` of the original: right. Beyond it, the original is run once in float64 (a
    deep copy): if its own float32 output is that far from its float64 output too (within
    ``NOISE_FACTOR`` times), the difference is rounding, not a fusion error (deep random-weight
    models amplify rounding). Where the original's own rounding already changes its discrete
    outputs (detections re-ordered among tied scores), the final outputs cannot tell right from
    wrong; the model is then judged at ``spec.probe`` (a detection model's backbone features).
    """

    def __init__(self, spec: Spec, model: nn.Module, batch: tuple, reference: Any) -> None:
        self.spec, self.model, self.batch, self.reference = spec, model, batch, reference
        self._noise: dict[str, Difference] = {}
        self._probe_reference: Any = None

    def _call(self, where: str, model: nn.Module, batch: tuple) -> Any:
        with torch.no_grad():
            if where == "probe":
                return self.spec.probe(model, batch)
            return run(model, batch)

    def noise(self, where: str) -> Difference:
        """How far the original's float32 output (``where``: "output" or "probe") is from float64."""
        if where not in self._noise:
            try:
                model64 = copy.deepcopy(self.model).double()
                batch64 = _to_double(self.batch)
                expected = self._call(where, model64, batch64)
                actual = self.reference if where == "output" else self.probe_reference()
                self._noise[where] = difference(expected, actual)
                del model64
            except Exception as error:  # noqa: BLE001
                self._noise[where] = Difference(math.inf, f"float64 run failed: {short_error(error)}")
        return self._noise[where]

    def probe_reference(self) -> Any:
        if self._probe_reference is None:
            self._probe_reference = self._call("probe", self.model, self.batch)
        return self._probe_reference

    def assess(self, diff: Difference, where: str) -> str:
        """ "ok", "r" (within the original's rounding), "discontinuous" or "WRONG"."""
        if not diff.wrong:
            return "ok"
        noise = self.noise(where)
        if noise.problem is None:
            within = diff.problem is None and diff.rel_error <= max(REL_TOL, NOISE_FACTOR * noise.rel_error)
            return "r" if within else "WRONG"
        if noise.problem.startswith("float64 run failed"):
            return "WRONG"
        return "discontinuous"  # the original's own rounding changes these outputs

    def __call__(self, result: ToolResult, fused: nn.Module) -> None:
        try:
            output, count = run_counted(fused, self.batch)
        except Exception as error:  # noqa: BLE001 - a benchmark records every failure
            result.status, result.detail = "crashed", "at run: " + short_error(error)
            return
        result.after = count.executed
        final = difference(self.reference, output)
        verdict = self.assess(final, "output")
        result.rel_error = final.rel_error
        detail = final.problem or f"rel. error {fmt_err(final.rel_error)}"
        if self.spec.probe is not None:  # always judged too: final detections may be few or none
            try:
                probe = difference(self.probe_reference(), self.spec.probe(fused, self.batch))
            except Exception as error:  # noqa: BLE001
                result.status, result.detail = "crashed", "at backbone: " + short_error(error)
                return
            probe_verdict = self.assess(probe, "probe")
            result.rel_error = probe.rel_error
            if probe_verdict not in ("ok", "r"):
                verdict = "WRONG"
                detail = "backbone: " + (probe.problem or f"rel. error {fmt_err(probe.rel_error)}")
            elif verdict == "discontinuous":
                verdict = "b"
            elif verdict == "ok":
                verdict = probe_verdict
        if verdict in ("WRONG", "discontinuous"):
            result.status = "WRONG"
            result.detail = detail + (
                " (the original's own rounding changes it too)" if verdict != "WRONG" else ""
            )
            return
        result.status, result.judged = "ok", "" if verdict == "ok" else verdict


def run_convfuse(model: nn.Module, example: Any, judge: Judge, before: int) -> ToolResult:
    result = ToolResult()
    start = time.perf_counter()
    try:
        fused = convfuse.fuse(model, example)
    except convfuse.VerificationError as error:
        result.seconds = time.perf_counter() - start
        result.status, result.detail, result.after = "refused", str(error).splitlines()[0][:120], before
        return result
    except Exception as error:  # noqa: BLE001
        result.seconds = time.perf_counter() - start
        result.status, result.detail = "crashed", short_error(error)
        return result
    result.seconds = time.perf_counter() - start
    timings = fused.report.timings
    result.core_seconds = timings.get("trace", 0.0) + timings.get("fold", 0.0)
    result.left = Counter(skip.reason for skip in fused.report.skipped)
    judge(result, fused.model)
    del fused
    return result


def run_torch(model: nn.Module, judge: Judge) -> ToolResult:
    result = ToolResult()
    start = time.perf_counter()
    try:
        fused = torch_fuse(model)
    except Exception as error:  # noqa: BLE001
        result.seconds = time.perf_counter() - start
        result.status, result.detail = "crashed", short_error(error)
        return result
    result.seconds = time.perf_counter() - start
    judge(result, fused)
    del fused
    return result


def run_one(spec: Spec) -> Row:
    row = Row(spec)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    try:
        model = randomize_bn(spec.build(), SEED).eval()
        example = spec.inputs()
        batch = _batch(example)
        reference, count = run_counted(model, batch)
    except Exception as error:  # noqa: BLE001
        row.error = short_error(error)
        return row
    row.build_s = time.perf_counter() - start
    row.before, row.hooked = count.executed, count.hooked
    if count.hooked != count.executed:
        row.notes.append(f"counter {count.executed} vs hooks {count.hooked}")
    judge = Judge(spec, model, batch, reference)
    row.convfuse = run_convfuse(model, example, judge, count.executed)
    gc.collect()
    row.torch = run_torch(model, judge)
    del model, reference, judge
    gc.collect()
    return row


# -- the report ---------------------------------------------------------------------------


def _status(result: ToolResult) -> str:
    if result.status == "ok" and result.judged:
        return f"ok ({result.judged})"
    if result.status in ("ok", "-"):
        return result.status
    return f"{result.status}: {result.detail}" if result.detail else result.status


def _after(result: ToolResult) -> str:
    return "-" if result.after is None else str(result.after)


def _pct(removed: int, total: int) -> str:
    return f"{100.0 * removed / total:.1f}%" if total else "-"


def totals(rows: list[Row]) -> dict[str, Any]:
    ran = [r for r in rows if r.before is not None]
    total = sum(r.before for r in ran)
    summary: dict[str, Any] = {"models": len(ran), "norms": total}
    for tool in ("convfuse", "torch"):
        results = [getattr(r, tool) for r in ran]
        # a tool that crashed, refused or broke the model removes nothing usable from it
        removed = sum(r.before - res.after for r, res in zip(ran, results) if res.status == "ok")
        summary[tool] = {
            "removed": removed,
            "pct": _pct(removed, total),
            "wrong": [r.spec.name for r, res in zip(ran, results) if res.status == "WRONG"],
            "crashed": [r.spec.name for r, res in zip(ran, results) if res.status == "crashed"],
            "refused": [r.spec.name for r, res in zip(ran, results) if res.status == "refused"],
            "seconds": sum(res.seconds or 0.0 for res in results),
        }
    return summary


def render(title: str, rows: list[Row], skipped: list[tuple[str, str]]) -> str:
    columns = [
        "model",
        "family",
        "BN before",
        "convfuse",
        "BN after",
        "max rel err",
        "wall s",
        "trace+fold s",
        "torch.fx fuse",
        "BN after",
        "max rel err",
        "wall s",
    ]
    table_rows = []
    for row in rows:
        name = row.spec.name + (f" ({row.spec.note})" if row.spec.note else "")
        if row.error:
            table_rows.append([name, row.spec.family, "-", f"model failed: {row.error}", *["-"] * 8])
            continue
        c, t = row.convfuse, row.torch
        table_rows.append(
            [
                name,
                row.spec.family,
                row.before,
                _status(c),
                _after(c),
                fmt_err(c.rel_error),
                fmt_s(c.seconds),
                fmt_s(c.core_seconds),
                _status(t),
                _after(t),
                fmt_err(t.rel_error),
                fmt_s(t.seconds),
            ]
        )
    text = f"### {title}\n\n" + markdown_table(columns, table_rows, "llrlrrrrlrrr")
    text += (
        "\n(r): error beyond 1e-4 but within 10x the original's own float32 rounding error (vs float64); "
        "(b): final outputs discontinuous in rounding (the original's own float64 run changes them), "
        "judged on the backbone's features. For detection models, max rel err is that of the backbone's "
        "feature maps (also judged; final detections may be empty with random weights).\n\n"
    )
    s = totals(rows)
    text += f"**Totals over {s['models']} models, {s['norms']} BatchNorms executed:**\n\n"
    total_rows = []
    for tool, label in (("convfuse", "convfuse"), ("torch", "torch.fx.experimental.optimization.fuse")):
        t = s[tool]
        total_rows.append(
            [
                label,
                f"{t['removed']} ({t['pct']})",
                len(t["wrong"]),
                len(t["crashed"]),
                len(t["refused"]),
                f"{t['seconds']:.1f}",
            ]
        )
    text += markdown_table(
        [
            "tool",
            "BN removed (correct results only)",
            "wrong output",
            "crashed",
            "refused",
            "total fuse wall s",
        ],
        total_rows,
    )
    for tool, label in (("convfuse", "convfuse"), ("torch", "torch.fx fuse")):
        for kind in ("wrong", "crashed", "refused"):
            if s[tool][kind]:
                text += f"\n- {label} {kind}: {', '.join(s[tool][kind])}"
    left = [(r.spec.name, r.convfuse.left) for r in rows if r.convfuse.left]
    if left:
        text += "\n\n**Why convfuse left BatchNorms unfused** (reasons from its report):\n\n"
        text += markdown_table(
            ["model", "left", "reasons"],
            [
                [name, sum(c.values()), "; ".join(f"{n}x {reason}" for reason, n in c.most_common())]
                for name, c in left
            ],
            "lrl",
        )
    notes = [f"{r.spec.name}: {'; '.join(r.notes)}" for r in rows if r.notes]
    if notes:
        text += "\nNotes: " + " | ".join(notes) + "\n"
    if skipped:
        text += "\nNot run (use --all): " + ", ".join(f"{n} ({why})" for n, why in skipped) + "\n"
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"a sample of {len(QUICK)} models (and {len(TIMM_QUICK)} timm)"
    )
    parser.add_argument(
        "--timm", action="store_true", help=f"also a sample of {len(TIMM_SAMPLE)} timm models"
    )
    parser.add_argument(
        "--ultralytics", action="store_true", help="also the ultralytics models: " + ", ".join(ULTRALYTICS)
    )
    parser.add_argument(
        "--all", action="store_true", help="also the models left out for time: " + ", ".join(HEAVY)
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="just these models (torchvision names; other names are timm models)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.md", help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    specs = torchvision_specs()
    timm_names = TIMM_QUICK if args.quick else TIMM_SAMPLE
    timm_list = timm_specs(timm_names) if args.timm else []
    named = bool(args.only and set(args.only) & set(ULTRALYTICS))
    ultralytics_list, no_ultralytics = ultralytics_specs() if args.ultralytics or named else ([], None)
    if no_ultralytics:
        print(f"--ultralytics: skipped, {no_ultralytics}", file=sys.stderr)
    skipped: list[tuple[str, str]] = []
    if args.only:  # names torchvision and ultralytics do not know are taken as timm names
        wanted = set(args.only)
        known = {s.name for s in specs} | set(ULTRALYTICS)
        timm_list = timm_specs([n for n in args.only if n not in known])
        specs = [s for s in specs if s.name in wanted]
        ultralytics_list = [s for s in ultralytics_list if s.name in wanted]
    elif args.quick:
        specs = [s for s in specs if s.name in QUICK]
    elif not args.all:
        skipped = [(s.name, HEAVY[s.name]) for s in specs if s.name in HEAVY]
        specs = [s for s in specs if s.name not in HEAVY]

    started = time.perf_counter()
    sections = []
    for title, group in (("torchvision", specs), ("timm sample", timm_list), ("ultralytics", ultralytics_list)):
        if not group:
            continue
        rows = []
        for spec in group:
            row = run_one(spec)
            rows.append(row)
            print(
                f"[{time.perf_counter() - started:6.0f}s] {spec.name}: BN {row.before} | "
                f"convfuse {row.convfuse.status} -> {row.convfuse.after} ({fmt_s(row.convfuse.seconds)}s) | "
                f"torch {row.torch.status} -> {row.torch.after}" + (f" | {row.error}" if row.error else ""),
                file=sys.stderr,
                flush=True,
            )
        sections.append((title, rows))
    elapsed = time.perf_counter() - started
    text = header(
        "Zoo coverage: convfuse vs torch.fx.experimental.optimization.fuse", f"run took {elapsed:.0f} s"
    )
    text += (
        f"\nBN counts are BatchNorm executions in one forward pass (batch_norm calls plus inlined "
        f"FrozenBatchNorm2d arithmetic); WRONG = an output differs by more than {REL_TOL:g} of its scale "
        f"and more than {NOISE_FACTOR:g}x the original's own rounding error, or its structure changed "
        "(see the script's docstring). Inputs: classification 1x3x128x128 (vit_*_14 112, maxvit_t 224), "
        'detection 2 images 3x224x224 (min_size=max_size=224; "frozen BN": the backbone\'s BatchNorm2d '
        "converted to FrozenBatchNorm2d, as the builder does when weights are loaded), segmentation 1x3x128x128, video "
        "1x3x8x112x112 (s3d 16x224x224), optical flow 2x 1x3x128x128 with 3 flow updates, ultralytics "
        "1x3x256x256 (classification 224x224).\n\n"
    )
    wrong = False
    for title, rows in sections:
        text += render(title, rows, skipped if title == "torchvision" else [])
        wrong |= any(r.convfuse.status == "WRONG" for r in rows)
    emit(text, args.output)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
