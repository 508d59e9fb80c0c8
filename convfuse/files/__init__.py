"""Files in and out: which format a file is, the trust boundary for what it may contain, where a
checkpoint keeps its model, and atomic writes of the fused one.

    reading      load / load_file: format -> safe unpickling (trust, unpickler, graph) -> checkpoints
    writing      save: checkpoints written back (writeback) -> temporary file -> rename
    formats      the format decision, output names, one-line refusals
    trust        the allow list: which names a file may use, decided before anything is imported
    unpickler    the restricted unpickler torch.load runs with
    graph        the check of the object graph a file built, before anything runs on it
    bounds       tensor views must fit their storages
    archives     zip archives as torch reads them, size caps, ExportedProgram vetting
    checkpoints  training frameworks' checkpoint dicts; writeback puts the fused model back in them
    architectures  --arch: torchvision names, timm:NAME, package.module:factory
    safetensors  safetensors files in and out
"""

from convfuse.files.checkpoints import Loaded
from convfuse.files.formats import EXTENSIONS, FORMATS, detect_format, output_format
from convfuse.files.reading import load, load_file
from convfuse.files.writing import check_writable, save, write_text

__all__ = [
    "EXTENSIONS", "FORMATS", "Loaded", "check_writable", "detect_format", "load", "load_file", "output_format", "save",
    "write_text",
]
