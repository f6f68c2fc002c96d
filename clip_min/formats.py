"""Readers of the weights and checkpoint file formats that never run code from the file.

OpenAI's files are TorchScript archives. TorchScript's own loader would run code from the file, and
torch.load(weights_only=True) refuses them, so the archive's data.pkl is read here with an unpickler that can only
rebuild tensors; training checkpoints go through the same unpickler with inert stand-ins for what they name, and
safetensors files are read without the safetensors package.
"""
import collections
import json
import math
import os
import pickle
import zipfile

import torch


class UnreadableFile(pickle.UnpicklingError, ValueError):
    """A file that is damaged, of another kind, or holds what a safe reader refuses; the message names the file.
    A ValueError for callers that report bad inputs, an UnpicklingError for those that expect the unpickler's."""


def why_unreadable(path):
    """What a file that failed to read looks like, for the message: cut short, text, or of some other kind."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "is empty"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "is cut short or damaged (a zip archive without its end: an interrupted copy, download or save?)"
    try:
        head.decode("utf-8")
        return "is a text file, not a weights or checkpoint file"
    except UnicodeDecodeError:
        return "is in none of the formats read here (torch.save's zip, TorchScript, safetensors), or it is damaged"


def _unloadable(path, error):
    """Why torch.load(weights_only=True) failed on path, as "is ..." or "holds ...", without torch's own advice."""
    if zipfile.is_zipfile(path) and "weights_only" in str(error):
        return ("holds objects other than tensors (a pickled model, options or code), refused since loading them "
                "would run code from the file (a checkpoint of the authors' released code? evaluate.py "
                "--official-checkpoint reads those)")
    return why_unreadable(path)


def torch_load(path):
    """torch.load(weights_only=True): tensors and plain containers only. A failure is an UnreadableFile that says
    what the file is, never torch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, KeyError, EOFError... for damaged files
        raise UnreadableFile(f"{path} {_unloadable(path, e)}") from e


def _unpickle(unpickler, path):
    """unpickler.load(), any failure an UnreadableFile naming the file (a refused global, a storage cut short)."""
    try:
        return unpickler.load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
        raise UnreadableFile(f"{path}: {e}") from e


class ScriptModuleState:
    """Stands in for any TorchScript module class of the archive: it only keeps the attributes it is given."""
    attributes = None

    def __setstate__(self, attributes):
        self.attributes = attributes


_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage, offset, size, stride, *unused):  # the arguments of torch._utils._rebuild_tensor_v2
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not from an archive storage")
    return storage.as_strided(size, stride, offset)  # raises if the view would reach outside the storage


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,  # an nn.Parameter's tensor
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_tag: value,  # a list/dict already built
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl into tensors and inert ScriptModuleState trees; refuses every other global."""

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # persistent_load receives the dtype in place of the storage class
        if module.startswith("__torch__."):
            return ScriptModuleState
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a weights file may only "
                                     "contain tensors and TorchScript modules")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            if len(data) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} holds {len(data)} bytes, expected {numel} x {dtype}")
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _collect_tensors(state, prefix, out):
    if not isinstance(state.attributes, dict):
        raise pickle.UnpicklingError(f"TorchScript module {prefix or '<root>'} has no attribute dict")
    for name, value in state.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptModuleState):
            _collect_tensors(value, f"{prefix}{name}.", out)
    return out


def _pickle_prefix(archive):
    """The folder holding data.pkl in a zip written by torch.save or torch.jit.save, or None."""
    prefixes = [n[:-len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    return prefixes[0] if len(prefixes) == 1 else None


def read_torchscript(path):
    """The state_dict of an OpenAI (TorchScript) archive, or None for any other file."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        prefix = _pickle_prefix(archive)
        # TorchScript archives carry code and constants beside data.pkl; torch.save'd zips do not.
        if prefix is None or not any(n.startswith((f"{prefix}/code/", f"{prefix}/constants.pkl"))
                                     for n in archive.namelist()):
            return None
        with archive.open(f"{prefix}/data.pkl") as f:
            root = _unpickle(RestrictedUnpickler(f, archive, prefix), path)
    if not isinstance(root, ScriptModuleState):
        raise pickle.UnpicklingError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return _collect_tensors(root, "", {})


def read_saved(path):
    """A torch.save'd state_dict, also inside an open_clip training checkpoint ({"epoch", "state_dict", ...})."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # as torch_load, with the formats this reader tried named
        raise UnreadableFile(f"{path} is neither a TorchScript archive nor a state_dict file torch.load can read "
                             f"safely: it {_unloadable(path, e)}") from e
    if isinstance(state_dict, dict) and "trainable" in state_dict:
        raise ValueError(f"{path} is a checkpoint written by train.py (an adapter's weights, not a CLIP's): score it "
                         f"with evaluate.py --checkpoint {path}, or continue its run with train.py --resume")
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    return state_dict


class Inert:
    """Stands in for a class or function a checkpoint names: never imported, never run. It keeps what the file
    passes to it: the arguments of a call in `args`, pickled state in `state`; `global_name` says whom it replaces."""
    global_name = None

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Inert({self.global_name}, args={self.args!r}, state={self.state!r})"


class CheckpointUnpickler(RestrictedUnpickler):
    """Tensors and plain containers as they were saved; every other global becomes a subclass of Inert."""

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # the name protocol 2 (torch.save's) writes
        if module == "builtins" and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]  # they only iterate and hash what they are given
        if (module, name) in _ALLOWED or (module == "torch" and name in _STORAGE_DTYPES):
            return super().find_class(module, name)
        # A class, not an instance: pickle instantiates what a reduce or NEWOBJ names.
        return type(f"Inert({module}.{name})", (Inert,), {"global_name": f"{module}.{name}"})


def read_checkpoint(path):
    """The object a torch.save'd zip file holds (e.g. a training checkpoint with an argparse.Namespace and
    torchvision transforms inside), without importing or calling anything the file names: tensors, dicts, lists,
    tuples and OrderedDicts come back as saved, every other object or function as an Inert stand-in."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise UnreadableFile(f"{path} is not a zip file written by torch.save (files of torch < 1.6 are not read): "
                             f"it {why_unreadable(path)}")
    with zipfile.ZipFile(path) as archive:
        prefix = _pickle_prefix(archive)
        if prefix is None:
            raise UnreadableFile(f"{path} has no <folder>/data.pkl: not a file written by torch.save")
        with archive.open(f"{prefix}/data.pkl") as f:
            return _unpickle(CheckpointUnpickler(f, archive, prefix), path)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """name -> tensor from a .safetensors file: an 8-byte little-endian header size, a JSON header giving each
    tensor's dtype, shape and [begin, end) byte offsets into the data that follows, then the data."""
    def malformed(why):
        return ValueError(f"{path} is not a valid safetensors file: {why}")

    def non_negative_ints(value):
        return isinstance(value, list) and all(isinstance(n, int) and n >= 0 for n in value)

    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header_size = int.from_bytes(f.read(8), "little")
        if file_size < 8 or 8 + header_size > file_size:
            raise malformed(f"truncated: {file_size} bytes cannot hold the 8-byte size and a {header_size}-byte header")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:  # also a UnicodeDecodeError
            raise malformed(f"the header is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise malformed("the header is not a JSON object")
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            entry = entry if isinstance(entry, dict) else {}
            dtype, shape, offsets = (SAFETENSORS_DTYPES.get(entry.get("dtype")), entry.get("shape"),
                                     entry.get("data_offsets"))
            if dtype is None or not non_negative_ints(shape) or not non_negative_ints(offsets) or len(offsets) != 2:
                raise malformed(f"tensor {name!r} has no supported dtype, shape and data_offsets: {entry}")
            (begin, end), size = offsets, math.prod(shape) * dtype.itemsize
            if end - begin != size:
                raise malformed(f"tensor {name!r} spans {end - begin} bytes, its shape and dtype need {size}")
            if 8 + header_size + end > file_size:
                raise malformed(f"truncated: tensor {name!r} ends past the end of the file")
            f.seek(8 + header_size + begin)
            data = bytearray(f.read(size))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)  # frombuffer: not empty
            tensors[name] = flat.reshape(shape)
    return tensors
