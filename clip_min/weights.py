"""What turns a model name, a weights file or a Hugging Face CLIP folder into a CLIP model, never running code from it.

Names are OpenAI's released checkpoints (see download); files are read by formats. open_clip's state_dicts (RemoteCLIP,
GeoRSCLIP, ...) use OpenAI's names; Hugging Face's CLIPModel files are renamed to them.
"""
import os
import sys

import torch

from .download import MODELS, available_models, download
from .formats import read_safetensors, read_saved, read_torchscript
from .hugging_face import from_hugging_face, hugging_face_activation
from .model import build_model
from .transform import transform


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
    elif (state_dict := read_torchscript(path)) is not None:
        activation = "quick_gelu"  # OpenAI's architecture
    else:
        state_dict = read_saved(path)
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
