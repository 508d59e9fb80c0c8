"""Zoo-wide: every torchvision model builds (weights=None), fuses, and gives the same outputs.

Slow (minutes): run with ``pytest -m slow``; benchmarks/zoo.py measures the same zoo with timings
and compares with PyTorch's own fuser.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import convfuse
from tests.conftest import norm_names, randomize_bn

pytestmark = pytest.mark.slow

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
DETECTION = torchvision.models.list_models(module=torchvision.models.detection)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)
VIDEO = torchvision.models.list_models(module=torchvision.models.video)
OPTICAL_FLOW = torchvision.models.list_models(module=torchvision.models.optical_flow)

# BatchNorms that are correctly left in place, and why (asserted, so a regression shows).
EXPECTED_LEFT = {
    "googlenet": {"aux1.conv.bn", "aux2.conv.bn"},  # auxiliary heads: never called at eval
    "inception_v3": {"AuxLogits.conv0.bn", "AuxLogits.conv1.bn"},
}


def _build(name: str, **kwargs) -> torch.nn.Module:
    builder = torchvision.models.get_model_builder(name)
    return randomize_bn(builder(weights=None, **kwargs)).eval()


def _check(name: str, model: torch.nn.Module, example) -> convfuse.FuseResult:
    result = convfuse.fuse(model, example, inplace=True)
    assert result.report.verification.passed, result.report.verification.message
    assert type(result.model) is type(model)
    return result


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification(name: str) -> None:
    size = 299 if name == "inception_v3" else 224
    model = _build(name)
    result = _check(name, model, torch.randn(1, 3, size, size))
    left = norm_names(result.model)
    if name.startswith("densenet"):  # BatchNorm after a concat of earlier features, then ReLU
        assert {r.reason for r in result.report.skipped} == {convfuse.Reason.CAT_TERMS}
    else:
        assert left == EXPECTED_LEFT.get(name, set())


@pytest.mark.parametrize("name", DETECTION)
def test_detection(name: str) -> None:
    kwargs = {"weights_backbone": None}
    if not name.startswith("ssd"):
        kwargs.update(min_size=224, max_size=224)
    model = _build(name, **kwargs)
    result = _check(name, model, ([torch.rand(3, 224, 224), torch.rand(3, 200, 240)],))
    assert norm_names(result.model) == set()


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation(name: str) -> None:
    model = _build(name, weights_backbone=None)
    result = _check(name, model, torch.randn(1, 3, 224, 224))
    assert norm_names(result.model) == set()


@pytest.mark.parametrize("name", VIDEO)
def test_video(name: str) -> None:
    frames, size = (16, 224) if name.startswith(("mvit", "swin3d", "s3d")) else (8, 112)
    model = _build(name)
    result = _check(name, model, torch.randn(1, 3, frames, size, size))
    assert norm_names(result.model) == set()


@pytest.mark.parametrize("name", OPTICAL_FLOW)
def test_optical_flow(name: str) -> None:
    model = _build(name)
    images = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    result = _check(name, model, images)
    assert norm_names(result.model) == set()
