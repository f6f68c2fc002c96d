"""Everything about the authors' released PE-RSITR code (github.com/ZhanYang-nwpu/PE-RSITR), in one place for an
auditor: the layout and key names of the checkpoints their train.py saves, loading them without running code from
them, their validation split draw, and their training step (the path bench.py times ours against).
"""
import copy
import os
import random
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapter
import clip_min
import losses
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


class ReleasedPath(nn.Module):
    """The baseline, holding exactly the weights of `ours`. fp16: the backbone's, as the released code on a GPU."""

    def __init__(self, ours, fp16=False):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
            from clip import model as openai  # OpenAI's reference code (PyPI clip-anytorch)
        c = ours.config
        self.clip = openai.CLIP(c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width, c.patch_size,
                                c.context_length, c.vocab_size, c.text_width, c.text_width // 64, c.text_layers)
        self.clip.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mrs_adapter.")})
        self.clip.requires_grad_(False)
        if fp16:
            openai.convert_weights(self.clip)
        self.adapter = nn.ModuleDict({official: copy.deepcopy(getattr(ours.mrs_adapter, mine))  # released names
                                      for official, mine in OFFICIAL_MRS_NAMES.items()})
        self.adapter_dropout = ours.mrs_adapter.dropout.p
        self.to(ours.text_projection.device).train(ours.training)

    def blocks(self, x, resblocks, visual):
        a = self.adapter
        down, up = (a.visual_down_proj, a.visual_up_proj) if visual else (a.down_proj, a.up_proj)
        x = x.permute(1, 0, 2)  # NLD -> LND, the reference blocks' layout
        for block in resblocks:
            x = x + block.attention(block.ln_1(x))
            h = F.dropout(F.relu(down(x.float())), self.adapter_dropout, self.training)  # the adapter runs in fp32
            x = x + block.mlp(block.ln_2(x)) + torch.cat([up(h), a.share_up_proj(h)], dim=-1).to(x.dtype)
        return x.permute(1, 0, 2)

    def encode_image(self, images, p):
        v = self.clip.visual
        x = v.conv1(images.type(v.conv1.weight.dtype)).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        x = self.blocks(F.dropout(x, p, self.training), v.transformer.resblocks, True)  # p > 0: the augmented view
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, tokens, p):
        dtype = self.clip.dtype
        x = self.clip.token_embedding(tokens).type(dtype) + self.clip.positional_embedding.type(dtype)
        x = self.blocks(F.dropout(x, p, self.training), self.clip.transformer.resblocks, False)
        x = self.clip.ln_final(x).type(dtype)
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ self.clip.text_projection

    def step(self, optimizer, images, tokens, margin=recipe.MARGIN):
        """Four passes (clean and augmented, image and text), HMMC, backward, Adam. Returns the loss."""
        image, image_aug = self.encode_image(images, 0.0), self.encode_image(images, recipe.VIEW_DROPOUT)
        text, text_aug = self.encode_text(tokens, 0.0), self.encode_text(tokens, recipe.VIEW_DROPOUT)
        loss, _ = losses.hmmc(image.float(), text.float(), image_aug.float(), text_aug.float(), margin=margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
