"""Loading and saving: every format round-trips, every bad file is refused with a clear error,
a malicious pickle is refused and runs nothing, and saving is atomic."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import convfuse
from convfuse.errors import LoadError, SaveError, UnsafeFileError, UsageError
from convfuse.files import detect_format, writing
from tests.conftest import randomize_bn
from tests.models import ReflectNet, TinyNet, TinyNetWithSettings, TwoInputNet

ALLOW = ["tests"]  # the test models' package

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

TINY_INPUT = (1, 3, 16, 16)


def tiny(seed: int = 0) -> TinyNet:
    return randomize_bn(TinyNet(), seed).eval()


def assert_same_outputs(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(*inputs), a(*inputs), rtol=0, atol=0)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "inputs"),
    [
        (TinyNet, [TINY_INPUT]),
        (ReflectNet, [TINY_INPUT]),
        (TwoInputNet, [TINY_INPUT, (1, 2, 16, 16)]),
    ],
)
def test_whole_model_round_trips_with_its_own_class(tmp_path, cls, inputs):
    model = randomize_bn(cls(), 1).eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)

    loaded = convfuse.load(path, allow=ALLOW)

    assert type(loaded) is cls
    assert not loaded.training
    if cls is ReflectNet:
        assert loaded.conv.padding_mode == "reflect"
        assert isinstance(loaded.up, nn.ConvTranspose2d)
    assert_same_outputs(model, loaded, *(torch.randn(shape) for shape in inputs))


def test_whole_model_inside_a_checkpoint_dict(tmp_path):
    model = tiny(2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "epoch": 7}, path)

    loaded = convfuse.load(path, allow=ALLOW)

    assert type(loaded) is TinyNet
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def _wrap(state: dict, how: str) -> object:
    if how == "plain":
        return state
    if how == "dataparallel":
        return {f"module.{k}": v for k, v in state.items()}
    if how == "dataparallel_module":
        dp = nn.DataParallel(TinyNet())
        dp.module.load_state_dict(state)
        return dp.state_dict()
    if how == "compiled":
        return {f"_orig_mod.{k}": v for k, v in state.items()}
    return {how: state, "epoch": 3, "best_acc": torch.tensor(0.5).item()}


@pytest.mark.parametrize(
    "how", ["plain", "state_dict", "model", "model_state_dict", "dataparallel", "dataparallel_module", "compiled"]
)
def test_state_dict_with_factory_arch(tmp_path, how):
    model = tiny(3)
    path = tmp_path / "weights.pt"
    torch.save(_wrap(model.state_dict(), how), path)

    loaded = convfuse.load(path, arch="tests.models:build_tiny", allow=ALLOW)

    assert type(loaded) is TinyNet
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_state_dict_with_torchvision_arch(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(weights=None), 4).eval()
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": model.state_dict()}, path)

    loaded = convfuse.load(path, arch="resnet18", allow=ALLOW)

    assert type(loaded) is torchvision.models.ResNet
    assert not loaded.training
    assert_same_outputs(model, loaded, torch.randn(1, 3, 64, 64))


def test_state_dict_in_legacy_format(tmp_path):
    model = tiny(5)
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)

    assert detect_format(path) == "pickle"
    loaded = convfuse.load(path, arch="tests.models:build_tiny", allow=ALLOW)
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_torchscript_round_trips(tmp_path):
    model = tiny(6)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), path)

    with pytest.raises(UnsafeFileError, match="TorchScript archive is code"):
        convfuse.load(path)
    loaded = convfuse.load(path, trust=True)

    assert isinstance(loaded, torch.jit.ScriptModule)
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_exported_program_round_trips(tmp_path):
    model = tiny(12)
    example = torch.randn(TINY_INPUT)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (example,)), path)

    loaded = convfuse.load(path, allow=ALLOW)

    assert isinstance(loaded, torch.export.ExportedProgram)
    assert_same_outputs(model, loaded.module(), example)


# -- format detection -------------------------------------------------------------------


def test_detect_format_pickle(tmp_path):
    path = tmp_path / "m.bin"  # by content, not by name
    torch.save(tiny(), path)
    assert detect_format(path) == "pickle"


def test_detect_format_torchscript(tmp_path):
    path = tmp_path / "m.pt2"  # the name says exported; the content says TorchScript
    torch.jit.save(torch.jit.script(tiny()), path)
    assert detect_format(path) == "torchscript"


def test_detect_format_exported(tmp_path):
    path = tmp_path / "m.pt"
    program = torch.export.export(tiny(), (torch.randn(TINY_INPUT),))
    torch.export.save(program, path)
    assert detect_format(path) == "exported"


_NET_SOURCE = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))
"""


def test_detect_format_torchscript_of_a_class_in_a_models_package(tmp_path, monkeypatch):
    """Its code lies under code/__torch__/.../models/..., a folder name torch.export.save also uses."""
    package = tmp_path / "src" / "convfuse_test_zoo" / "models"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text(_NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    module = importlib.import_module("convfuse_test_zoo.models.net")
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(randomize_bn(module.Net(), 0).eval()), path)

    assert detect_format(path) == "torchscript"


def test_detect_format_state_dict_is_pickle(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny().state_dict(), path)
    assert detect_format(path) == "pickle"


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a model at all\n" * 10), "not a PyTorch model file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: _zip_of_text(p), "zip archive"),
    ],
    ids=["garbage", "empty", "foreign-zip"],
)
def test_detect_format_refuses_other_files(tmp_path, make, message):
    path = tmp_path / "thing.pt"
    make(path)
    with pytest.raises(LoadError, match=message) as info:
        detect_format(path)
    assert str(path) in str(info.value)


# -- load errors ------------------------------------------------------------------------


def _truncated_zip(path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(tiny(), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _truncated_legacy(path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(tiny().state_dict(), buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])


def _damaged_pickle(path: Path) -> None:
    path.write_bytes(b"\x80\x04" + os.urandom(64))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: p.write_bytes(b"\x00garbage\xff" * 100), "not a PyTorch model file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (_truncated_zip, "truncated|damaged"),
        (_truncated_legacy, "truncated|damaged"),
        (_damaged_pickle, "truncated|damaged"),
        (lambda p: torch.save(torch.randn(3), p), "Tensor"),
        (lambda p: torch.save([torch.randn(3), torch.randn(2)], p), "list"),
        (lambda p: torch.save({"name": "resnet", "epochs": 3}, p), "neither a model nor a state_dict"),
    ],
    ids=["missing", "directory", "garbage", "empty", "truncated-zip", "truncated-legacy", "damaged-pickle",
         "tensor", "list", "dict-of-other-things"],
)
def test_load_errors_name_the_file(tmp_path, make, message):
    path = tmp_path / "input.pt"
    make(path)
    with pytest.raises(LoadError, match=message) as info:
        convfuse.load(path, allow=ALLOW)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnsafeFileError)


def test_state_dict_without_arch_asks_for_arch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": tiny().state_dict()}, path)
    with pytest.raises(UsageError, match="--arch"):
        convfuse.load(path, allow=ALLOW)


def test_whole_model_with_arch_is_a_usage_error(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(tiny(), path)
    with pytest.raises(UsageError, match="--arch"):
        convfuse.load(path, arch="resnet18", allow=ALLOW)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("resnet81", "resnet18"),  # a typo: the message suggests the name
        ("tests.models:no_such_factory", "no_such_factory"),
        ("no_such_package_xyz.models:build", "no_such_package_xyz"),
        ("tests.models:build_not_a_model", "not an nn.Module"),
    ],
)
def test_unknown_arch(tmp_path, arch, message):
    path = tmp_path / "sd.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(UsageError, match=message) as info:
        convfuse.load(path, arch=arch, allow=ALLOW)
    assert arch in str(info.value)


def _drop(state):
    del state["bn2.running_var"]
    return "bn2.running_var"


def _extra(state):
    state["head.weight"] = torch.randn(2, 4)
    return "head.weight"


def _reshape(state):
    state["conv2.weight"] = torch.randn(4, 8, 5, 5)
    return "conv2.weight"


@pytest.mark.parametrize("mutate", [_drop, _extra, _reshape], ids=["missing-key", "unexpected-key", "size-mismatch"])
def test_state_dict_that_does_not_fit_names_the_keys(tmp_path, mutate):
    state = tiny().state_dict()
    key = mutate(state)
    path = tmp_path / "sd.pt"
    torch.save(state, path)
    with pytest.raises(LoadError, match="does not fit") as info:
        convfuse.load(path, arch="tests.models:build_tiny", allow=ALLOW)
    assert key in str(info.value)
    assert "tests.models:build_tiny" in str(info.value)


def test_state_dict_for_another_torchvision_model(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(LoadError, match="does not fit --arch resnet18") as info:
        convfuse.load(path, arch="resnet18", allow=ALLOW)
    assert "conv2.weight" in str(info.value)  # TinyNet's key that resnet18 lacks


def test_class_that_cannot_be_imported(tmp_path, monkeypatch):
    name = "convfuse_vanishing_models"
    source = tmp_path / "src"
    source.mkdir()
    (source / f"{name}.py").write_text(
        "from torch import nn\n\nclass Vanishing(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 3, 1)\n"
    )
    monkeypatch.syspath_prepend(str(source))
    module = importlib.import_module(name)
    path = tmp_path / "m.pt"
    torch.save(module.Vanishing().eval(), path)
    (source / f"{name}.py").unlink()
    monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()

    with pytest.raises(LoadError, match=f"{name}.Vanishing cannot be imported") as info:
        convfuse.load(path, allow=[name])
    assert not isinstance(info.value, UnsafeFileError)


# -- the safe-loading policy ------------------------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Subprocess:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.check_call, (["touch", str(self.marker)],))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _global_name(function) -> str:
    return f"{function.__module__}.{function.__name__}"


PAYLOADS = [(_System, os.system), (_Subprocess, subprocess.check_call), (_Eval, eval)]


def _container(payload, where: str):
    if where == "top":
        return payload
    if where == "checkpoint":
        return {"state_dict": payload, "epoch": 1}
    model = tiny()
    model.payload = payload  # hidden in an attribute of a real model
    return model


@pytest.mark.parametrize("where", ["top", "checkpoint", "model-attribute"])
@pytest.mark.parametrize(("payload", "function"), PAYLOADS, ids=["os.system", "subprocess", "eval"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, payload, function, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_container(payload(marker), where), path)

    with pytest.raises(UnsafeFileError) as info:
        convfuse.load(path, allow=ALLOW)

    message = str(info.value)
    assert _global_name(function) in message
    assert "--trust" in message
    assert str(path) in message
    assert not marker.exists()


@pytest.mark.parametrize(("payload", "function"), PAYLOADS, ids=["os.system", "subprocess", "eval"])
def test_the_payload_is_real_with_trust(tmp_path, payload, function):
    """The control for the test above: the same file does run its code when trusted."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(payload(marker), path)

    with pytest.raises(LoadError, match="not a model"):
        convfuse.load(path, trust=True)
    assert marker.exists()


class _CallsModuleClass:
    def __init__(self, factory, args) -> None:
        self.factory, self.args = factory, args

    def __reduce__(self):
        return (self.factory, self.args)


@pytest.mark.parametrize(
    ("factory", "args"), [(TinyNet, ()), (nn.Linear, (3, 4))], ids=["user-class", "torch-class"]
)
def test_pickle_calling_a_module_constructor_is_refused(tmp_path, factory, args):
    path = tmp_path / "ctor.pt"
    torch.save(_CallsModuleClass(factory, args), path)

    with pytest.raises(UnsafeFileError, match="constructor") as info:
        convfuse.load(path, allow=ALLOW)
    assert factory.__name__ in str(info.value)
    assert "--trust" in str(info.value)
    loaded = convfuse.load(path, trust=True)  # the control: the file does call it
    assert type(loaded) is factory


def _graph_module_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = tiny(7)
    gm = torch.fx.symbolic_trace(model)
    path = tmp_path / "gm.pt"
    torch.save(gm, path)
    return model, path


def test_graph_module_pickle_is_refused(tmp_path):
    _, path = _graph_module_file(tmp_path)
    with pytest.raises(UnsafeFileError, match="--trust"):
        convfuse.load(path, allow=ALLOW)


def test_graph_module_refusal_names_graph_module(tmp_path):
    _, path = _graph_module_file(tmp_path)
    with pytest.raises(UnsafeFileError, match="GraphModule"):
        convfuse.load(path, allow=ALLOW)


def test_graph_module_loads_with_trust(tmp_path):
    model, path = _graph_module_file(tmp_path)
    loaded = convfuse.load(path, trust=True)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_plain_data_object_of_an_allowed_package_loads(tmp_path):
    model = randomize_bn(TinyNetWithSettings(), 8).eval()
    path = tmp_path / "m.pt"
    torch.save(model, path)

    with pytest.raises(UnsafeFileError, match="--allow tests"):
        convfuse.load(path)
    loaded = convfuse.load(path, allow=ALLOW)
    assert type(loaded) is TinyNetWithSettings
    assert loaded.settings.name == model.settings.name
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


# -- saving -----------------------------------------------------------------------------


def test_save_creates_the_folder_and_leaves_only_the_file(tmp_path):
    model = tiny(10)
    target = tmp_path / "a" / "b" / "fused.pt"

    convfuse.save(model, target)

    assert files_in(target.parent) == ["fused.pt"]
    assert detect_format(target) == "pickle"
    for loaded in (convfuse.load(target, allow=ALLOW), torch.load(target, weights_only=False)):
        assert type(loaded) is TinyNet
        assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_save_writes_a_temporary_file_beside_the_target_then_renames(tmp_path, monkeypatch):
    target = tmp_path / "out" / "fused.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src), Path(dst)))
        assert target.read_bytes() == b"old"  # the target is untouched until the rename
        real_replace(src, dst)

    monkeypatch.setattr(writing.os, "replace", replace)
    convfuse.save(tiny(), target)

    assert len(calls) == 1
    src, dst = calls[0]
    assert dst == target
    assert src.parent == target.parent and src != target
    assert files_in(target.parent) == ["fused.pt"]
    assert type(convfuse.load(target, allow=ALLOW)) is TinyNet


class _Unpicklable(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.activation = lambda x: x  # a lambda cannot be pickled


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, existing):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "fused.pt"
    if existing:
        target.write_bytes(b"previous model")

    with pytest.raises(SaveError) as info:
        convfuse.save(_Unpicklable().eval(), target)

    assert str(target) in str(info.value)
    assert files_in(folder) == (["fused.pt"] if existing else [])
    if existing:
        assert target.read_bytes() == b"previous model"


def test_failed_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "fused.pt"

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing.os, "replace", replace)
    with pytest.raises(SaveError, match="No space left"):
        convfuse.save(tiny(), target)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_save_to_an_unwritable_place(tmp_path, where):
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "adir").mkdir()
    target = tmp_path / "afile" / "fused.pt" if where == "under-a-file" else tmp_path / "adir"

    with pytest.raises(SaveError) as info:
        convfuse.save(tiny(), target)

    assert str(target) in str(info.value)
    assert files_in(tmp_path) == ["adir", "afile"]
    assert (tmp_path / "afile").read_bytes() == b"x"
    assert files_in(tmp_path / "adir") == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_save_into_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SaveError, match="cannot be written"):
            convfuse.save(tiny(), folder / "fused.pt")
        assert files_in(folder) == []
    finally:
        folder.chmod(0o755)


def test_save_as_torchscript(tmp_path):
    model = tiny(11)
    target = tmp_path / "fused.ts"
    convfuse.save(model, target, format="torchscript")

    assert detect_format(target) == "torchscript"
    loaded = convfuse.load(target, trust=True)
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert_same_outputs(model, loaded, torch.randn(TINY_INPUT))


def test_save_with_an_unknown_format(tmp_path):
    with pytest.raises(UsageError, match="onnx"):
        convfuse.save(tiny(), tmp_path / "m.onnx", format="onnx")
    assert files_in(tmp_path) == []


def test_saved_file_gets_normal_permissions(tmp_path):
    target = tmp_path / "fused.pt"
    umask = os.umask(0o022)
    try:
        convfuse.save(tiny(), target)
    finally:
        os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o644


def test_a_module_that_fails_on_import_is_a_load_error(tmp_path, monkeypatch):
    """The file names a class whose module raises when imported: one clear LoadError, no traceback."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "boom_models.py").write_text(
        "import torch\n\nclass Net(torch.nn.Sequential):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(package))
    import boom_models

    model = boom_models.Net(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.save(model, tmp_path / "model.pt")
    (package / "boom_models.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.delitem(sys.modules, "boom_models")
    with pytest.raises(convfuse.LoadError, match=r"model\.pt: .*boom_models.*raised RuntimeError when imported: broken at import"):
        convfuse.load(tmp_path / "model.pt", allow=["boom_models"])


class _CallsRecorder:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        from tests.models import Recorder

        return (Recorder, (self.marker,))


def test_scan_reads_the_record_torch_loads_not_a_decoy(tmp_path):
    """An archive whose scanned-looking member is harmless but whose real data.pkl calls a module
    constructor is refused: the scan reads what torch reads."""
    import pickle

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(tiny(), buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    root = source.namelist()[0].split("/")[0]
    with zipfile.ZipFile(tmp_path / "decoy.pt", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/adata.pkl", source.read(f"{root}/data.pkl"))  # listed first
        for name in source.namelist():
            data = pickle.dumps(_CallsRecorder(marker), protocol=2) if name.endswith("/data.pkl") else source.read(name)
            archive.writestr(name, data)
    with pytest.raises(UnsafeFileError, match="constructor of tests.models.Recorder"):
        convfuse.load(tmp_path / "decoy.pt", allow=ALLOW)
    assert not marker.exists()


def test_scan_reads_every_pickle_of_the_legacy_format(tmp_path):
    """The fifth pickle of a legacy file (its storage keys) is loaded by torch too."""
    import pickle

    marker = tmp_path / "pwned"
    with open(tmp_path / "legacy.pt", "wb") as f:
        for part in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                     {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                     {"weights": 1}, _CallsRecorder(marker)):
            pickle.dump(part, f, protocol=2)
    with pytest.raises(UnsafeFileError, match="constructor of tests.models.Recorder"):
        convfuse.load(tmp_path / "legacy.pt", allow=ALLOW)
    assert not marker.exists()


def test_temporary_hooks_never_replace_a_loaded_models_own(tmp_path):
    """Hook ids come from a per-process counter; a model from another process may hold the ids
    convfuse's own hooks would get next. Its hook must survive and keep its pair unfused."""
    from torch.utils.hooks import RemovableHandle

    from tests.models import double_output

    model = tiny()
    handle = model.bn2.register_forward_hook(double_output)
    hooks = model.bn2._forward_hooks
    hooks[RemovableHandle.next_id + 2] = hooks.pop(handle.id)  # as saved by another process
    x = torch.randn(*TINY_INPUT)
    with torch.no_grad():
        expected = model(x)
    result = convfuse.fuse(model, x, inplace=True)
    assert list(model.bn2._forward_hooks.values()) == [double_output]
    assert {s.norm: s.reason for s in result.report.skipped}["bn2"] == convfuse.Reason.HOOKS
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
