"""The trust boundary (DESIGN.md, Security): without --trust a model file runs no code it chose.

Every route a crafted file could take is a file from ``tests/attacks.py`` that would leave a marker
file if its code ran. Without --trust: the load is refused, from Python (UnsafeFileError) and from
the command line (exit 2, one stderr line naming what was refused and the flag, nothing written),
and the marker is absent. The control shows each payload is real: trusted, it leaves the marker.
The legitimate files that must keep loading without a flag are at the end.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import convfuse
from convfuse.cli import app
from convfuse.errors import LoadError, SaveError, UnsafeFileError
from convfuse.files import archives, unpickler
from tests import attacks
from tests.conftest import randomize_bn
from tests.models import MARKER_ENV, LayerFactoryNet, TinyNet

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
X = (1, 3, 16, 16)
runner = CliRunner()


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "marker"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


def x() -> torch.Tensor:
    return torch.randn(X)


def model_of(loaded: Any) -> nn.Module:
    return loaded["model"] if isinstance(loaded, dict) else loaded


@dataclass(frozen=True)
class Route:
    """A crafted file, what the refusal must name, and (the control) what makes its code run
    once the file is trusted: ``None`` where loading alone does, ``False`` for no control."""

    build: Callable[[Path, Path], Path]
    names: str
    allow: tuple[str, ...] = ("tests",)
    suffix: str = ".pt"
    runs: Callable[[Any], Any] | None | bool = None


def _eval(model: Any) -> Any:
    return model_of(model).eval()


ROUTES = {
    # 1. calls with the file's arguments
    "constructor-call": Route(attacks.constructor_call, "constructor of tests.models.Recorder"),
    "rebuild-from-type": Route(attacks.rebuild_from_type, "Recorder"),
    # (torch no longer calls hooks stored this way; refused all the same, so no control)
    "tensor-backward-hooks": Route(attacks.tensor_backward_hooks, "backward hooks", runs=False),
    # 2. callables where torch would call them
    "partial-of-a-class": Route(attacks.partial_of_a_class, "functools.partial", runs=lambda m: m.make()),
    "shadow-_call_impl": Route(attacks.shadowing("_call_impl"), "_call_impl", runs=lambda m: m(x())),
    "shadow-_compiled_call_impl": Route(
        attacks.shadowing("_compiled_call_impl"), "_compiled_call_impl", runs=lambda m: m(x())
    ),
    "shadow-train": Route(attacks.shadowing("train"), "'train'", runs=_eval),
    "shadow-_apply": Route(attacks.shadowing("_apply"), "_apply", runs=lambda m: m.float()),
    "shadow-named_modules": Route(
        attacks.shadowing("named_modules"), "named_modules", runs=lambda m: convfuse.fuse(m, x())
    ),
    "shadow-extra_repr": Route(attacks.shadowing("extra_repr"), "extra_repr", runs=repr),
    "shadow-forward": Route(attacks.shadowing("forward"), "forward", runs=lambda m: m(x())),
    "shadow-__deepcopy__": Route(attacks.shadowing("__deepcopy__"), "__deepcopy__", runs=copy.deepcopy),
    "shadow-__reduce_ex__": Route(
        attacks.shadowing("__reduce_ex__"), "__reduce_ex__", runs=lambda m: torch.save(m, io.BytesIO())
    ),
    "shadow-conv-_conv_forward": Route(
        attacks.shadowing("_conv_forward", "conv1"), "_conv_forward", runs=lambda m: m(x())
    ),
    "forward-hook": Route(attacks.forward_hook, "_forward_hooks", runs=lambda m: m(x())),
    "module-outside-the-tree": Route(
        attacks.module_outside_the_tree, "outside the module tree", runs=lambda m: m.hidden(x())
    ),
    "not-a-tensor-in-parameters": Route(attacks.not_a_tensor_in_parameters, "Recorder"),
    "deferred-call-in-a-data-object": Route(
        attacks.deferred_call_in_a_data_object, "LazyString", allow=(), runs=lambda m: convfuse.fuse(m, x())
    ),
    # (torch's full unpickler trips over _LazyModule's __getattr__ first: the control is in memory, below)
    "chained-wrappers": Route(attacks.chained_wrappers, "neither an nn.Module nor", allow=(), runs=False),
    "module-with-its-own-setstate": Route(
        attacks.module_with_its_own_setstate, "__setstate__", allow=(), runs=False
    ),
    "allocation-by-argument": Route(attacks.allocation_by_argument, "bytearray of a size", runs=False),
    "numpy-array-of-any-shape": Route(attacks.numpy_array_of_any_shape, "numpy.ndarray", runs=False),
    "a-class-as-a-value": Route(attacks.a_class_as_a_value, "as a value", runs=lambda m: m.factory(os.environ[MARKER_ENV])),
    "numpy-object-array": Route(attacks.numpy_object_array, "numpy array of Python objects", runs=False),
    "shadowed-parameter": Route(attacks.shadowed_parameter, "both in _parameters and in _buffers", allow=(),
                                runs=False),
    # 4. the reader and the load must read the same bytes
    "legacy-with-a-zip-decoy": Route(attacks.legacy_with_a_zip_decoy, "constructor of tests.models.Recorder"),
    # 5. TorchScript is code
    "torchscript-setstate": Route(attacks.torchscript_setstate, "TorchScript", allow=(), suffix=".ts"),
    # 6. ExportedProgram archives can carry code
    "exported-guard-code": Route(
        attacks.exported_guard_code, "guard code", allow=(), suffix=".pt2",
        runs=lambda p: p.module()(torch.randn(attacks.SMALL_INPUT)),
    ),
    "exported-sympy-eval": Route(attacks.exported_sympy_eval, "symbolic expression", allow=(), suffix=".pt2"),
    "exported-file-io": Route(
        attacks.exported_file_io, "aten.from_file", allow=(), suffix=".pt2",
        runs=lambda p: p.module()(torch.randn(attacks.SMALL_INPUT)),
    ),
    "exported-sympy-string-argument": Route(
        attacks.exported_sympy_string_argument, "where sympy would parse it", allow=(), suffix=".pt2"
    ),
    "exported-dunder-target": Route(
        attacks.exported_dunder_target, "torch.ops.aten.__class__", allow=(), suffix=".pt2", runs=False
    ),
    "exported-deep-json": Route(attacks.exported_deep_json, "nested deeper", allow=(), suffix=".pt2", runs=False),
    "exported-huge-weight-view": Route(
        attacks.exported_huge_weight_view, "views a storage of 108 elements", allow=(), suffix=".pt2", runs=False
    ),
    "exported-aoti-payload": Route(
        attacks.exported_aoti_payload, "AOTInductor", allow=(), suffix=".pt2", runs=False
    ),
}


def crafted(tmp_path: Path, marker: Path, name: str) -> Path:
    route = ROUTES[name]
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        path = route.build(folder / f"crafted{route.suffix}", marker)
    except RuntimeError as error:  # e.g. no C compiler for the AOTInductor library
        pytest.skip(f"cannot build the file: {error}")
    assert not marker.exists(), "building the file ran its payload"
    return path


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_is_refused_and_runs_nothing(tmp_path, marker, name):
    route = ROUTES[name]
    path = crafted(tmp_path, marker, name)

    with pytest.raises(UnsafeFileError) as info:
        convfuse.load(path, allow=route.allow)

    message = str(info.value)
    assert route.names in message
    assert str(path) in message and "--trust" in message
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_on_the_command_line(tmp_path, marker, name):
    route = ROUTES[name]
    path = crafted(tmp_path, marker, name)
    before = sorted(p.name for p in path.parent.iterdir())
    target = tmp_path / "out" / f"fused{route.suffix}"
    allow = [arg for package in route.allow for arg in ("--allow", package)]

    result = runner.invoke(app, [str(path), "-o", str(target), "--input-shape", "1,3,16,16", *allow],
                           env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None, "CONVFUSE_ALLOW": None})

    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert route.names in lines[0] and "--trust" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == before
    assert not marker.exists()


@pytest.mark.parametrize("name", [n for n, r in ROUTES.items() if r.runs is not False])
def test_the_payload_is_real_when_trusted(tmp_path, marker, name):
    """The control: trusted, the same file does run its code (at load, or where torch calls it)."""
    route = ROUTES[name]
    path = crafted(tmp_path, marker, name)
    try:
        loaded = convfuse.load(path, trust=True)
        if route.runs is not None:
            route.runs(loaded)
    except Exception:  # the payload may break what it hijacks; it ran all the same
        pass
    assert marker.exists()


def test_the_chained_gadgets_are_real(tmp_path, marker):
    """The control for the two routes above whose payload torch's own unpickler cannot rebuild:
    the same objects, made in memory, run the shell command when formatted or given their state."""
    with pytest.raises(TypeError):  # os.system returns an int: __str__ "fails", after running it
        str(attacks._shell(f"touch {marker}"))
    assert marker.exists()
    marker.unlink()
    from torch._dynamo.eval_frame import OptimizedModule

    attacks.module_with_its_own_setstate(tmp_path / "m.pt", marker)
    holder = torch.load(tmp_path / "m.pt", weights_only=False, pickle_module=_DictFilling)
    assert not marker.exists()
    OptimizedModule.__setstate__(holder["model"], holder["model"].__dict__.copy())
    assert marker.exists()


class _DictFilling:
    """A pickle module whose BUILD only fills ``__dict__``, as convfuse's did: enough to rebuild the
    gadget objects without calling their methods."""

    class Unpickler(pickle._Unpickler):  # type: ignore[name-defined, misc]
        dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

        def load_build(self) -> None:
            state = self.stack.pop()
            self.stack[-1].__dict__.update(state)

        dispatch[pickle.BUILD[0]] = load_build

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _DictFilling.Unpickler(file, **kwargs).load()


def test_rebuild_from_type_of_a_torch_tensor_type_still_loads(tmp_path):
    """torch.save itself uses _rebuild_from_type_v2 for tensors with Python attributes."""
    tensor = torch.randn(3)
    tensor.note = "a plain attribute"
    torch.save({"model": TinyNet().eval(), "extra": tensor}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded["extra"].note == "a plain attribute"
    model = convfuse.load(tmp_path / "m.pt", allow=["tests"])
    assert type(model) is TinyNet


def test_the_legacy_tar_format_is_never_unpacked(tmp_path):
    """torch's tar loader would extract a hard link (and chmod the file it points to) or block on a
    FIFO; convfuse hands torch a stream, so the tar path is never taken."""
    import stat
    import tarfile

    victim = tmp_path / "victim.txt"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    link = tarfile.TarInfo("storages")
    link.type, link.linkname, link.mode = tarfile.LNKTYPE, str(victim), 0o777
    path = attacks.legacy_tar(tmp_path / "hardlink.pt", link)
    with pytest.raises(LoadError):
        convfuse.load(path)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    fifo = tarfile.TarInfo("storages")
    fifo.type = tarfile.FIFOTYPE
    path = attacks.legacy_tar(tmp_path / "fifo.pt", fifo)
    proc = subprocess.run([sys.executable, "-c", f"import convfuse; convfuse.load({str(path)!r})"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 1 and "LoadError" in proc.stderr


def test_many_modules_are_checked_in_linear_time(tmp_path):
    """20,000 modules sharing one state cost a few bytes each in the file; the object-graph check
    must not be quadratic in them (it once was: 72 s)."""
    template = nn.Identity()
    modules = [attacks.AsNewObj(nn.Identity, dict(vars(template))) for _ in range(20_000)]
    torch.save({"state_dict": TinyNet().state_dict(), "many": modules}, tmp_path / "m.pt")
    assert type(convfuse.load(tmp_path / "m.pt", arch="tests.models:build_tiny")) is TinyNet


def test_a_model_that_exits_while_it_runs_is_exit_2(tmp_path):
    from tests.models import ExitsNet

    torch.save(randomize_bn(ExitsNet()).eval(), tmp_path / "m.pt")
    result = runner.invoke(app, [str(tmp_path / "m.pt"), "-o", str(tmp_path / "f.pt"), "--allow", "tests",
                                 "--input-shape", "1,3,16,16"], env={"CONVFUSE_DEBUG": None})
    assert result.exit_code == 2, result.output
    assert "sys.exit(0)" in result.stderr
    assert not (tmp_path / "f.pt").exists()


# -- 3. imports made to classify a name --------------------------------------------------


def _module_file(folder: Path, name: str, body: str) -> None:
    path = folder.joinpath(*name.split("."))
    if "." in name:
        for parent in [folder.joinpath(*name.split(".")[:i]) for i in range(1, len(name.split(".")))]:
            parent.mkdir(exist_ok=True)
            (parent / "__init__.py").touch()
    path.with_suffix(".py").write_text(body)


MARKS_AT_IMPORT = "import os\nopen(os.environ['CONVFUSE_TEST_MARKER'], 'w').close()\n"


def test_a_package_that_is_not_allowed_is_never_imported(tmp_path, marker, monkeypatch):
    _module_file(tmp_path, "cfz_not_allowed", MARKS_AT_IMPORT + "import torch\nclass Net(torch.nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = attacks.naming("cfz_not_allowed")(tmp_path / "m.pt", marker)

    with pytest.raises(UnsafeFileError, match="cfz_not_allowed.Net, which is not in the allowed packages") as info:
        convfuse.load(path)

    assert "--allow cfz_not_allowed" in str(info.value)
    assert "cfz_not_allowed" not in sys.modules
    assert not marker.exists()
    convfuse.load(path, trust=True)  # the control: trusting the file imports it
    assert marker.exists()
    sys.modules.pop("cfz_not_allowed", None)


def test_a_main_module_is_never_imported(tmp_path, marker, monkeypatch):
    """A package's command line (``pkg.__main__``) that would exit 0 at import."""
    _module_file(tmp_path, "cfz_cli_pkg.__main__", MARKS_AT_IMPORT + "raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = attacks.naming("cfz_cli_pkg.__main__")(tmp_path / "m.pt", marker)

    with pytest.raises(UnsafeFileError, match="__main__"):
        convfuse.load(path, allow=["cfz_cli_pkg"])
    assert not marker.exists()

    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "f.pt"), "--allow", "cfz_cli_pkg"])
    assert result.exit_code == 2 and not (tmp_path / "f.pt").exists()
    assert not marker.exists()


def test_an_allowed_module_that_exits_at_import_is_exit_2(tmp_path, marker, monkeypatch):
    """SystemExit(0) raised while importing an allowed module must not end convfuse with 0."""
    _module_file(tmp_path, "cfz_exits", "raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = attacks.naming("cfz_exits")(tmp_path / "m.pt", marker)

    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "f.pt"), "--allow", "cfz_exits"],
                           env={"CONVFUSE_DEBUG": None})

    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "raised SystemExit when imported" in lines[0]
    assert not (tmp_path / "f.pt").exists()


def _subprocess_env(marker: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONVFUSE_DEBUG", "CONVFUSE_ALLOW")}
    env["PYTHONPATH"] = str(REPO)
    env[MARKER_ENV] = str(marker)
    return env


STRAY = MARKS_AT_IMPORT + "import torch\nclass Net(torch.nn.Module):\n    pass\n"


def test_python_m_convfuse_never_imports_from_the_current_folder(tmp_path, marker):
    (tmp_path / "cfz_stray.py").write_text(STRAY)
    env = _subprocess_env(marker)
    saver = ("import sys; sys.path.insert(0, '.'); sys.modules['cfz_stray'] = type(sys)('cfz_stray'); "
             "from tests import attacks; from pathlib import Path; "
             "attacks.naming('cfz_stray')(Path('model.pt'), Path('unused'))")
    subprocess.run([sys.executable, "-c", saver], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, check=True,
                   timeout=120)
    assert not marker.exists()

    proc = subprocess.run([sys.executable, "-m", "convfuse", "model.pt", "-o", "fused.pt", "--allow", "cfz_stray"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cfz_stray.Net cannot be imported" in proc.stderr and "PYTHONPATH=." in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "fused.pt").exists()


def test_convfuse_load_from_a_script_never_imports_from_its_folder(tmp_path, marker):
    (tmp_path / "cfz_stray.py").write_text(STRAY)
    env = _subprocess_env(marker)
    attacks.naming("cfz_stray")(tmp_path / "model.pt", marker)
    (tmp_path / "load_it.py").write_text(
        "import convfuse\ntry:\n    convfuse.load('model.pt', allow=['cfz_stray'])\n"
        "except convfuse.LoadError as error:\n    print(error)\n"
    )

    proc = subprocess.run([sys.executable, "load_it.py"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert "cannot be imported" in proc.stdout
    assert not marker.exists()


# -- 7. caps -----------------------------------------------------------------------------


def test_opcode_cap(tmp_path, monkeypatch):
    torch.save(randomize_bn(TinyNet()).eval(), tmp_path / "m.pt")
    monkeypatch.setattr(unpickler, "MAX_OPCODES", 200)
    with pytest.raises(UnsafeFileError, match="more than 200 opcodes"):
        convfuse.load(tmp_path / "m.pt", allow=["tests"])


def _recompressed(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


def test_a_record_that_would_inflate_past_the_cap_is_refused_before_inflating(tmp_path, monkeypatch):
    torch.save({"weights": TinyNet().state_dict(), "padding": "0" * 3_000_000}, tmp_path / "big.pt")
    _recompressed(tmp_path / "big.pt", tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 200_000
    monkeypatch.setattr(archives, "MAX_RECORD_BYTES", 2_000_000)
    with pytest.raises(UnsafeFileError, match="would inflate to 3,00"):
        convfuse.load(tmp_path / "bomb.pt", arch="tests.models:build_tiny")


def test_a_pickle_record_over_the_cap_is_refused(tmp_path, monkeypatch):
    torch.save({"weights": TinyNet().state_dict(), "padding": "0" * 3_000_000}, tmp_path / "big.pt")
    monkeypatch.setattr(archives, "MAX_RECORD_BYTES", 2_000_000)
    with pytest.raises(UnsafeFileError, match="data.pkl is 3,00.* over the cap"):
        convfuse.load(tmp_path / "big.pt", arch="tests.models:build_tiny")


class _ItemsOf:
    """Pickles as an OrderedDict filled item by item, without hashing its keys when written."""

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs

    def __reduce__(self):
        from collections import OrderedDict

        return (OrderedDict, (), None, None, iter(self.pairs))


def test_a_dict_key_whose_hash_would_take_forever_is_refused(tmp_path):
    key: tuple = ()
    for _ in range(60):  # hashing it would visit 2**60 tuples
        key = (key, key)
    torch.save({"state_dict": TinyNet().state_dict(), "lookup": _ItemsOf([(key, 1)])}, tmp_path / "m.pt")
    with pytest.raises(UnsafeFileError, match="nested too deeply or too large"):
        convfuse.load(tmp_path / "m.pt", arch="tests.models:build_tiny")


def test_data_nested_deeper_than_the_cap_is_refused(tmp_path, monkeypatch):
    from convfuse.files import graph

    nested: list = []
    for _ in range(100):
        nested = [nested]
    torch.save({"state_dict": TinyNet().state_dict(), "deep": nested}, tmp_path / "m.pt")
    monkeypatch.setattr(graph, "MAX_DEPTH", 50)
    with pytest.raises(UnsafeFileError, match="nested more than 50 levels"):
        convfuse.load(tmp_path / "m.pt", arch="tests.models:build_tiny")


# -- one line, whatever torch would print ---------------------------------------------------


def _fake_archive(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"archive/{name}", data)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _fake_archive(p, {"archive_format": b"pt2", "archive_version": b"0", "models/model.json": b"{}"}),
        lambda p: _fake_archive(p, {"constants.pkl": b"junk", "data.pkl": b"junk", "code/__torch__/m.py": b"x"}),
        lambda p: torch.save({"state_dict": TinyNet().state_dict(), "x": attacks.Reduces(os.system, "true")}, p,
                             pickle_protocol=4),
    ],
    ids=["fake-pt2", "fake-torchscript", "protocol-4-pickle"],
)
def test_a_refused_load_prints_one_line(tmp_path, make):
    path = tmp_path / "m.pt"
    make(path)
    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "f.pt"), "--arch", "tests.models:build_tiny"],
                           env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "f.pt").exists()


# -- 8. the output side --------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("which", ["-o", "--report"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, which):
    torch.save(randomize_bn(TinyNet()).eval(), tmp_path / "m.pt")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = ["-o", str(fifo)] if which == "-o" else ["-o", str(tmp_path / "f.pt"), "--report", str(fifo)]

    result = runner.invoke(app, [str(tmp_path / "m.pt"), *args, "--allow", "tests", "--input-shape", "1,3,16,16"])

    assert result.exit_code == 2, result.output
    assert "not a regular file" in result.stderr
    assert fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "pipe"]


def test_an_output_that_is_a_symbolic_link_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (tmp_path / "link.pt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SaveError, match="symbolic link"):
        convfuse.save(randomize_bn(TinyNet()).eval(), tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink() and (tmp_path / "elsewhere").read_bytes() == b"keep"


class _Unpicklable(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.activation = lambda t: t


def test_a_failed_save_leaves_no_folders(tmp_path):
    with pytest.raises(SaveError):
        convfuse.save(_Unpicklable().eval(), tmp_path / "a" / "b" / "fused.pt")
    assert list(tmp_path.iterdir()) == []


# -- what must keep loading without a flag -------------------------------------------------


def _round_trip(tmp_path: Path, obj: Any, **load: Any) -> nn.Module:
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    return convfuse.load(path, **load)


def _fuses_and_verifies(model: nn.Module, *inputs: Any) -> None:
    result = convfuse.fuse(model, inputs[0] if len(inputs) == 1 else inputs)
    assert result.report.verification.passed is not False
    assert result.report.fused


def test_torchvision_classification_saved_whole(tmp_path):
    original = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    loaded = _round_trip(tmp_path, original)
    assert type(loaded) is torchvision.models.ResNet
    _fuses_and_verifies(loaded, torch.randn(1, 3, 64, 64))


def test_torchvision_detection_saved_whole(tmp_path):
    """Its helpers (BoxCoder, Matcher, DefaultBoxGenerator, ...) are plain data classes."""
    original = randomize_bn(torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None)).eval()
    loaded = _round_trip(tmp_path, original)
    assert type(loaded) is type(original)
    assert type(loaded.box_coder) is torchvision.models.detection._utils.BoxCoder
    _fuses_and_verifies(loaded, [torch.rand(3, 160, 160)])


def test_torchvision_detection_with_a_box_similarity_function(tmp_path):
    rpn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).rpn
    loaded = _round_trip(tmp_path, {"model": rpn})
    assert loaded.box_similarity is torchvision.ops.boxes.box_iou


def test_timm_models_saved_whole(tmp_path):
    timm = pytest.importorskip("timm")
    original = randomize_bn(timm.create_model("resnet18", pretrained=False)).eval()
    loaded = _round_trip(tmp_path, original)
    assert type(loaded) is type(original)
    _fuses_and_verifies(loaded, torch.randn(1, 3, 64, 64))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()  # holds an enum
    assert type(_round_trip(tmp_path, vit)) is type(vit)


def test_a_sequential_of_torch_layers(tmp_path):
    original = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    loaded = _round_trip(tmp_path, original)
    _fuses_and_verifies(loaded, torch.randn(1, 3, 16, 16))


def test_a_training_checkpoint_with_plain_extra_fields(tmp_path):
    import argparse
    import types

    np = pytest.importorskip("numpy")
    checkpoint = {
        "state_dict": randomize_bn(TinyNet()).state_dict(),
        "args": argparse.Namespace(lr=0.1, arch="tiny", milestones=[30, 60]),
        "config": types.SimpleNamespace(epochs=90),
        "best_acc": np.float64(0.75),
        "history": np.arange(4.0),
        "optimizer": torch.optim.SGD(TinyNet().parameters(), lr=0.1, momentum=0.9).state_dict(),
    }
    loaded = _round_trip(tmp_path, checkpoint, arch="tests.models:build_tiny")
    assert type(loaded) is TinyNet


def test_a_users_own_classes_load_with_allow(tmp_path):
    original = randomize_bn(LayerFactoryNet()).eval()  # also keeps partial(nn.LayerNorm, eps=1e-6)
    path = tmp_path / "m.pt"
    torch.save(original, path)
    with pytest.raises(UnsafeFileError, match="--allow tests"):
        convfuse.load(path)
    loaded = convfuse.load(path, allow=["tests"])
    assert type(loaded) is LayerFactoryNet
    assert isinstance(loaded.norm_layer, functools.partial) and loaded.norm_layer.func is nn.LayerNorm
    _fuses_and_verifies(loaded, torch.randn(1, 3, 16, 16))


def test_allow_from_the_environment(tmp_path):
    torch.save(randomize_bn(TinyNet()).eval(), tmp_path / "m.pt")
    result = runner.invoke(app, [str(tmp_path / "m.pt"), "--dry-run", "--input-shape", "1,3,16,16"],
                           env={"CONVFUSE_ALLOW": "mypkg tests", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output


def test_a_legacy_format_whole_model_loads(tmp_path):
    original = randomize_bn(TinyNet()).eval()
    torch.save(original, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = convfuse.load(tmp_path / "legacy.pt", allow=["tests"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.ones(X)), original(torch.ones(X)), rtol=0, atol=0)


def test_an_exported_program_with_dynamic_shapes_loads(tmp_path):
    path = attacks.exported_program(tmp_path / "m.pt2")
    program = convfuse.load(path)
    assert isinstance(program, torch.export.ExportedProgram)


def test_a_protocol_2_pickle_named_by_its_python_2_names(tmp_path):
    """``__builtin__.set`` (torch.save's protocol 2) is mapped to ``builtins.set`` as torch maps it."""
    state = {"state_dict": TinyNet().state_dict(), "seen": {1, 2}}
    loaded_state = pickle.loads(pickle.dumps(state, protocol=2))
    assert loaded_state["seen"] == {1, 2}
    assert type(_round_trip(tmp_path, state, arch="tests.models:build_tiny")) is TinyNet


def test_refusals_of_unimportable_classes_are_load_errors(tmp_path, marker):
    path = attacks.naming("cfz_vanished_pkg.models")(tmp_path / "m.pt", marker)
    with pytest.raises(LoadError, match="cannot be imported") as info:
        convfuse.load(path, allow=["cfz_vanished_pkg"])
    assert not isinstance(info.value, UnsafeFileError)


# -- sizes the file chose: zip inflation, tensor views, RNN state (red-team round 3) ----------


def _cli_refuses(path: Path, tmp_path: Path, needle: str, *args: str) -> None:
    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "out" / "f.pt"), *args],
                           env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None, "CONVFUSE_ALLOW": None})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_compressed_members_under_the_record_cap_are_capped_together(tmp_path, monkeypatch):
    """F01: every member under the per-record cap, together over the total: refused before inflating."""
    path = attacks.compressed_members(tmp_path / "bomb.pt", 8, 1_000_000)
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(archives, "MAX_RECORD_BYTES", 1_500_000)
    monkeypatch.setattr(archives, "MAX_INFLATED_BYTES", 4_000_000)
    inflated = []
    monkeypatch.setattr(torch._C, "PyTorchFileReader", lambda *a: inflated.append(a))  # never reached
    with pytest.raises(UnsafeFileError, match="inflate to more than 4,000,000 bytes together"):
        convfuse.load(path, arch="tests.models:build_tiny")
    _cli_refuses(path, tmp_path, "together", "--arch", "tests.models:build_tiny")
    assert not inflated


def test_compressed_members_within_the_caps_still_load(tmp_path, monkeypatch):
    model = randomize_bn(TinyNet()).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    _recompressed(tmp_path / "m.pt", tmp_path / "deflated.pt")
    loaded = convfuse.load(tmp_path / "deflated.pt", arch="tests.models:build_tiny").eval()
    inputs = x()
    assert torch.equal(loaded(inputs), model(inputs))


def test_members_that_share_bytes_are_refused(tmp_path):
    """A stored record named many times by the zip directory: torch reads and holds it once per
    name (the control), so a file of one record would yield thousands of copies."""
    path = attacks.overlapping_members(tmp_path / "m.pt", 20, 2**20)
    assert path.stat().st_size < 2 * 2**20
    loaded = torch.load(path, weights_only=True)
    assert sum(t.numel() * 4 for t in loaded.values()) == 20 * 2**20  # the control: 20 MiB from 1
    with pytest.raises(UnsafeFileError, match="share bytes"):
        convfuse.load(path, arch="tests.models:build_tiny")
    _cli_refuses(path, tmp_path, "share bytes", "--arch", "tests.models:build_tiny")


def test_a_zip_directory_over_the_cap_is_refused(tmp_path, monkeypatch):
    torch.save(TinyNet().state_dict(), tmp_path / "m.pt")
    monkeypatch.setattr(archives, "MAX_DIRECTORY_BYTES", 200)
    with pytest.raises(UnsafeFileError, match="zip directory is .* over the cap of 200"):
        convfuse.load(tmp_path / "m.pt", arch="tests.models:build_tiny")


@pytest.mark.parametrize("build", [attacks.huge_view, attacks.overlapping_view, attacks.huge_view_by_set])
def test_a_view_reaching_more_than_its_storage_is_refused(tmp_path, build):
    """F02: torch accepts the view (the control: 2**40 elements from a few bytes); convfuse refuses it."""
    path = build(tmp_path / "m.pt", tmp_path / "unused")
    assert torch.load(path, weights_only=False)["extra"].numel() == 2**40
    with pytest.raises(UnsafeFileError, match="views a storage of"):
        convfuse.load(path, allow=["tests"])
    _cli_refuses(path, tmp_path, "views a storage of", "--allow", "tests")


@pytest.mark.parametrize(("size", "stride", "offset", "needle"), [
    ((4,), (-1,), 3, "non-negative"),
    ((-4,), (1,), 0, "non-negative"),
    ((2,), (1,), -1, "offset"),
    ((4,), (1, 1), 0, "offset or strides"),
    ((2, 2), (4, 1), 0, "past its end"),
    ((True,), (1,), 0, "non-negative integers"),
    ((2**63,), (1,), 0, "non-negative integers"),
    ((2 ** (2**24), 2 ** (2**24)), (0, 0), 0, "non-negative integers"),  # refused before any product of them
])
def test_a_view_with_odd_sizes_is_refused(tmp_path, size, stride, offset, needle):
    torch.save({"state_dict": TinyNet().state_dict(), "extra": attacks.tensor_view(size, stride, 4, offset)},
               tmp_path / "m.pt")
    with pytest.raises(UnsafeFileError, match=needle):
        convfuse.load(tmp_path / "m.pt", arch="tests.models:build_tiny")


def test_many_full_views_of_one_storage_are_capped(tmp_path, monkeypatch):
    from convfuse.files import bounds

    monkeypatch.setattr(bounds, "SMALL_VIEW_BYTES", 0)
    attacks.many_views_of_one_storage(tmp_path / "m.pt", 3, 1000)
    with pytest.raises(LoadError, match="neither a model"):  # 3 views of one storage: within the factor, read
        convfuse.load(tmp_path / "m.pt")
    attacks.many_views_of_one_storage(tmp_path / "m.pt", 50, 1000)
    with pytest.raises(UnsafeFileError, match="view 2.* bytes of storages that hold 4,000"):
        convfuse.load(tmp_path / "m.pt")


def test_views_torch_writes_still_load(tmp_path):
    """An expanded (stride-0) tensor, views into one storage, a transposed weight, a meta tensor."""
    base = torch.randn(6, 4)
    model = randomize_bn(TinyNet()).eval()
    model.register_buffer("expanded", torch.randn(1).expand(1000))
    model.register_buffer("rows", base[2:])
    model.register_buffer("transposed", base.t())
    model.register_buffer("on_meta", torch.empty(3, 5, device="meta"))
    torch.save(model, tmp_path / "m.pt")
    loaded = convfuse.load(tmp_path / "m.pt", allow=["tests"])
    assert torch.equal(loaded.expanded, model.expanded) and loaded.expanded.stride() == (0,)
    assert torch.equal(loaded.rows, base[2:]) and torch.equal(loaded.transposed, base.t())
    assert loaded.on_meta.shape == (3, 5)


def test_an_rnn_whose_state_claims_more_layers_than_its_weights_is_refused(tmp_path):
    """F03: RNNBase.__setstate__ builds names for every layer the file claims (the control: 2,000
    layers cost 10,000 names here; 10**9 would never finish), and its forward allocates by them."""
    path = attacks.rnn_layers(tmp_path / "m.pt", 2000)
    assert len(torch.load(path, weights_only=False)["model"]._flat_weights_names) == 4 * 2000
    with pytest.raises(UnsafeFileError, match="2,000 layers and 4 weights"):
        convfuse.load(path)
    attacks.rnn_layers(path, 10**9)
    _cli_refuses(path, tmp_path, "1,000,000,000 layers", "--input-shape", "2,1,4")


def test_an_rnn_whose_hidden_size_is_not_its_weights_is_refused(tmp_path):
    path = attacks.rnn_hidden_size(tmp_path / "m.pt", tmp_path / "unused")
    assert torch.load(path, weights_only=False)["model"].hidden_size == 2**31  # the control
    with pytest.raises(UnsafeFileError, match=r"weight_ih_l0 of shape \(24, 4\), where .* \(6442450944, 4\)"):
        convfuse.load(path)


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(4, 8, num_layers=2, bidirectional=True),
    lambda: nn.LSTM(4, 8, num_layers=2, proj_size=3, bias=False),
    lambda: nn.GRU(4, 6, batch_first=True),
    lambda: nn.RNN(4, 5, nonlinearity="relu", num_layers=3),
])
def test_rnns_torch_writes_still_load(tmp_path, make):
    rnn = make().eval()
    torch.save(rnn, tmp_path / "m.pt")
    loaded = convfuse.load(tmp_path / "m.pt")
    inputs = torch.randn(3, 2, 4)
    assert torch.equal(loaded(inputs)[0], rnn(inputs)[0])


def test_a_name_in_two_of_a_modules_dicts_would_write_other_weights(tmp_path):
    """The control for shadowed-parameter: the forward uses the parameter, the state_dict (what a
    safetensors output is written from) the buffer, so a verified fuse would write other weights."""
    path = attacks.shadowed_parameter(tmp_path / "m.pt", tmp_path / "unused")
    model = torch.load(path, weights_only=False)
    assert not torch.equal(model.state_dict()["3.weight"], model[3].weight)
    result = runner.invoke(app, [str(path), "-o", str(tmp_path / "f.safetensors"), "--input-shape", "1,3,16,16"],
                           env={"NO_COLOR": "1", "CONVFUSE_DEBUG": None, "CONVFUSE_ALLOW": None})
    assert result.exit_code == 2 and "both in _parameters and in _buffers" in result.stderr
    assert not (tmp_path / "f.safetensors").exists()


def test_allow_of_a_module_admits_that_module_only(tmp_path):
    """--allow tests.models trusts tests.models (and modules below it), not all of tests, and no
    package whose name merely starts the same (tests_evil)."""
    torch.save(randomize_bn(TinyNet()).eval(), tmp_path / "m.pt")
    assert type(convfuse.load(tmp_path / "m.pt", allow=["tests.models"])) is TinyNet
    attacks.constructor_call(tmp_path / "c.pt", tmp_path / "marker")
    with pytest.raises(UnsafeFileError, match="tests.attacks.Reduces|not in the allowed packages"):
        convfuse.load(tmp_path / "c.pt", allow=["tests.model"])
    from convfuse.files.trust import Policy

    policy = Policy(["tests.models", "torch_evil"])
    assert policy.allowed("tests.models") and policy.allowed("tests.models.sub") and policy.allowed("torch_evil.x")
    assert not policy.allowed("tests") and not policy.allowed("tests.attacks") and not policy.allowed("tests_models")
    assert not Policy().allowed("torchvision2") and not Policy().allowed("torch_evil")


def test_bytes_decode_only_as_pickle_writes_them(tmp_path):
    """pickle writes bytes (protocol 2) as _codecs.encode(text, "latin1"); another codec name would
    make the codec machinery import the module of that name."""
    import _codecs
    import sys as system

    data = b"\x00\xffbytes"
    torch.save({"state_dict": TinyNet().state_dict(), "raw": data}, tmp_path / "ok.pt", pickle_protocol=2)
    assert convfuse.load(tmp_path / "ok.pt", arch="tests.models:build_tiny")
    system.modules.pop("encodings.uu_codec", None)
    torch.save({"state_dict": TinyNet().state_dict(), "raw": attacks.Reduces(_codecs.encode, "x", "uu")},
               tmp_path / "codec.pt")
    with pytest.raises(UnsafeFileError, match="latin1"):
        convfuse.load(tmp_path / "codec.pt", arch="tests.models:build_tiny")
    assert "encodings.uu_codec" not in system.modules


def test_an_exported_weight_viewed_past_its_bytes_is_what_torch_loads(tmp_path):
    """The control for exported-huge-weight-view: torch.export.load makes the 2**40-element view."""
    path = attacks.exported_huge_weight_view(tmp_path / "m.pt2", tmp_path / "unused")
    program = torch.export.load(path)
    assert program.state_dict["conv.weight"].numel() == 2**40
