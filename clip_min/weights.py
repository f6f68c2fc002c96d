"""OpenAI's CLIP checkpoints: download into a cache with a SHA-256 check, and read them without running their code.

OpenAI's files are TorchScript archives. TorchScript's own loader would run code from the file, and
torch.load(weights_only=True) refuses them, so the archive's data.pkl is read here with an unpickler that can only
rebuild tensors.
"""
import collections
import hashlib
import http.client
import os
import pickle
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

import torch

from .model import build_model
from .transform import transform

DEFAULT_ROOT = "~/.cache/clip"
_BASE_URL = "https://openaipublic.azureedge.net/clip/models"


def _entry(sha256, filename):
    # The URL's path segment is the file's SHA-256.
    return f"{_BASE_URL}/{sha256}/{filename}", sha256


MODELS = {  # name -> (url, sha256)
    "ViT-B/32": _entry("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _entry("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _entry("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _entry("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                             "ViT-L-14-336px.pt"),
}


def available_models():
    """Names load() accepts besides a file path."""
    return list(MODELS)


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, out):
    """Stream `url` into the open file `out` with a progress line on stderr; return the data's SHA-256."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                total_text = f"{total / 2**20:.1f}" if total else "?"
                print(f"\rDownloading {name}: {done / 2**20:.1f}/{total_text} MiB", end="", file=sys.stderr, flush=True)
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError is an OSError
        raise RuntimeError(f"could not download {url}: {e}") from e
    finally:
        print(file=sys.stderr, flush=True)
    return digest.hexdigest()


def download(url, sha256, root=None):
    """Path of the file at `url` in the cache folder `root`, downloaded first unless a copy with this SHA-256 is there."""
    root = os.path.expanduser(root or DEFAULT_ROOT)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, os.path.basename(urllib.parse.urlparse(url).path))
    sha256 = sha256.lower()
    if os.path.isfile(path):
        if _sha256_of(path) == sha256:
            return path
        print(f"{path} exists but its SHA-256 does not match; downloading it again", file=sys.stderr)
    # Written beside the target and renamed only once verified, so the cache never holds a partial or wrong file.
    fd, tmp_path = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out)
        if actual != sha256:
            raise RuntimeError(f"downloaded {url} but its SHA-256 is {actual}, expected {sha256}; the file was discarded")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


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


def _read_torchscript(archive, prefix):
    with archive.open(f"{prefix}/data.pkl") as f:
        root = RestrictedUnpickler(f, archive, prefix).load()
    if not isinstance(root, ScriptModuleState):
        raise pickle.UnpicklingError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return _collect_tensors(root, "", {})


def read_state_dict(path):
    """name -> tensor (floating point ones in fp32) from an OpenAI TorchScript archive or a torch.save'd state_dict;
    never runs code from it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    state_dict = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefixes = [n[:-len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            # TorchScript archives carry code and constants beside data.pkl; torch.save'd zips do not.
            if len(prefixes) == 1 and any(n.startswith((f"{prefixes[0]}/code/", f"{prefixes[0]}/constants.pkl"))
                                          for n in names):
                state_dict = _read_torchscript(archive, prefixes[0])
    if state_dict is None:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a TorchScript archive nor a state_dict file torch.load can read "
                             f"safely: {e}") from e
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    # One copy per tensor: fp16 -> fp32, and no storage shared with other tensors or the file's buffers.
    return {name: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype, memory_format=torch.contiguous_format,
                       copy=True) for name, t in state_dict.items()}


def load(name_or_path, device="cpu", download_root=None):
    """(model, preprocess) for a name in available_models() (downloaded once, then cached) or a weights file."""
    if name_or_path in MODELS:
        path = download(*MODELS[name_or_path], root=download_root)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise ValueError(f"model {name_or_path!r} is neither a known name nor a file; "
                         f"available models: {available_models()}")
    model = build_model(read_state_dict(path)).to(device).eval()
    return model, transform(model.visual.input_resolution)
