"""CLIP checkpoints: download OpenAI's into a cache with a SHA-256 check, and read them without running their code.

OpenAI's files are TorchScript archives. TorchScript's own loader would run code from the file, and
torch.load(weights_only=True) refuses them, so the archive's data.pkl is read here with an unpickler that can only
rebuild tensors. open_clip's state_dicts (RemoteCLIP, GeoRSCLIP, ...) use OpenAI's names; Hugging Face's CLIPModel
files (safetensors, read here without the safetensors package, or pytorch_model.bin) are renamed to them.
"""
import collections
import hashlib
import http.client
import json
import math
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
        raise ConnectionError(f"could not download {url}: {e}") from e
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


def _read_torchscript(path):
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
            root = RestrictedUnpickler(f, archive, prefix).load()
    if not isinstance(root, ScriptModuleState):
        raise pickle.UnpicklingError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return _collect_tensors(root, "", {})


def _read_saved(path):
    """A torch.save'd state_dict, also inside an open_clip training checkpoint ({"epoch", "state_dict", ...})."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither a TorchScript archive nor a state_dict file torch.load can read "
                         f"safely: {e}") from e
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    return state_dict


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


_HUGGING_FACE_NAMES = [  # substrings of transformers' CLIPModel names -> OpenAI's, replaced in this order
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"), ("text_projection.weight", "text_projection"),
]


def from_hugging_face(state_dict):
    """A transformers CLIPModel state_dict under OpenAI's names; a key it cannot place keeps its name."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("embeddings.position_ids"):
            continue  # a buffer holding 0..n-1, not a weight
        for old, new in _HUGGING_FACE_NAMES:
            name = name.replace(old, new)
        # Hugging Face's projections are nn.Linear weights [out, in]; OpenAI's are matrices x @ proj.
        out[name] = tensor.t() if name in ("visual.proj", "text_projection") else tensor
    for q_name in [k for k in out if ".self_attn.q_proj." in k]:  # separate q, k, v -> nn.MultiheadAttention's in_proj
        qkv = [out.pop(q_name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[q_name.replace("self_attn.q_proj.", "attn.in_proj_")] = torch.cat(qkv)
    return out


def hugging_face_activation(config_path):
    """The MLP activation a transformers CLIPConfig (config.json) records; checks what clip_min cannot vary."""
    with open(config_path) as f:
        config = json.load(f)
    towers = {"text": (512, 8), "vision": (768, 12)}  # transformers' defaults (width, heads) where a key is left out
    activations = set()
    for tower, (width, heads) in towers.items():
        # Old files also hold text_config_dict / vision_config_dict, which win, as in transformers.
        settings = {**(config.get(f"{tower}_config") or {}), **(config.get(f"{tower}_config_dict") or {})}
        if settings.get("hidden_size", width) != 64 * settings.get("num_attention_heads", heads):
            raise ValueError(f"{config_path}: the {tower} tower's attention heads are not 64 wide, as clip_min's are")
        activations.add(settings.get("hidden_act", "quick_gelu"))
    if len(activations) != 1:
        raise ValueError(f"{config_path}: the towers use different activations {sorted(activations)}; clip_min has one")
    return activations.pop()


def _weights_file(path):
    """path itself, or the weights file of a Hugging Face model folder."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    return path


def read_weights(path):
    """(name -> tensor under OpenAI's names, floating point in fp32; the MLP activation the file records or None)
    from anything load() accepts except a model name; never runs code from the file."""
    path = _weights_file(os.fspath(path))
    activation = None
    if path.endswith(".safetensors"):
        state_dict = read_safetensors(path)
    elif (state_dict := _read_torchscript(path)) is not None:
        activation = "quick_gelu"  # OpenAI's architecture
    else:
        state_dict = _read_saved(path)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in state_dict):
        state_dict = from_hugging_face(state_dict)
        config = os.path.join(os.path.dirname(path), "config.json")
        activation = hugging_face_activation(config) if os.path.isfile(config) else None
    # One copy per tensor: fp16 -> fp32, and no storage shared with other tensors or the file's buffers.
    return {name: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype, memory_format=torch.contiguous_format,
                       copy=True) for name, t in state_dict.items()}, activation


def read_state_dict(path):
    """name -> tensor (floating point ones in fp32, OpenAI's names) from an OpenAI TorchScript archive, a
    torch.save'd or open_clip state_dict, a safetensors file or a Hugging Face CLIP; never runs code from it."""
    return read_weights(path)[0]


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
        raise ValueError(f"{path} is not a zip file written by torch.save (files of torch < 1.6 are not read)")
    with zipfile.ZipFile(path) as archive:
        prefix = _pickle_prefix(archive)
        if prefix is None:
            raise ValueError(f"{path} has no <folder>/data.pkl: not a file written by torch.save")
        with archive.open(f"{prefix}/data.pkl") as f:
            return CheckpointUnpickler(f, archive, prefix).load()


def load(name_or_path, device="cpu", download_root=None, activation=None):
    """(model, preprocess) for a name in available_models() (downloaded once, then cached), a weights file (see
    read_state_dict) or a Hugging Face CLIP folder (config.json and model.safetensors or pytorch_model.bin).

    activation: the MLP's, "quick_gelu" or "gelu" (model.config.activation). None takes what the file records
    (OpenAI's archives: QuickGELU; Hugging Face: config.json's hidden_act); a state_dict cannot tell, so QuickGELU is
    assumed and said on stderr.
    """
    if name_or_path in MODELS:
        path = download(*MODELS[name_or_path], root=download_root)
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        raise FileNotFoundError(f"model {name_or_path!r} is neither a known name nor a file; "
                                f"available models: {available_models()}")
    state_dict, recorded = read_weights(path)
    model = build_model(state_dict, activation or recorded or "quick_gelu").to(device).eval()
    if activation is None and recorded is None:
        print(f"{path} does not record CLIP's activation: assumed QuickGELU (OpenAI's); for a model trained with the "
              "exact GELU (e.g. open_clip's ViT-B-32) pass activation='gelu' (--clip-activation gelu)", file=sys.stderr)
    return model, transform(model.visual.input_resolution)
