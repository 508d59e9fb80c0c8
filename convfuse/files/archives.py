"""Zip archives as torch reads them: the format decision, the size caps, and the vetting of
ExportedProgram (``.pt2``) archives before ``torch.export.load`` sees them.

The format is decided as torch decides it: a file is an archive when its first bytes are a zip
header (``torch.load`` checks exactly that), and its records are listed by torch's own reader, so
the records convfuse judges are the ones torch will read. An archive holding ``constants.pkl`` is
TorchScript (``torch.load`` itself would hand it to ``torch.jit.load``).

An ExportedProgram archive is accepted without ``--trust`` only when it holds nothing but what
``torch.export.save`` writes for a program (no AOTInductor library, no pickled payload, no
TorchScript object), its guard code is empty, every graph node targets an ATen or prims operator
outside an I/O deny list (or a listed higher-order, operator-module or symbolic-shape function),
and every symbolic expression (which ``torch.export.load`` hands to ``sympy.sympify``, an
``eval``) is a plain tree of sympy and torch shape functions.
"""

from __future__ import annotations

import ast
import io
import json
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convfuse.files.bounds import check_view
from convfuse.files.trust import Refused

__all__ = [
    "MAX_DIRECTORY_BYTES", "MAX_INFLATED_BYTES", "MAX_RECORD_BYTES", "ZIP_MAGIC", "Archive", "ArchiveError",
    "open_archive", "vet_exported",
]

MAX_RECORD_BYTES = 256 * 2**20
"""Largest pickle (``data.pkl``) or JSON record read into memory, and largest compressed member
(torch writes its records uncompressed): real models' pickles are a few MB at most."""

MAX_INFLATED_BYTES = 1 * 2**30
"""Largest total that the archive's compressed members may inflate to, all together (each is also
under ``MAX_RECORD_BYTES``). Stored members cannot add up to more than the file itself: no two
members may share bytes."""

MAX_DIRECTORY_BYTES = 16 * 2**20
"""Largest zip central directory (about 150,000 records of a torch archive): Python's zip reader
makes an object of every entry, so a directory of millions costs gigabytes before any check."""

ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


@dataclass(frozen=True)
class Archive:
    """A zip archive's records as torch's reader lists them (names below the archive's root)."""

    path: Path
    records: frozenset[str]
    reader: Any = field(repr=False, compare=False)  # torch._C.PyTorchFileReader

    @property
    def format(self) -> str | None:
        if "constants.pkl" in self.records or any(r.startswith("code/") for r in self.records):
            return "torchscript"
        if "archive_format" in self.records or any(_EXPORTED_MODEL.fullmatch(r) for r in self.records):
            return "exported"
        if "data.pkl" in self.records:
            return "pickle"
        return None

    def check_size(self, record: str) -> None:
        """Refused where ``record`` is larger than the cap (checked before it is inflated)."""
        size = int(self.reader.get_record_size(record))
        if size > MAX_RECORD_BYTES:
            raise Refused(f"its record {record} is {size:,} bytes, over the cap of {MAX_RECORD_BYTES:,}")

    def read(self, record: str) -> bytes:
        self.check_size(record)
        return bytes(self.reader.get_record(record))


class ArchiveError(Exception):
    """The archive cannot be read as torch writes archives; ``damaged`` says whether it looks like
    a damaged torch archive (rather than another program's zip file)."""

    def __init__(self, message: str, *, damaged: bool) -> None:
        super().__init__(message)
        self.damaged = damaged


def open_archive(path: Path) -> Archive:
    """The archive's records, after checking, before anything is inflated, that the members fit
    the caps and that Python's and torch's zip readers see the same members."""
    try:
        with open(path, "rb") as raw:
            _check_directory_size(raw)
            with zipfile.ZipFile(raw) as archive:
                members = archive.infolist()
            _check_layout(raw, members)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as error:
        raise ArchiveError(str(error) or type(error).__name__, damaged=True) from error
    names = [m.filename for m in members]
    root = names[0].split("/", 1)[0] if names else ""
    if not names or not all(n.startswith(root + "/") for n in names):
        raise ArchiveError("its members are not in one folder, as torch writes them", damaged=False)
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ArchiveError(f"two members are named {duplicate}", damaged=True)
    _check_inflation(members)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = frozenset(reader.get_all_records())
    except RuntimeError as error:
        raise ArchiveError(str(error).splitlines()[0] if str(error) else "unreadable", damaged=True) from error
    if {n.split("/", 1)[1] for n in names if not n.endswith("/")} != records:
        raise ArchiveError("torch's zip reader and Python's see different members", damaged=True)
    return Archive(path, records, reader)


def _check_directory_size(raw: Any) -> None:
    end = zipfile._EndRecData(raw)  # type: ignore[attr-defined]  # the end record, zip64 included
    if end is None:
        raise zipfile.BadZipFile("File is not a zip file")
    size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if size > MAX_DIRECTORY_BYTES:
        raise Refused(f"its zip directory is {size:,} bytes, over the cap of {MAX_DIRECTORY_BYTES:,}")


def _check_inflation(members: list[zipfile.ZipInfo]) -> None:
    """Refused where a compressed member, or all of them together, would inflate past the caps."""
    total = 0
    for member in members:
        if member.compress_type == zipfile.ZIP_STORED:
            continue
        total += member.file_size
        if member.file_size > MAX_RECORD_BYTES:
            raise Refused(
                f"its member {member.filename} would inflate to {member.file_size:,} bytes, over the cap of "
                f"{MAX_RECORD_BYTES:,} (torch.save writes uncompressed records)"
            )
        if total > MAX_INFLATED_BYTES:
            raise Refused(
                f"its compressed members would inflate to more than {MAX_INFLATED_BYTES:,} bytes together, "
                "over the cap (torch.save writes uncompressed records)"
            )


def _check_layout(raw: Any, members: list[zipfile.ZipInfo]) -> None:
    """Refused where two members share bytes (each would be read, and held, in full: a file of one
    record could yield thousands) or a stored member declares more bytes than it holds."""
    end_of_data = raw.seek(0, 2)
    previous_end, previous = 0, ""
    for member in sorted(members, key=lambda m: m.header_offset):
        if member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size:
            raise Refused(f"its stored member {member.filename} declares {member.file_size:,} bytes but holds "
                          f"{member.compress_size:,}")
        if member.header_offset < previous_end:
            raise Refused(f"its members {previous} and {member.filename} share bytes, as no zip writer lays them out")
        raw.seek(member.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if signature != ZIP_MAGIC:
            raise zipfile.BadZipFile(f"no member header where the directory places {member.filename}")
        previous_end = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length + member.compress_size
        previous = member.filename
        if previous_end > end_of_data:
            raise zipfile.BadZipFile(f"its member {member.filename} runs past the end of the file")


# -- ExportedProgram archives -------------------------------------------------------------

_NAME = r"[A-Za-z0-9_\-]+"
_EXPORTED_MODEL = re.compile(rf"models/{_NAME}\.json")
_EXPORTED_MEMBERS = (
    re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"),
    _EXPORTED_MODEL,
    re.compile(rf"data/weights/{_NAME}_weights_config\.json|data/weights/weight_\d+"),
    re.compile(rf"data/constants/{_NAME}_constants_config\.json|data/constants/tensor_\d+"),
    re.compile(rf"data/sample_inputs/{_NAME}\.pt"),
    re.compile(r"extra/[^\x00]+"),
)
_PAYLOAD_PATH = re.compile(r"(weight|tensor)_\d+")
_IO_OPERATORS = frozenset(("from_file", "save", "_print", "warn"))
"""ATen operators that read or write files or the terminal."""

_HIGHER_ORDER = frozenset(("torch.ops.higher_order.cond", "torch.ops.higher_order.map_impl"))
_OPERATOR_FUNCTIONS = frozenset((
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
))
_SYMBOLIC_FUNCTIONS = frozenset((
    "torch.sym_float", "torch.sym_int", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_ite",
    "torch.sym_sqrt", "torch._sym_sqrt", "math.ceil", "math.floor", "math.trunc", "math.sqrt",
))
_SYMPY_CORE = frozenset((
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "BooleanTrue", "BooleanFalse", "Tuple",
))
_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_ASSUMPTIONS = frozenset((
    "positive", "negative", "nonpositive", "nonnegative", "integer", "real", "finite", "infinite", "zero",
    "nonzero", "even", "odd", "rational", "commutative", "prime", "composite",
))


def vet_exported(archive: Archive) -> None:
    """Refused (saying what) unless the archive is a program as ``torch.export.save`` writes it; see
    the module doc."""
    for record in sorted(archive.records):
        if record.startswith("data/aotinductor/"):
            raise Refused(
                f"it holds an AOTInductor payload ({record}): a compiled library that torch.export.load "
                "would load and run"
            )
        if not any(pattern.fullmatch(record) for pattern in _EXPORTED_MEMBERS):
            raise Refused(f"it holds {record}, which torch.export.save does not write for a program")
    if archive.read("archive_format") != b"pt2":
        raise Refused("its archive_format record is not 'pt2'")
    for record in sorted(archive.records):
        if record.endswith("_config.json"):
            _vet_payloads(archive, record, _json(archive, record))
        elif record.startswith("data/sample_inputs/"):
            _vet_sample_inputs(record, archive.read(record))
        elif _EXPORTED_MODEL.fullmatch(record):
            _vet_program(record, _json(archive, record))


def _json(archive: Archive, record: str) -> Any:
    try:
        return json.loads(archive.read(record))
    except (ValueError, UnicodeDecodeError) as error:
        raise ArchiveError(f"its {record} is not valid JSON ({error})", damaged=True) from error
    except RecursionError as error:
        raise Refused(f"its {record} is JSON nested deeper than Python's reader goes") from error


def _vet_payloads(archive: Archive, record: str, document: Any) -> None:
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict) or not all(isinstance(p, dict) for p in config.values()):
        raise Refused(f"its {record} is not a payload description as torch.export.save writes it")
    for fqn, payload in config.items():
        if payload.get("use_pickle") or not _PAYLOAD_PATH.fullmatch(str(payload.get("path_name", ""))):
            raise Refused(
                f"{fqn} is stored as a Python pickle or an object (not raw tensor bytes), which "
                "torch.export.load unpickles without restrictions"
            )
        _vet_payload_view(archive, f"{record.rsplit('/', 1)[0]}/{payload['path_name']}", fqn, payload.get("tensor_meta"))


def _vet_payload_view(archive: Archive, record: str, fqn: str, meta: Any) -> None:
    """torch.export.load views each payload's bytes with the sizes and strides its config gives
    (``torch.as_strided``): they must fit those bytes as a pickled tensor's must fit its storage."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    what = f"its {fqn}"
    if not isinstance(meta, dict) or record not in archive.records:
        raise Refused(f"{what} has no tensor description or no payload, as torch.export.save writes them")
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype")) if isinstance(meta.get("dtype"), int) else None

    def ints(values: Any) -> list[Any]:
        if not isinstance(values, list) or not all(isinstance(v, dict) and set(v) == {"as_int"} for v in values):
            raise Refused(f"{what} has sizes or strides that are not plain integers")
        return [v["as_int"] for v in values]

    offset = meta.get("storage_offset")
    if dtype is None or not isinstance(offset, dict) or set(offset) != {"as_int"}:
        raise Refused(f"{what} has no dtype or offset as torch.export.save writes them")
    size = int(archive.reader.get_record_size(record))
    check_view(size, offset["as_int"], ints(meta.get("sizes")), ints(meta.get("strides")), dtype.itemsize, what)


def _vet_sample_inputs(record: str, data: bytes) -> None:
    """torch.export.load reads the sample inputs with torch's weights-only loader and, if that
    fails, without restrictions: they must pass the weights-only loader."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:
        raise Refused(
            f"its {record} is not readable by torch's weights-only loader ({type(error).__name__}), and "
            "torch.export.load would then unpickle it without restrictions"
        ) from error


def _vet_program(record: str, document: Any) -> None:
    if not isinstance(document, dict):
        raise Refused(f"its {record} is not a serialized program")
    if document.get("guards_code"):
        raise Refused(f"its {record} carries guard code, which ExportedProgram.module() would execute")
    for key in document.get("range_constraints") or {}:
        _vet_expression(record, key)
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            if isinstance(value.get("target"), str) and "inputs" in value:
                _vet_target(record, value["target"])
            for key, item in value.items():
                if key == "expr_str":
                    _vet_expression(record, item)
                elif key == "as_operator" and isinstance(item, str):
                    _vet_target(record, item)
                elif key == "as_custom_obj" and item is not None:
                    raise Refused(f"its {record} uses a TorchScript custom object, whose methods are code")
                else:
                    pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)


_OPERATOR = re.compile(r"torch\.ops\.(aten|prims)\.([a-z][A-Za-z0-9_]*|_[a-z][A-Za-z0-9_]*)\.([A-Za-z][A-Za-z0-9_]*)")


def _vet_target(record: str, target: str) -> None:
    operator = _OPERATOR.fullmatch(target)
    if operator is not None:
        namespace, name, overload = operator.groups()
        if name in _IO_OPERATORS:
            raise Refused(f"its {record} calls {target}, which reads or writes files")
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket) and overload in packet.overloads():
            return
        raise Refused(f"its {record} calls {target}, which is not a registered operator")
    if target in _HIGHER_ORDER or target in _SYMBOLIC_FUNCTIONS:
        return
    if target.startswith("_operator.") and target.split(".", 1)[1] in _OPERATOR_FUNCTIONS:
        return
    raise Refused(f"its {record} calls {target}, which is not an ATen or prims operator")


def _sympy_functions() -> frozenset[str]:
    import sympy
    from torch.utils._sympy import functions

    torch_functions = {
        name for name, obj in vars(functions).items() if isinstance(obj, type) and issubclass(obj, sympy.Basic)
    }
    return _SYMPY_CORE | torch_functions


def _vet_expression(record: str, text: Any) -> None:
    """Refused unless ``text`` is a tree of calls of sympy/torch shape classes on numbers, names
    and strings: what ``sympy.sympify`` may evaluate without running anything else."""
    if not isinstance(text, str) or len(text) > 100_000:
        raise Refused(f"its {record} holds a symbolic expression that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise Refused(f"its {record} holds a symbolic expression that does not parse: {text[:80]!r}") from error
    allowed_calls = _sympy_functions()
    names = {  # the one place a string may stand: the name of a symbol (sympy parses any other string)
        id(node.args[0]) for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Symbol", "Dummy")
        and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        and _SYMBOL_NAME.fullmatch(node.args[0].value)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in allowed_calls:
                raise Refused(f"its {record} holds a symbolic expression calling something else: {text[:80]!r}")
            for keyword in node.keywords:
                if keyword.arg not in _ASSUMPTIONS or not (
                    isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, bool)
                ):
                    raise Refused(f"its {record} holds a symbolic expression with odd arguments: {text[:80]!r}")
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in names or not isinstance(node.value, (int, float, str)):
                raise Refused(f"its {record} holds a symbolic expression with a {type(node.value).__name__} "
                              f"where sympy would parse it: {text[:80]!r}")
        elif not isinstance(node, (ast.Expression, ast.Name, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd, ast.BinOp,
                                   ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.keyword)):
            raise Refused(f"its {record} holds a symbolic expression that is not plain arithmetic: {text[:80]!r}")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise Refused(f"its {record} holds a symbolic expression naming {node.id}")
        exponent = _exponent(node)
        if exponent is not None and not _small_or_symbolic(exponent):
            raise Refused(f"its {record} holds a power whose evaluation could take any time: {text[:80]!r}")


_POWERS = ("Pow", "PowByNatural", "FloatPow")


def _exponent(node: ast.AST) -> ast.AST | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return node.right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _POWERS and len(node.args) == 2:
        return node.args[1]
    return None


def _small_or_symbolic(node: ast.AST) -> bool:
    """A power's exponent sympy will not blow up on: a small integer literal, or anything holding a
    symbol (which sympy leaves unevaluated)."""
    literal = node.args[0] if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Integer" and node.args else node
    if isinstance(literal, ast.UnaryOp):
        literal = literal.operand
    if isinstance(literal, ast.Constant) and isinstance(literal.value, (int, float)):
        return abs(literal.value) <= 64
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("Symbol", "Dummy") for n in ast.walk(node))
