"""Checkpoint containers of training frameworks: where a file's model lies, and the fused one written back there.

What frameworks write (read from their source):

- ultralytics (``engine/trainer.py`` ``save_model``): ``last.pt`` is a dict with ``model: None`` and
  the float16 model under ``ema``, with the optimizer, ``train_args`` and metrics; ``best.pt`` (after
  ``utils/torch_utils.py`` ``strip_optimizer``) has the model under ``model`` and ``ema: None``. Its
  loader (``nn/tasks.py``) takes ``ckpt.get("ema") or ckpt["model"]``.
- Lightning (``_dump_checkpoint``): ``state_dict`` is the LightningModule's, so a network held as
  ``self.model`` has keys prefixed ``model.``; beside it ``epoch``, ``global_step``, ``loops``,
  ``optimizer_states``, ``hyper_parameters``, ...
- timm (``utils/checkpoint_saver.py``, ``models/_helpers.py``): ``state_dict`` and ``state_dict_ema``
  beside ``args`` (an ``argparse.Namespace``); its loader prefers ``state_dict_ema`` and strips
  ``module.`` / ``_orig_mod.`` (DataParallel, torch.compile).
- plain training loops: ``model_state_dict`` / ``state_dict`` / ``model`` beside the optimizer.

So a module is looked for under ``ema`` then ``model`` (ultralytics' order), a state_dict under the
EMA keys first (timm's order), and a key prefix is stripped where that makes the keys fit ``--arch``.
Every other key of the container is kept, and the fused model (or state_dict) is written back in
its place, so the framework's own loader takes the output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from convfuse.errors import LoadError, UsageError
from convfuse.files.architectures import build_arch, timm_alternative
from convfuse.files.safetensors import safetensors_metadata

MODULE_KEYS = ("ema", "model", "module", "net")
"""Keys under which checkpoints hold a whole module, in the order ultralytics' loader takes them."""


STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model", "module", "net", "ema")
"""Keys under which checkpoints hold a state_dict; EMA weights first, as timm's loader takes them."""


KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes of wrappers: DataParallel/DDP, torch.compile, a LightningModule's ``self.model``."""


@dataclass
class Loaded:
    """What a model file held and where: enough to write the fused model back in the same place."""

    model: Any
    format: str = "pickle"
    container: Mapping[str, Any] | None = None
    """The checkpoint dict the model was found in; None where the file held the model (or state_dict) itself."""
    key: str | None = None
    """The container's key that held the model or its state_dict."""
    stored: str = "module"
    """'module' (a whole model was stored) or 'state_dict' (weights, filled into ``--arch``)."""
    prefix: str = ""
    """The prefix stripped from the state_dict's keys; written back on them."""
    rest: dict[str, Any] = field(default_factory=dict)
    """State_dict entries outside ``prefix`` (e.g. a Lightning module's loss buffers), kept as they were."""
    metadata: dict[str, str] | None = None
    """A safetensors file's header metadata, kept."""

    @property
    def kept(self) -> list[str]:
        """The container's other keys: written back unchanged."""
        return [key for key in self.container if key != self.key] if self.container is not None else []


# -- finding the model ------------------------------------------------------------------


def find_model(
    path: Path, obj: Any, *, arch: str | None, prefix: str | None = None, fmt: str = "pickle"
) -> Loaded:
    """The model a loaded object holds: itself, a module in a checkpoint dict, or ``arch`` filled
    with a state_dict (the file's own, or one in a checkpoint dict).

    Raises:
        UsageError: a state_dict without ``arch``, ``arch`` or ``prefix`` for a whole model.
        LoadError: no model in it (the message lists the keys seen), or weights that do not fit ``arch``.
    """
    metadata = safetensors_metadata(path) if fmt == "safetensors" else None
    if isinstance(obj, nn.Module):
        _check_module_options(path, arch, prefix)
        found = Loaded(obj, fmt)
    elif not isinstance(obj, Mapping):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a model")
    elif _is_state_dict(obj):
        found = _filled(path, obj, arch, prefix, Loaded(None, fmt, stored="state_dict", metadata=metadata))
    else:
        found = _in_container(path, obj, arch, prefix, fmt)
    return found


def _check_module_options(path: Path, arch: str | None, prefix: str | None) -> None:
    if arch is not None:
        raise UsageError(f"{path}: holds a whole model; --arch is only for state_dict files")
    if prefix is not None:
        raise UsageError(f"{path}: holds a whole model; --prefix is only for state_dict files")


def _in_container(path: Path, container: Mapping[str, Any], arch: str | None, prefix: str | None, fmt: str) -> Loaded:
    for key in MODULE_KEYS:
        if isinstance(container.get(key), nn.Module):
            _check_module_options(path, arch, prefix)
            return Loaded(container[key], fmt, container, key)
    for key in STATE_DICT_KEYS:
        value = container.get(key)
        if isinstance(value, Mapping) and _is_state_dict(value):
            return _filled(path, value, arch, prefix, Loaded(None, fmt, container, key, "state_dict"))
    seen = ", ".join(f"{key!r} ({_kind(value)})" for key, value in list(container.items())[:12])
    more = f", ... {len(container) - 12} more" if len(container) > 12 else ""
    raise LoadError(
        f"{path}: holds a dict that is neither a model nor a state_dict, nor holds one (keys: {seen}{more}); convfuse looks for a "
        f"model under {'/'.join(MODULE_KEYS)} and a state_dict under {'/'.join(STATE_DICT_KEYS)}"
    )


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    """Tensors by name (``_extra_state`` entries may hold anything)."""
    return bool(obj) and all(
        isinstance(key, str) and (isinstance(value, Tensor) or key.endswith("_extra_state")) for key, value in obj.items()
    )


# -- a state_dict into --arch -----------------------------------------------------------


@dataclass
class _Candidate:
    """A reading of a state_dict: its keys with ``prefix`` stripped, and the entries outside it."""

    prefix: str
    state: dict[str, Any]
    rest: dict[str, Any]


def _filled(path: Path, state: Mapping[str, Any], arch: str | None, prefix: str | None, found: Loaded) -> Loaded:
    if arch is None:
        raise UsageError(
            f"{path}: holds a state_dict (weights without the architecture){_where(found)}; name the architecture "
            "with --arch, e.g. --arch resnet50, --arch timm:efficientnet_b0 or --arch mypackage.models:build"
        )
    model = build_arch(arch)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    candidates = [_named_prefix(path, state, prefix)] if prefix is not None else _prefix_candidates(state)
    fitting = next((c for c in candidates if not _misfit(expected, c.state)), None)
    if fitting is None:
        closest = max(candidates, key=lambda c: len(set(c.state) & set(expected)))
        raise LoadError(_misfit_message(path, arch, expected, state, closest, found))
    model.load_state_dict(fitting.state)
    found.model, found.prefix, found.rest = model.eval(), fitting.prefix, fitting.rest
    return found


def _where(found: Loaded) -> str:
    return f" under {found.key!r}" if found.key is not None else ""


def _named_prefix(path: Path, state: Mapping[str, Any], prefix: str) -> _Candidate:
    inside = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not inside:
        raise UsageError(
            f"{path}: no key of the state_dict starts with --prefix {prefix!r}; its keys start with "
            f"{_first_parts(state)}"
        )
    return _Candidate(prefix, inside, {key: value for key, value in state.items() if not key.startswith(prefix)})


def _prefix_candidates(state: Mapping[str, Any]) -> list[_Candidate]:
    """The keys as they are, then with each known wrapper prefix that all of them share stripped in turn."""
    candidates = [_Candidate("", dict(state), {})]
    while True:
        current = candidates[-1]
        prefix = next((p for p in KNOWN_PREFIXES if all(key.startswith(p) for key in current.state)), None)
        if prefix is None:
            return candidates
        stripped = {key[len(prefix) :]: value for key, value in current.state.items()}
        candidates.append(_Candidate(current.prefix + prefix, stripped, {}))


def _misfit(expected: dict[str, tuple[int, ...]], state: Mapping[str, Any]) -> list[str]:
    """What keeps ``state`` from loading into a model whose state_dict has ``expected`` shapes."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} in the file, {shape} in the model"
        for key, shape in expected.items()
        if key in state and isinstance(state[key], Tensor) and tuple(state[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''} ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''} ({_some(unexpected)})")
    if mismatched:
        problems.append(f"size mismatch: {_some(mismatched)}")
    return problems


def _misfit_message(
    path: Path, arch: str, expected: dict[str, tuple[int, ...]], state: Mapping[str, Any], closest: _Candidate,
    found: Loaded,
) -> str:
    stripped = f" (with {closest.prefix!r} stripped from its keys)" if closest.prefix else ""
    message = f"{path}: the state_dict{_where(found)}{stripped} does not fit --arch {arch}: " + "; ".join(
        _misfit(expected, closest.state)
    )
    hints = []
    timm_spec = timm_alternative(arch, set(closest.state))
    if timm_spec is not None:
        hints.append(f"it fits timm's model of that name: use --arch {timm_spec}")
    for prefix in _first_part_prefixes(state):
        if prefix != closest.prefix and not _misfit(expected, _named_prefix(path, state, prefix).state):
            hints.append(f"its keys under {prefix!r} fit: add --prefix {prefix}")
            break
    return message + "".join(f"; {hint}" for hint in hints)


def _first_part_prefixes(state: Mapping[str, Any]) -> list[str]:
    counts = Counter(key.split(".", 1)[0] + "." for key in state if "." in key)
    return [prefix for prefix, _ in counts.most_common()]


def _first_parts(state: Mapping[str, Any]) -> str:
    counts = Counter(key.split(".", 1)[0] + "." if "." in key else key for key in state)
    return _some([f"{prefix!r} ({count})" for prefix, count in counts.most_common()])


def _some(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")
