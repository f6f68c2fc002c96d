"""Everything about the authors' released PE-RSITR code (github.com/ZhanYang-nwpu/PE-RSITR), in one place for an
auditor: the layout and key names of the checkpoints their train.py saves, loading them without running code from
them, and their validation split draw. Their training step, which the benchmark times ours against, is
benchmarks/released_path.py.
"""
import os
import random

import torch

import adapter
import clip_min
import recipe

# The authors' names for the MRS-Adapter's layers -> ours.
OFFICIAL_MRS_NAMES = {"visual_down_proj": "image_down", "down_proj": "text_down", "visual_up_proj": "image_up",
                      "up_proj": "text_up", "share_up_proj": "shared_up"}


def released_state_dict(path):
    """The 'model' state_dict of a checkpoint saved by the authors' train.py ({'epoch', 'model', 'options', ...}, the
    options holding CLIP's preprocessing objects): tensors come back, every other object as an inert stand-in."""
    checkpoint = clip_min.formats.read_checkpoint(path)
    if isinstance(checkpoint, dict) and "trainable" in checkpoint:
        raise ValueError(f"{path} is a checkpoint written by this project's train.py, not the released code: score it "
                         f"with evaluate.py --checkpoint {path}")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        raise ValueError(f"{path} is not a checkpoint saved by the released PE-RSITR code (no 'model' state_dict)")
    return checkpoint["model"]


def load_official_mrs(model, source):
    """Import MRS-Adapter weights trained with the authors' released code: their state_dict, or the path of the
    checkpoint their train.py saved (model_best.pth.tar), read without running any code from it.

    Their adapter sat at `Uniadapt` inside `PE_RSITR` inside their `Model`, maybe under DataParallel's `module.`
    prefix: keys such as `PE_RSITR.Uniadapt.visual_down_proj.weight`, `module.Uniadapt.down_proj.bias` or the bare
    names are read, the rest ignored.
    """
    if not isinstance(getattr(model, "mrs_adapter", None), adapter.MRSAdapter):
        raise ValueError("the model has no MRS-Adapter; call apply(model, 'mrs') first")
    state_dict = released_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
    found = {k.removeprefix("module.").removeprefix("PE_RSITR.").removeprefix("Uniadapt."): v
             for k, v in state_dict.items()}
    pairs = []
    for official, ours in OFFICIAL_MRS_NAMES.items():
        for kind in ("weight", "bias"):
            key, target = f"{official}.{kind}", getattr(getattr(model.mrs_adapter, ours), kind)
            if key not in found:
                raise ValueError(f"released MRS-Adapter tensor {key!r} is missing (looked for it bare and under "
                                 f"'[module.][PE_RSITR.]Uniadapt.'); the state_dict has {len(state_dict)} keys")
            if tuple(found[key].shape) != tuple(target.shape):
                raise ValueError(f"released MRS-Adapter tensor {key!r} has shape {tuple(found[key].shape)}, but this "
                                 f"model's adapter needs {tuple(target.shape)} (a different CLIP or bottleneck?)")
            pairs.append((target, found[key]))
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)


def official_model(path, device):
    """The model a checkpoint of the authors' released train.py holds: their CLIP (their optimizer took every
    parameter, so it trained too) with their MRS-Adapter. Says how far that CLIP moved from OpenAI's ViT-B/32 when
    OpenAI's file is in clip_min's download cache."""
    weights = released_state_dict(path)
    prefix = "PE_RSITR.model."
    clip = {k.removeprefix("module.")[len(prefix):]: v for k, v in weights.items()
            if k.removeprefix("module.").startswith(prefix)}
    if not clip:
        raise ValueError(f"{path} holds no CLIP weights under '{prefix}'")
    model = adapter.apply(clip_min.build_model(clip), "mrs")
    load_official_mrs(model, weights)
    openai = os.path.join(os.path.expanduser(clip_min.download.DEFAULT_ROOT), "ViT-B-32.pt")
    if os.path.isfile(openai):
        theirs = clip_min.weights.read_state_dict(openai)
        change = max((clip[k].float() - v).abs().max().item() for k, v in theirs.items() if k in clip)
        print(f"its CLIP differs from OpenAI's ViT-B/32 ({openai}) by at most {change:.3g} per weight")
    else:
        print(f"OpenAI's ViT-B/32 is not in {os.path.dirname(openai)}: how far its CLIP moved is not measured")
    return model.to(device).eval()


def released_split(n_images, seed, split):
    """Indices (in file order) of the training file's images in `split` ("train" or "val"), drawn as the authors'
    train.py draws them: random.seed(seed), one random.shuffle of the image groups in file order, the first
    int(0.8 * n) for training and the rest for validation. The shuffle depends only on n and the seed."""
    order = list(range(n_images))
    random.Random(seed).shuffle(order)
    cut = int(n_images * recipe.TRAIN_FRACTION)  # the released expression, so the float rounding is theirs too
    return sorted(order[:cut] if split == "train" else order[cut:])
