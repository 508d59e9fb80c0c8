"""Architectures named by ``--arch``: a torchvision model name, ``timm:NAME``, or ``package.module:factory``.

Every model is built fresh, in eval mode, without downloading weights. The errors say what to type
instead: a close torchvision or timm name, the ``timm:`` form where timm has the model, or
``PYTHONPATH=.`` where the factory's module is a file in the current folder.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convfuse.errors import UsageError

__all__ = ["TIMM_PREFIX", "build_arch", "timm_alternative"]

TIMM_PREFIX = "timm:"


def build_arch(spec: str, *, device: torch.device | str | None = None) -> nn.Module:
    """A fresh model, in eval mode: ``resnet50`` (torchvision), ``timm:NAME`` or ``package.module:factory``.

    ``device``: where to build it (``"meta"`` builds only the structure: for checking which keys
    a state_dict needs). Raises UsageError naming what to type instead.
    """
    with torch.device(device) if device is not None else nullcontext():
        if spec.startswith(TIMM_PREFIX):
            return _build_timm(spec, spec[len(TIMM_PREFIX) :])
        if ":" in spec:
            return _build_factory(spec)
        return _build_torchvision(spec)


def _build_torchvision(spec: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if _timm_has(spec):
            hint = f"; timm has a model of that name: --arch {TIMM_PREFIX}{spec}"
        raise UsageError(
            f"--arch {spec}: not a torchvision model name (see torchvision.models.list_models()), "
            f"nor {TIMM_PREFIX}NAME or package.module:factory{hint}"
        )
    builder = torchvision.models.get_model_builder(spec)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # never download
    return builder(**kwargs).eval()


def _build_timm(spec: str, name: str) -> nn.Module:
    timm = _import_timm(spec)
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UsageError(f"--arch {spec}: not a timm model name (see timm.list_models()){hint}")
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as error:
        raise UsageError(f"--arch {spec}: timm.create_model({name!r}) raised {type(error).__name__}: {error}") from error
    return model.eval()


def _import_timm(spec: str) -> Any:
    try:
        import timm
    except ImportError as error:
        raise UsageError(f"--arch {spec}: timm is not installed (pip install timm)") from error
    return timm


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def timm_alternative(spec: str, keys: set[str]) -> str | None:
    """``timm:NAME`` where ``spec`` is a torchvision name whose model does not take ``keys`` but
    timm's model of that name does; None otherwise."""
    if ":" in spec or not _timm_has(spec):
        return None
    timm_spec = TIMM_PREFIX + spec
    try:
        candidate = build_arch(timm_spec, device="meta")
    except UsageError:
        return None
    return timm_spec if set(candidate.state_dict()) == keys else None


def _build_factory(spec: str) -> nn.Module:
    module_name, _, factory_name = spec.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"--arch {spec}: cannot import module {module_name} ({error}){_path_hint(module_name)}") from error
    except ImportError as error:
        raise UsageError(f"--arch {spec}: cannot import module {module_name} ({error})") from error
    try:
        for attribute in factory_name.split("."):
            factory = getattr(factory, attribute)
    except AttributeError as error:
        raise UsageError(f"--arch {spec}: cannot find {factory_name} in module {module_name} ({error})") from error
    try:
        model = factory()
    except Exception as error:
        raise UsageError(f"--arch {spec}: calling {factory_name}() raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec}: {factory_name}() returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _path_hint(module_name: str) -> str:
    """How to make a module importable: the current folder is not searched unless asked."""
    top = module_name.split(".")[0]
    if Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file():
        return f"; {top} is in the current folder, which is not searched: run with PYTHONPATH=."
    return "; install its package, or put its folder on PYTHONPATH (PYTHONPATH=. for this folder)"
