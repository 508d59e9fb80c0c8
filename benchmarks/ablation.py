"""Ablation: how many BatchNorms each family of folds removes, switched on one after another.

Over a sample of timm models (which use BatchNorm subclasses that also activate, conv subclasses,
multi-branch blocks) and torchvision's classification models, counts the BatchNorms removed:

* pairs only      adjacent conv/linear -> norm (or norm -> conv) of plain layers;
* + subclasses    norms whose forward also drops/activates, conv subclasses proven on probes;
* + beyond pairs  norms after a sum or a channel concat of producers, or after reshapes;
* + reparam       ``reparam=True``: RepVGG/MobileOne blocks merged into one conv.

The families are switched off by replacing convfuse internals for the run (documented below), so
this measures the code as shipped, minus one feature at a time. Verification is on throughout.

    python benchmarks/ablation.py [--quick] [--threads 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torchvision  # noqa: E402
from _common import emit, header, markdown_table  # noqa: E402

import convfuse  # noqa: E402
from convfuse.fold.norms import NormNotFoldable
from convfuse.fold.reasons import Combine, Reason
from convfuse.fold.table import is_norm
from convfuse.testing import randomize_bn  # noqa: E402

fuse_module = importlib.import_module("convfuse.graphs.fx_fold")
matching = importlib.import_module("convfuse.graphs.fx_match")

TIMM = [
    "efficientnet_b0", "mobilenetv3_large_100", "resnet50d", "cspdarknet53", "regnety_016", "rexnet_100",
    "ghostnet_100", "dla34", "dpn68", "tresnet_m", "repvgg_a0", "mobileone_s0", "levit_128s", "mixnet_s",
    "tf_efficientnet_b0", "hrnet_w18_small", "resnest14d", "res2net50_14w_8s", "selecsls42b", "nf_resnet50",
    "convmixer_768_32", "darknet53", "cs3darknet_s", "densenet121", "vovnet39a", "ese_vovnet19b_dw",
    "fbnetc_100", "spnasnet_100", "hardcorenas_a", "lcnet_050", "mnasnet_100", "semnasnet_100", "inception_v3",
]
QUICK_TIMM = ["efficientnet_b0", "repvgg_a0", "levit_128s", "mixnet_s", "dpn68"]
STEPS = ("pairs only", "+ subclasses", "+ beyond pairs", "+ reparam")


@contextmanager
def _only(step: str):
    """Switch off the families of folds after ``step``; restore convfuse afterwards."""
    analyse, proven, feed = fuse_module.analyse_norm, fuse_module.producer_proven, matching._feed
    try:
        if step == "pairs only":

            def plain_norms_only(norm, custom):  # a subclass's forward is never analysed
                if custom:
                    raise NormNotFoldable("switched off for the ablation")
                return analyse(norm, custom)

            fuse_module.analyse_norm = plain_norms_only
            fuse_module.producer_proven = lambda *args, **kwargs: False
        if step in ("pairs only", "+ subclasses"):

            def adjacent_only(modules, value):  # sums, concats and reshapes are not followed
                found = feed(modules, value)
                return found if isinstance(found, str) or found.combine == Combine.DIRECT else Reason.NO_PRODUCER

            matching._feed = adjacent_only
        yield
    finally:
        fuse_module.analyse_norm, fuse_module.producer_proven, matching._feed = analyse, proven, feed


def _count(
    names: list[str], build: Callable[[str], torch.nn.Module], size: Callable[[str], int], refused: dict[str, str]
) -> dict[str, list[int]]:
    totals = {step: [0, 0] for step in STEPS}
    for name in names:
        try:
            model = randomize_bn(build(name)).eval()
        except Exception as error:  # noqa: BLE001 - a model that does not build is left out, said on stderr
            print(f"{name}: not built ({error})", file=sys.stderr)
            continue
        x = torch.randn(1, 3, size(name), size(name))
        for step in STEPS:
            before = sum(1 for m in model.modules() if is_norm(m))
            try:
                with _only(step):
                    report = convfuse.fuse(model, x, reparam=step == "+ reparam").report
                removed = report.norm_layers.before - report.norm_layers.after
            except convfuse.VerificationError as error:  # counted as nothing removed, and said
                removed = 0
                refused.setdefault(name, f"{step}: {error.report.verification.message}")
            totals[step][0] += before
            totals[step][1] += removed
            print(f"{name:26s} {step:15s} {removed:4d}/{before}", file=sys.stderr, flush=True)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"timm only: {', '.join(QUICK_TIMM)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", metavar="FILE.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import timm

    refused: dict[str, str] = {}
    zoos = {"timm sample": _count(QUICK_TIMM if args.quick else TIMM, lambda n: timm.create_model(n, pretrained=False),
                                  lambda n: 224, refused)}
    if not args.quick:
        names = [n for n in torchvision.models.list_models(module=torchvision.models)
                 if n not in ("vit_h_14", "regnet_y_128gf")]
        zoos["torchvision classification"] = _count(
            names, lambda n: torchvision.models.get_model(n, weights=None),
            lambda n: 224 if n.startswith(("vit", "swin", "maxvit")) else 128, refused,
        )
    rows = []
    for zoo, totals in zoos.items():
        for step in STEPS:
            before, removed = totals[step]
            rows.append([zoo, step, f"{removed} of {before}", f"{100 * removed / max(before, 1):.1f}%"])
    text = header("Ablation: BatchNorms removed by each family of folds") + "\n" + markdown_table(
        ["zoo", "folds", "BN removed", "%"], rows, align="llrr") + "\n"
    if refused:
        text += "\nRefused by verification (counted as nothing removed):\n\n" + "".join(
            f"- {name}, {why}\n" for name, why in refused.items())
    emit(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
