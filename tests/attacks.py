"""Crafted model files for the trust-boundary tests: each would leave a marker file if the code it
carries ran. ``tests/test_trust.py`` asserts that, without ``--trust``, none of them does, and (as
the control that the payload is real) that most of them do when trusted.

Marker conventions: ``Recorder(path)`` (tests.models) writes ``path`` when constructed with it, so
it marks calls whose arguments the file chose; ``Marker`` and ``leave_marker`` write the file named
by ``$CONVFUSE_TEST_MARKER`` whenever anything calls them, so they mark callables the file put
where torch or convfuse would call them.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tests.models import Marker, Recorder, TinyNet

# -- pickles ------------------------------------------------------------------------------


class Reduces:
    """Pickles as ``func(*args)``: a call with arguments stored in the file."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class WithState:
    """Pickles as ``module`` created empty and given its state plus ``extra``, as torch.save
    writes modules, but past nn.Module's own ``__getstate__`` (which drops some attributes)."""

    def __init__(self, module: nn.Module, extra: dict[str, Any]) -> None:
        self.module, self.extra = module, extra

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # the pickler checks that __newobj__ makes the object's own class
        return type(self.module)

    def __reduce_ex__(self, protocol: int):
        import copyreg

        return (copyreg.__newobj__, (type(self.module),), {**self.module.__dict__, **self.extra})


def tiny() -> TinyNet:
    from convfuse.testing import randomize_bn

    return randomize_bn(TinyNet()).eval()


def constructor_call(path: Path, marker: Path) -> Path:
    """REDUCE of an admitted module class: ``Recorder(marker)`` runs its constructor."""
    torch.save({"model": tiny(), "extra": Reduces(Recorder, str(marker))}, path)
    return path


def rebuild_from_type(path: Path, marker: Path) -> Path:
    """torch's own ``_rebuild_from_type_v2(func, type, args, state)`` calls ``func(*args)``."""
    payload = Reduces(torch._tensor._rebuild_from_type_v2, Recorder, torch.Tensor, (str(marker),), {})
    torch.save({"model": tiny(), "extra": payload}, path)
    return path


def tensor_backward_hooks(path: Path, marker: Path) -> Path:
    """A tensor rebuilt with backward hooks the file chose (torch.save never stores them)."""
    storage = torch.zeros(2).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    hooks = OrderedDict({0: Marker})
    payload = Reduces(torch._utils._rebuild_tensor_v2, typed, 0, (2,), (1,), True, hooks)
    torch.save({"model": tiny(), "extra": payload}, path)
    return path


def partial_of_a_class(path: Path, marker: Path) -> Path:
    """A functools.partial binding the file's arguments to an admitted class, kept as an attribute."""
    import functools

    model = tiny()
    model.make = functools.partial(Recorder, str(marker))
    torch.save(model, path)
    return path


def shadowing(name: str, owner: str = "") -> Callable[[Path, Path], Path]:
    """A model whose module ``owner`` has the instance attribute ``name`` set to a callable (the
    Marker class) where its class has a method or attribute of that name: torch would call it
    (``train`` in ``.eval()``, ``_compiled_call_impl`` on every call, ``__deepcopy__`` on copy, ...)."""

    def build(path: Path, marker: Path) -> Path:
        model = tiny()
        if owner:
            parent, _, attribute = owner.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            holder._modules[attribute] = WithState(holder._modules[attribute], {name: Marker})
            torch.save(model, path)
        else:
            torch.save(WithState(model, {name: Marker}), path)
        return path

    build.__name__ = f"shadowing_{owner.replace('.', '_') + '_' if owner else ''}{name}"
    return build


def forward_hook(path: Path, marker: Path) -> Path:
    """A forward hook set by the file: torch calls it on every forward."""
    model = tiny()
    model.bn1.register_forward_hook(Marker)
    torch.save(model, path)
    return path


def module_outside_the_tree(path: Path, marker: Path) -> Path:
    """A module kept as a plain attribute (not in ``_modules``): invisible to ``named_modules()``,
    so to any check that walks the module tree (here a Marker, which marks when called)."""
    model = tiny()
    hidden = Marker.__new__(Marker)
    nn.Module.__init__(hidden)  # created without running Marker's constructor
    object.__setattr__(model, "hidden", hidden)
    torch.save(model, path)
    return path


def not_a_tensor_in_parameters(path: Path, marker: Path) -> Path:
    model = tiny()
    model.conv1._parameters["weight"] = Reduces(Recorder, str(marker))
    torch.save(model, path)
    return path


@contextmanager
def fake_modules(*names: str) -> Any:
    """Importable stand-in modules (and their parents) while a file naming them is written."""
    made = []
    try:
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix not in sys.modules:
                    sys.modules[prefix] = types.ModuleType(prefix)
                    made.append(prefix)
        yield
    finally:
        for name in made:
            sys.modules.pop(name, None)


def naming(module: str, name: str = "Net") -> Callable[[Path, Path], Path]:
    """A file that names ``module.name`` (a class, created empty as torch.save does)."""

    def build(path: Path, marker: Path) -> Path:
        with fake_modules(module):
            cls = type(name, (nn.Module,), {"__module__": module})
            setattr(sys.modules[module], name, cls)
            torch.save(cls(), path)
        return path

    return build


def legacy_with_a_zip_decoy(path: Path, marker: Path) -> Path:
    """A legacy (non-zip) pickle that calls a constructor, with a harmless torch.save zip appended:
    a reader that decides "zip" by the end record scans the decoy while torch unpickles the start."""
    with open(path, "wb") as f:
        for part in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                     {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                     Reduces(Recorder, str(marker)), []):
            pickle.dump(part, f, protocol=2)
        buffer = io.BytesIO()
        torch.save(tiny(), buffer)
        f.write(buffer.getvalue())
    return path


# -- TorchScript ------------------------------------------------------------------------------


class _SetsState(nn.Module):
    """A scripted module whose ``__setstate__`` (run by torch.jit.load) writes a file through
    ``aten::from_file(path, shared=True)``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        written = torch.from_file(self.marker, True, 8)
        print(written.numel())


def torchscript_setstate(path: Path, marker: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_SetsState(str(marker))), path)
    return path


# -- ExportedProgram archives ------------------------------------------------------------------


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + torch.ops.aten.full.default([4, 1, 1], 0.0)


SMALL_INPUT = (2, 3, 8, 8)


def exported_program(path: Path) -> Path:
    """A genuine .pt2 with a dynamic batch size (so that it holds symbolic expressions)."""
    from convfuse.testing import randomize_bn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            randomize_bn(_Small()).eval(), (torch.randn(SMALL_INPUT),),
            dynamic_shapes=({0: torch.export.Dim("batch", max=64)},),
        )
        torch.export.save(program, path)
    return path


def _rewrite_program(path: Path, edit: Callable[[dict], None], extra: dict[str, bytes] | None = None) -> Path:
    source = path.with_suffix(".genuine.pt2")
    exported_program(source)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                document = json.loads(data)
                edit(document)
                data = json.dumps(document).encode()
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)
    source.unlink()
    return path


def exported_guard_code(path: Path, marker: Path) -> Path:
    """Guard code, which ExportedProgram.module() turns into a function and runs on every call."""

    def edit(document: dict) -> None:
        document["guards_code"] = [f"open({str(marker)!r}, 'w').close() is None"]

    return _rewrite_program(path, edit)


def exported_sympy_eval(path: Path, marker: Path) -> Path:
    """A symbolic size expression, which torch.export.load hands to sympy.sympify (an eval)."""
    payload = (
        "Integer.__new__.__globals__['__builtins__']['__import__']('pathlib')"
        f".Path({str(marker)!r}).touch()"
    )

    def edit(document: dict) -> None:
        for value in document["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = payload
                    return

    return _rewrite_program(path, edit)


def exported_file_io(path: Path, marker: Path) -> Path:
    """A graph node calling aten::from_file(marker, shared=True): it writes the file when run."""

    def edit(document: dict) -> None:
        for node in document["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.full.default":
                node["target"] = "torch.ops.aten.from_file.default"
                node["inputs"] = [
                    {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                ]

    return _rewrite_program(path, edit)


_LIBRARY = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void ran(void) {
    const char *path = getenv("CONVFUSE_TEST_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("dlopened", f); fclose(f); }
}
"""


def shared_library(folder: Path) -> bytes:
    """A shared library that leaves the marker when loaded (needs a C compiler)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    source, library = folder / "payload.c", folder / "payload.so"
    source.write_text(_LIBRARY)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    return library.read_bytes()


def exported_aoti_payload(path: Path, marker: Path) -> Path:
    """An AOTInductor payload: a compiled library that torch.export.load would dlopen."""
    library = shared_library(path.parent)
    extra = {"data/aotinductor/model/model.so": library, "data/aotinductor/model/model.wrapper.so": library}
    return _rewrite_program(path, lambda document: None, extra)


def deferred_call_in_a_data_object(path: Path, marker: Path) -> Path:
    """A plain class of torch whose ``__str__`` calls a stored function with stored arguments
    (``torch._logging``'s LazyString), put where installed code formats a string: nn.Upsample's
    ``mode``, which F.interpolate puts in an error message. (Found by the red team.)"""
    from torch._logging._internal import LazyString

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Upsample(scale_factor=2.0)).eval()
    model[2].mode = LazyString(torch.serialization._open_file, str(marker), "w")
    torch.save(model, path)
    return path


def a_class_as_a_value(path: Path, marker: Path) -> Path:
    """An admitted module class other than a torch layer held as an attribute, where installed code
    could call it (Recorder marks the path it is constructed with)."""
    model = tiny()
    model.factory = Recorder
    torch.save(model, path)
    return path


def _method_caller(name: str) -> Any:
    """torch._dynamo's numpy_method_wrapper: calling it calls ``getattr(args[0], name)(*args[1:])``."""
    from torch._dynamo.utils import numpy_method_wrapper

    caller = numpy_method_wrapper(name)
    del caller.__dict__["__name__"]  # a dunder instance key would be refused; the class works without it
    return caller


def _shell(command: str) -> Any:
    """A chain of torch's own plain classes that runs ``os.system(command)`` when formatted as a
    string: LazyString -> numpy_method_wrapper -> _LazyModule (which imports "os")."""
    from torch._logging._internal import LazyString
    from torch.onnx._internal._lazy_import import _LazyModule

    return LazyString(_method_caller("system"), _LazyModule("os"), command)


def chained_wrappers(path: Path, marker: Path) -> Path:
    """Three admitted-looking plain classes of torch composed into a shell command, put where
    F.interpolate formats nn.Upsample's ``mode`` into an error message. (Found by the red team.)"""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Upsample(scale_factor=2.0)).eval()
    model[2].mode = _shell(f"touch {marker}")
    torch.save(model, path)
    return path


class AsNewObj:
    """Pickles as ``cls.__new__(cls)`` filled with ``state``: what torch.save writes for a module."""

    def __init__(self, cls: type, state: dict[str, Any]) -> None:
        self.cls, self.state = cls, state

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return self.cls

    def __reduce_ex__(self, protocol: int):
        import copyreg

        return (copyreg.__newobj__, (self.cls,), self.state)


def module_with_its_own_setstate(path: Path, marker: Path) -> Path:
    """torch._dynamo's OptimizedModule, whose own ``__setstate__`` calls ``self.dynamo_ctx(...)``:
    a callable from the file's state, run inside torch.load before any check. (Found by the red team.)"""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.output_graph import LazyProxy
    from torch.export._wrapper_utils import _WrapperModule
    from torch.onnx._internal._lazy_import import _LazyModule

    proxy = LazyProxy(None, _method_caller("system"), _LazyModule("os"), f"touch {marker}")
    state = {**vars(nn.Module()), "_orig_mod": _WrapperModule(proxy), "dynamo_ctx": _method_caller("__call__")}
    torch.save({"model": AsNewObj(OptimizedModule, state)}, path)
    return path


def allocation_by_argument(path: Path, marker: Path) -> Path:
    """An inert type called with a size: 1 GiB from a file of a few KB."""
    torch.save({"model": tiny(), "extra": Reduces(bytearray, 2**30)}, path)
    return path


def numpy_array_of_any_shape(path: Path, marker: Path) -> Path:
    import numpy as np

    torch.save({"model": tiny(), "extra": Reduces(np.ndarray, (2**27,), np.dtype("O"))}, path)
    return path


def exported_sympy_string_argument(path: Path, marker: Path) -> Path:
    """A string argument inside a symbolic expression, which sympy parses (evaluates) again."""
    inner = f"Integer.__new__.__globals__['__builtins__']['__import__']('pathlib').Path({str(marker)!r}).touch()"

    def edit(document: dict) -> None:
        for value in document["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = f"Max({inner!r}, 2)"
                    return

    return _rewrite_program(path, edit)


def exported_dunder_target(path: Path, marker: Path) -> Path:
    """A node target that walks attributes of torch.ops.aten instead of naming an operator."""

    def edit(document: dict) -> None:
        for node in document["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.full.default":
                node["target"] = "torch.ops.aten.__class__.__init__"

    return _rewrite_program(path, edit)


def legacy_tar(path: Path, member: Any) -> Path:
    """torch's ancient tar format, with a first member whose name starts with byte 0x80 (so the
    file looks like a pickle) and ``member`` as its "storages" (a link, a FIFO)."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        pad = tarfile.TarInfo("\udc80pad")
        tar.addfile(pad, io.BytesIO(b""))
        tar.addfile(member)
    return path


# -- sizes the file chose (caps, red-team round 3) -----------------------------------------


def compressed_members(path: Path, count: int, size: int) -> Path:
    """``count`` deflated tensors of ``size`` bytes each (zeros: a few KB compressed), every one
    under the per-record cap, together as much as the file likes once inflated."""
    buffer = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(size // 4) for i in range(count)}, buffer)
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return path


def overlapping_members(path: Path, count: int, size: int) -> Path:
    """An archive of one stored record of ``size`` bytes, whose zip directory names it ``count``
    times (``data/0`` ... ``data/{count-1}``, all at the same offset): the pickle's ``count``
    tensors each read, and hold, the same bytes again."""
    import struct

    buffer = io.BytesIO()
    torch.save({f"t{i}": torch.zeros(size // 4) for i in range(count)}, buffer)
    kept = io.BytesIO()
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(kept, "w", zipfile.ZIP_STORED) as zout:
        root = zin.infolist()[0].filename.split("/")[0]
        for info in zin.infolist():
            if "/data/" not in info.filename or info.filename.endswith("/data/0"):
                zout.writestr(info, zin.read(info.filename))
    data = kept.getvalue()
    end = data.rindex(b"PK\x05\x06")
    directory_size, directory_offset = struct.unpack("<II", data[end + 12:end + 20])
    directory = data[directory_offset:directory_offset + directory_size]
    entries, position = [], 0
    while position < len(directory):
        name_length, extra_length, comment_length = struct.unpack("<HHH", directory[position + 28:position + 34])
        length = 46 + name_length + extra_length + comment_length
        entries.append(directory[position:position + length])
        position += length
    first = next(e for e in entries if e[46:46 + struct.unpack("<H", e[28:30])[0]].endswith(b"/data/0"))
    name_length, extra_length = struct.unpack("<HH", first[28:32])
    extra = first[46 + name_length:46 + name_length + extra_length]
    for i in range(1, count):
        name = f"{root}/data/{i}".encode()
        header = bytearray(first[:46])
        header[28:34] = struct.pack("<HHH", len(name), len(extra), 0)
        entries.append(bytes(header) + name + extra)
    new_directory = b"".join(entries)
    record = bytearray(data[end:end + 22])
    record[8:16] = struct.pack("<HHI", len(entries), len(entries), len(new_directory))
    path.write_bytes(data[:directory_offset] + new_directory + bytes(record[:20]) + data[end + 20:])
    return path


def tensor_view(size: tuple, stride: tuple, elements: int = 1, offset: int = 0) -> Reduces:
    """A tensor rebuilt from a storage of ``elements`` float32 zeros, viewed with the file's
    ``size``, ``stride`` and ``offset``."""
    storage = torch.zeros(elements).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    return Reduces(torch._utils._rebuild_tensor_v2, typed, offset, size, stride, False, OrderedDict())


def huge_view(path: Path, marker: Path) -> Path:
    """One float32 viewed as 2**20 x 2**20 (strides 0): 4 TiB for the first copy made of it."""
    model = tiny()
    torch.save({"model": model, "extra": tensor_view((2**20, 2**20), (0, 0))}, path)
    return path


def overlapping_view(path: Path, marker: Path) -> Path:
    """2**21 float32 viewed as 2**20 x 2**20 with strides (1, 1): inside the storage, 4 TiB once copied."""
    torch.save({"extra": tensor_view((2**20, 2**20), (1, 1), elements=2**21)}, path)
    return path


def many_views_of_one_storage(path: Path, count: int, elements: int) -> Path:
    """``count`` tensors, each a full view of the same storage of ``elements`` float32."""
    storage = torch.zeros(elements)
    torch.save({"views": [storage.view(-1) for _ in range(count)]}, path)
    return path


class _LegacyTensor:
    """Pickles as a small tensor whose storage is then replaced (BUILD: ``set_``) by a huge view."""

    def __reduce__(self):
        small = tensor_view((1,), (1,))
        storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1).untyped_storage(), dtype=torch.float32,
                                             _internal=True)
        return (small.func, small.args, (storage, 0, (2**20, 2**20), (0, 0)))


def huge_view_by_set(path: Path, marker: Path) -> Path:
    torch.save({"extra": _LegacyTensor()}, path)
    return path


def _rnn(rnn: nn.RNNBase, **changes: Any) -> AsNewObj:
    """``rnn`` as torch.save writes it (its state less the weak references), with ``changes``."""
    state = {key: value for key, value in vars(rnn).items() if key != "_flat_weight_refs"}
    return AsNewObj(type(rnn), {**state, **changes})


def rnn_layers(path: Path, layers: int) -> Path:
    """An LSTM whose state claims ``layers`` layers in the old format (``_all_weights`` not of
    names), so that ``RNNBase.__setstate__`` builds the names of every one of them."""
    torch.save({"model": _rnn(nn.LSTM(4, 8), num_layers=layers, _all_weights=[[0]])}, path)
    return path


def rnn_hidden_size(path: Path, marker: Path) -> Path:
    """A GRU with the weights of hidden size 8 that claims 2**31: its forward would allocate the
    initial hidden state by the claim."""
    torch.save({"model": _rnn(nn.GRU(4, 8), hidden_size=2**31)}, path)
    return path


def numpy_object_array(path: Path, marker: Path) -> Path:
    """A Marker module (outside the module tree) and a class held inside a numpy array of objects,
    where a walk of the object graph that treats numpy arrays as data never looks."""
    import numpy as np

    hidden = Marker.__new__(Marker)
    nn.Module.__init__(hidden)
    held = np.empty(2, dtype=object)
    held[0], held[1] = hidden, Marker
    torch.save({"model": tiny(), "extra": held}, path)
    return path


def shadowed_parameter(path: Path, marker: Path) -> Path:
    """A Linear whose ``weight`` is a parameter and also a buffer: its forward uses the parameter,
    its state_dict (a state_dict or safetensors output of it) the buffer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 14 * 14, 5)).eval()
    model[3]._buffers["weight"] = torch.zeros_like(model[3].weight)
    torch.save(model, path)
    return path


def exported_deep_json(path: Path, marker: Path) -> Path:
    """A program whose JSON nests 200,000 lists: Python's JSON reader recurses once per level."""

    def edit(document: dict) -> None:
        document["deep"] = "DEEP"

    _rewrite_program(path, edit)
    with zipfile.ZipFile(path) as zin:
        members = [(info.filename, zin.read(info.filename)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members:
            zout.writestr(name, data.replace(b'"DEEP"', b"[" * 200_000 + b"]" * 200_000))
    return path


def exported_huge_weight_view(path: Path, marker: Path) -> Path:
    """A program whose conv weight (432 bytes) is described as 2**20 x 2**20 with strides 0:
    torch.export.load makes that view of it (torch.as_strided), and any copy allocates 4 TiB."""
    exported_program(path.with_suffix(".genuine.pt2"))
    source = path.with_suffix(".genuine.pt2")
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                document = json.loads(data)
                meta = document["config"]["conv.weight"]["tensor_meta"]
                meta["sizes"] = [{"as_int": 2**20}, {"as_int": 2**20}, {"as_int": 1}, {"as_int": 1}]
                meta["strides"] = [{"as_int": 0}] * 4
                data = json.dumps(document).encode()
            zout.writestr(info.filename, data)
    source.unlink()
    return path
