"""The allow list: which globals a model file may name without ``--trust``, and what each may do.

Installed code is trusted; the bytes of a file are not. A file may choose data (tensors, numbers,
strings, containers, and which admitted classes its objects are), never a call. A global is
decided by its name before anything is imported: it must come from an allowed package (torch,
torchvision and timm by default, plus the user's ``--allow``), or be one of a few inert standard
types; ``__main__`` modules never. Once imported, it is admitted as one of the kinds below, each
with what the restricted unpickler (``convfuse.files.unpickler``) lets the file do with it.
"""

from __future__ import annotations

import _compat_pickle
import abc
import enum
import importlib
import inspect
import os
import sys
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convfuse.errors import first_line

__all__ = ["DATA_CLASSES", "DEFAULT_PACKAGES", "PURE_FUNCTIONS", "is_layer_class", "Admitted", "Kind", "Policy", "Refused", "Unimportable", "python3_name"]

DEFAULT_PACKAGES = ("torch", "torchvision", "timm")


class Refused(Exception):
    """The file asked for something the policy does not allow; the message says what."""

    def __init__(self, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.allow = allow  # the package whose --allow would admit it, where that would help


class Unimportable(Refused):
    """An allowed name whose module cannot be imported (missing, or failing at import): a problem
    of the installation, not of the file's safety."""


class Kind(enum.Enum):
    """What an admitted global may be used for by the file."""

    MODULE = "module class"  # created empty (NEWOBJ) and filled with its state (BUILD); never called
    DATA = "data class"  # the same, for plain classes restored by default pickling
    INERT = "inert type"  # standard types whose constructors only build data: may be called (REDUCE)
    REBUILD = "tensor rebuild function"  # torch's own tensor rebuilds: called, with checked arguments
    PARTIAL = "layer factory"  # functools.partial of a torch layer class with plain arguments
    FUNCTION = "pure function"  # held as a value (a model's ``box_similarity``); never called by the file
    VALUE = "constant"  # torch.float32, torch.contiguous_format, tensor types, ...


@dataclass(frozen=True)
class Admitted:
    name: str
    obj: Any
    kind: Kind


# -- the explicit lists ---------------------------------------------------------------------

_INERT_TYPES = (
    "builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice",
    "collections.OrderedDict", "collections.Counter",
    "argparse.Namespace", "types.SimpleNamespace",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "torch.Size", "torch.device",
    # numpy scalars and arrays in training checkpoints (a metric stored as numpy.float64)
    "numpy.dtype", "numpy.core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
)
"""Standard types (and numpy's array/scalar reconstructors) whose constructors only build data."""

_REBUILDS = (
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._tensor._rebuild_from_type_v2",
    "torch.serialization._get_layout", "_codecs.encode",
)
"""What ``torch.save`` calls to rebuild tensors, layouts and bytes; each has its arguments checked."""

_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter",
                 "torch.storage.UntypedStorage", "torch.storage.TypedStorage", "numpy.ndarray")
"""Types a file may name as arguments (of a rebuild, of numpy's ``_reconstruct``), never call."""

PURE_FUNCTIONS = (
    # torchvision's detection heads hold their box similarity; RAFT its hidden-state pass-through
    "torchvision.ops.boxes.box_iou", "torchvision.ops.boxes.generalized_box_iou",
    "torchvision.ops.boxes.complete_box_iou", "torchvision.ops.boxes.distance_box_iou",
    "torchvision.ops.boxes.box_area", "torchvision.models.optical_flow.raft._pass_through_h",
    # activations kept as attributes (timm's act_fn)
    *(f"timm.layers.activations.{name}" for name in (
        "swish", "mish", "sigmoid", "tanh", "hard_swish", "hard_sigmoid", "hard_mish", "gelu", "gelu_tanh", "quick_gelu",
    )),
    "torch.relu", "torch.sigmoid", "torch.tanh",
    "torch.nn.functional.relu", "torch.nn.functional.relu6", "torch.nn.functional.gelu",
    "torch.nn.functional.silu", "torch.nn.functional.mish", "torch.nn.functional.hardswish",
    "torch.nn.functional.hardsigmoid", "torch.nn.functional.sigmoid", "torch.nn.functional.tanh",
    "torch.nn.functional.leaky_relu", "torch.nn.functional.elu", "torch.nn.functional.softplus",
    "torch.nn.functional.softmax", "torch.nn.functional.log_softmax",
)
"""Functions a model may hold as attributes: pure tensor math, called only by installed code."""

DATA_CLASSES = (
    "torchvision.models.detection._utils.BoxCoder", "torchvision.models.detection._utils.BoxLinearCoder",
    "torchvision.models.detection._utils.Matcher", "torchvision.models.detection._utils.SSDMatcher",
    "torchvision.models.detection._utils.BalancedPositiveNegativeSampler",
)
"""The plain (non-module) classes of the default packages a file may hold: torchvision's detection
helpers. Any class's special methods run when installed code formats, compares, hashes or calls
a value it expects to be a string or a number, so the default packages' thousands of other plain
classes (``torch._logging``'s LazyString calls a stored function from ``__str__``) are not
admitted; a package you ``--allow`` vouches for its own."""

_PARTIAL = "functools.partial"

_STATE_METHODS = (
    "__reduce__", "__reduce_ex__", "__setstate__", "__getstate__", "__new__", "__del__",
    "__copy__", "__deepcopy__", "__getnewargs__", "__getnewargs_ex__",
)
"""Methods that run on a file's data when it is loaded, copied, saved or freed: a class of an
allowed package that defines one is not plain data (torch's own modules may: their code is torch's)."""

_STATE_METHODS_READ = {
    "torch.nn.modules.conv._ConvNd": ("__setstate__",),
    "torch.nn.modules.activation.Softmax": ("__setstate__",),
    "torch.nn.modules.activation.Softmin": ("__setstate__",),
    "torch.nn.modules.activation.LogSoftmax": ("__setstate__",),
    "torch.nn.modules.activation.MultiheadAttention": ("__setstate__",),
    "torch.nn.modules.pooling.AvgPool3d": ("__setstate__",),
    "torch.nn.modules.upsampling.Upsample": ("__setstate__",),
    "torch.nn.modules.transformer.TransformerEncoderLayer": ("__setstate__",),
    "torch.nn.modules.transformer.TransformerDecoderLayer": ("__setstate__",),
    "torch.nn.modules.rnn.RNNBase": ("__setstate__", "__getstate__"),
}
"""torch layers whose own ``__setstate__`` the unpickler may call: each was read, and only fills
defaults of old checkpoints (or, for RNNs, rebuilds the list of weight names) from plain data.
Any other module class with its own state methods (``torch._dynamo``'s OptimizedModule calls a
stored callable from ``__setstate__``) is refused: its code would run on the file's state before
the object graph could be checked."""

_INERT_BASES = (dict, list, set, types.SimpleNamespace)
_CONSTANT_TYPES = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)


def _python_code(value: Any) -> str | None:
    """The module of the Python function behind a class attribute (a method, property, class or
    static method), None for anything else (data, C functions of a built-in base)."""
    if isinstance(value, property):
        value = value.fget
    value = getattr(value, "__func__", value)
    return value.__module__ if inspect.isfunction(value) else None


def is_layer_class(obj: Any) -> bool:
    """A torch layer class (``nn.BatchNorm2d``): the one kind of class a model may hold as a value
    (ResNet's ``_norm_layer``), and the only one a ``functools.partial`` may bind."""
    return isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__.startswith("torch.nn.")


def python3_name(module: str, name: str) -> tuple[str, str]:
    """A protocol-2 global's Python 3 module and name, mapped as pickle (and torch) map them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# -- the policy -----------------------------------------------------------------------------


class Policy:
    """The allowed packages, and every global admitted so far (by name and by object)."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        extra = []
        for package in allow:
            package = str(package).strip()
            if not package or not all(part.isidentifier() for part in package.split(".")):
                raise ValueError(f"--allow {package!r}: expected a package name such as mypkg or ultralytics")
            extra.append(package)  # a dotted name admits that module and those below it, no more
        self.packages = tuple(dict.fromkeys((*DEFAULT_PACKAGES, *extra)))
        self._by_name: dict[str, Admitted] = {}
        self._by_id: dict[int, Admitted] = {}

    def allowed(self, module: str) -> bool:
        parts = module.split(".")
        return any(".".join(parts[:i]) in self.packages for i in range(1, len(parts) + 1))

    def admission(self, obj: Any) -> Admitted | None:
        """How ``obj`` (a global the file named) was admitted, or None if it was not."""
        return self._by_id.get(id(obj))

    @staticmethod
    def inert_type(cls: type) -> bool:
        """Whether ``cls`` is one of the inert standard types (a ``pathlib.Path`` call makes a
        PosixPath), or a numpy array or scalar type."""
        module = getattr(cls, "__module__", "") or ""
        return f"{module}.{cls.__qualname__}" in _INERT_TYPES or module == "numpy" or module.startswith("numpy.")

    def kind_of(self, obj: Any) -> Kind | None:
        admitted = self.admission(obj)
        return admitted.kind if admitted is not None else None

    def admit(self, module: str, name: str) -> Admitted:
        """The object a pickle's GLOBAL names, if the policy admits it; Refused otherwise."""
        full = f"{module}.{name}"
        if full in self._by_name:
            return self._by_name[full]
        if "__main__" in module.split("."):
            raise Refused(
                f"the file names {full}, from a __main__ module (a script or a package's command line), "
                "which is never imported; move the class into an importable module"
            )
        listed = full in _INERT_TYPES or full in _REBUILDS or full in _TENSOR_TYPES or full == _PARTIAL
        if not listed and not self.allowed(module):
            raise Refused(
                f"the file names {full}, which is not in the allowed packages ({', '.join(self.packages)})",
                allow=module.split(".")[0],
            )
        obj = _resolve(module, name)
        admitted = Admitted(full, obj, self._classify(full, obj))
        self._by_name[full] = admitted
        self._by_id[id(obj)] = admitted
        return admitted

    def _classify(self, full: str, obj: Any) -> Kind:
        if full in _REBUILDS:
            return Kind.REBUILD
        if full == _PARTIAL:
            return Kind.PARTIAL
        if full in _INERT_TYPES:
            return Kind.INERT
        if full in _TENSOR_TYPES or isinstance(obj, _CONSTANT_TYPES):
            return Kind.VALUE
        if full in PURE_FUNCTIONS:
            return Kind.FUNCTION
        owner = getattr(obj, "__module__", None)
        if isinstance(obj, type) and (not isinstance(owner, str) or not self.allowed(owner)):
            raise Refused(f"the file names {full}, which is defined in {owner}, outside the allowed packages",
                          allow=owner.split(".")[0] if isinstance(owner, str) else None)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            _check_module_class(full, obj)
            return Kind.MODULE
        if isinstance(obj, type):
            return self._data_kind(full, obj)
        if callable(obj) and owner == "torch.fx.graph_module":
            raise Refused(
                f"the file holds a torch.fx GraphModule ({full}), whose forward is code stored in the file "
                "and executed when it is loaded"
            )
        if callable(obj):
            raise Refused(
                f"the file names the function {full}; functions are admitted only from convfuse's short list "
                "of pure functions (see the README's loading policy)"
            )
        raise Refused(f"the file names {full}, a {type(obj).__name__} object rather than a class")


    def _data_kind(self, full: str, cls: type) -> Kind:
        """A plain class restored by default pickling (DATA), an enum or a subclass of an inert
        container type that keeps its base's construction (INERT); Refused for anything else.
        From the default packages only the listed data classes and plain enums."""
        default_package = cls.__module__.split(".")[0] in DEFAULT_PACKAGES
        if issubclass(cls, enum.Enum):
            # members are looked up by value (EnumType.__call__); the enum machinery's own methods
            # (__str__, __format__, ...) are the only code an enum may bring
            own = [name for name, value in vars(cls).items() if _python_code(value) not in (None, "enum")]
            if own or any("_missing_" in vars(base) for base in cls.__mro__ if base.__module__ != "enum"):
                raise Refused(f"the file names {full}, an enum with methods of its own ({', '.join(own) or '_missing_'})")
            return Kind.INERT
        if default_package and full not in DATA_CLASSES:
            raise Refused(
                f"the file holds a {full}, a class of {cls.__module__.split('.')[0]} that is neither an nn.Module "
                "nor one of the few data classes convfuse admits from the default packages"
            )
        inert_base = next((b for b in cls.__mro__[1:] if b in _INERT_BASES), None)
        if type(cls) not in (type, abc.ABCMeta):
            raise Refused(f"the file names {full}, whose class has a custom metaclass ({type(cls).__name__})")
        for base in cls.__mro__:
            if base is object or base is inert_base:
                break
            if base.__module__.split(".")[0] in ("builtins",):
                raise Refused(f"the file names {full}, a subclass of the built-in {base.__name__}")
            own = [m for m in _STATE_METHODS if m in vars(base)]
            if inert_base is not None:
                own += [m for m in ("__init__", "__setitem__", "append", "extend", "update") if m in vars(base)]
            if own:
                raise Refused(
                    f"the file names {full}, whose class defines {', '.join(own)}, which would run on the file's data"
                )
        return Kind.INERT if inert_base is not None else Kind.DATA


def _check_module_class(full: str, cls: type) -> None:
    """Refused for module classes whose state is code, or whose own methods run on loaded data."""
    code_carrying = (torch.fx.GraphModule, torch.jit.ScriptModule)
    if issubclass(cls, code_carrying):
        raise Refused(
            f"the file holds a {full}, whose forward is code stored in the file and run when it is "
            "loaded or copied"
        )
    for base in cls.__mro__:
        if base is nn.Module:
            break
        name = f"{base.__module__}.{base.__qualname__}"
        own = [m for m in _STATE_METHODS if m in vars(base) and m not in _STATE_METHODS_READ.get(name, ())]
        if own:
            raise Refused(
                f"the file holds a {full}, whose class {name} defines {', '.join(own)}, which would run on "
                "the file's state while it is loaded (before anything could check that state)"
            )


# -- importing ------------------------------------------------------------------------------


def _resolve(module: str, name: str) -> Any:
    """``module.name`` (``name`` may be dotted, for nested classes), importing ``module`` without
    the current folder on the path; Refused where it does not exist or its import fails."""
    try:
        loaded = sys.modules.get(module)
        if loaded is None:
            with _without_current_folder():
                loaded = importlib.import_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # SystemExit from a command line, any failure at import
        if isinstance(error, ModuleNotFoundError) and error.name and module.startswith(error.name):
            raise Unimportable(
                f"the file's class {module}.{name} cannot be imported: no module named {error.name}; "
                "install its package, or set PYTHONPATH (PYTHONPATH=. for a module in this folder)"
            ) from error
        raise Unimportable(
            f"the file's class {module}.{name} lives in module {module}, which raised "
            f"{type(error).__name__} when imported: {first_line(error)}"
        ) from error
    obj: Any = loaded
    for part in name.split("."):
        if part.startswith("__") and part != name:
            raise Refused(f"the file names {module}.{name}, which is not a plain attribute path")
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            raise Unimportable(
                f"the file's class {module}.{name} cannot be imported: module {module} has no {name} "
                "(is the installed version the one the model was saved with?)"
            ) from None
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj


@contextmanager
def _without_current_folder() -> Iterator[None]:
    """``sys.path`` without the current folder ('' or its path) for the ``with`` block, unless
    PYTHONPATH names it: a stray ``.py`` beside a downloaded model is never imported."""
    cwd = os.path.realpath(os.getcwd())
    asked = {os.path.realpath(p or ".") for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != cwd or cwd in asked]
    try:
        yield
    finally:
        sys.path[:] = saved
