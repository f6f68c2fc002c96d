"""PE-RSITR's MRS-Adapter on a clip_min CLIP, and `apply`, which attaches it or any PETL baseline (baselines/).

    model = adapter.apply(clip_min.load("ViT-B/32")[0], "mrs")   # CLIP frozen, only the adapter trains
    image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    torch.save(adapter.trainable_state_dict(model), "mrs.pt")   # 161,088 numbers instead of CLIP's 151M

Methods attach as modules: MRSBlock (like the block-level baselines) replaces CLIP's residual blocks with blocks that
hold the backbone's own modules, the others take CLIP's extension points (text_prompt, image_head, text_head), so the
backbone's parameter names (and OpenAI checkpoints) stay valid after apply.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import recipe
from baselines.adapters import BackboneBlock

# Every method with its options and their defaults (override them as keyword arguments of apply).
METHOD_OPTIONS = {
    "zeroshot": {},  # frozen CLIP, nothing trained
    "full": {},  # full fine-tuning: every CLIP parameter trains
    "mrs": dict(bottleneck=recipe.MRS_BOTTLENECK, dropout=recipe.MRS_DROPOUT),  # the paper's MRS-Adapter
    **baselines.METHOD_OPTIONS,  # the PETL baselines of the paper's benchmark
}
METHODS = tuple(METHOD_OPTIONS)


class MRSAdapter(nn.Module):
    """The multimodal remote sensing adapter: ONE instance serves every block of both encoders.

    Per-modality down-projection, ReLU, dropout, then the concatenation of a per-modality up-projection
    (to width - bottleneck) and an up-projection shared by both modalities (bottleneck -> bottleneck).
    """

    def __init__(self, image_width, text_width, bottleneck=recipe.MRS_BOTTLENECK, dropout=recipe.MRS_DROPOUT):
        super().__init__()
        if min(image_width, text_width) <= bottleneck:
            raise ValueError(f"MRS-Adapter bottleneck {bottleneck} must be smaller than both encoder widths "
                             f"(image {image_width}, text {text_width})")
        self.image_down = nn.Linear(image_width, bottleneck)
        self.text_down = nn.Linear(text_width, bottleneck)
        self.image_up = nn.Linear(bottleneck, image_width - bottleneck)
        self.text_up = nn.Linear(bottleneck, text_width - bottleneck)
        self.shared_up = nn.Linear(bottleneck, bottleneck)
        self.dropout = nn.Dropout(dropout)
        # Up-projections and all biases start at zero, so the adapted model starts as exactly the frozen CLIP.
        for layer in (self.image_down, self.text_down, self.image_up, self.text_up, self.shared_up):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
            nn.init.zeros_(layer.bias)
        for layer in (self.image_up, self.text_up, self.shared_up):
            nn.init.zeros_(layer.weight)

    def forward(self, x, modality):
        down, up = (self.image_down, self.image_up) if modality == "image" else (self.text_down, self.text_up)
        # Computed in fp32 even under autocast, as the released module does; the block casts the result back.
        with torch.autocast(x.device.type, enabled=False):
            h = self.dropout(F.relu(down(x.float())))
            return torch.cat([up(h), self.shared_up(h)], dim=-1)


class MRSBlock(BackboneBlock):
    """PE-RSITR: the one MRS-Adapter shared by every block of both encoders, beside the MLP."""

    def __init__(self, block, shared_adapter, modality):
        super().__init__(block)
        # A plain call, not a submodule: the one MRSAdapter is registered once, as model.mrs_adapter, and a
        # checkpoint stores it once instead of once per block.
        self.shared_adapter = functools.partial(shared_adapter, modality=modality)

    def forward(self, x):
        # x = x + Attn(LN1(x));  x = x + MLP(LN2(x)) + Adapter(x)   (the adapter reads the residual stream)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x)) + self.shared_adapter(x).to(x.dtype)


def checked_options(method, options, context_length):
    """The method's defaults overridden by `options`, validated."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options (with defaults) are "
                         f"{METHOD_OPTIONS[method] or 'none'}")
    return baselines.check_options(method, {**METHOD_OPTIONS[method], **options}, context_length)


def apply(model, method="mrs", **options):
    """Attach `method` to a clip_min CLIP in place, freeze everything it does not train, return the model.

    The model's encode_image / encode_text then include the method. The method's name and options are kept
    in model.petl_method and model.petl_options (all a checkpoint needs to rebuild it).
    """
    options = checked_options(method, options, len(model.positional_embedding))
    if hasattr(model, "petl_method"):
        raise ValueError(f"this model already has {model.petl_method!r} attached; apply a method to a fresh model")
    device = model.text_projection.device
    model.requires_grad_(method == "full")  # new parameters created below are trainable by default
    if method == "mrs":
        model.mrs_adapter = MRSAdapter(model.visual.transformer.width, model.transformer.width, **options)
        for modality, tower in (("image", model.visual.transformer), ("text", model.transformer)):
            for i, block in enumerate(tower.resblocks):
                tower.resblocks[i] = MRSBlock(block, model.mrs_adapter, modality)
    elif method in baselines.METHOD_OPTIONS:
        baselines.attach(model, method, options)
    model.to(device).train(model.training)  # new modules take the model's device and train/eval mode
    model.petl_method, model.petl_options = method, options
    return model


def encode_views(model, images, tokens, p=recipe.VIEW_DROPOUT):
    """Clean and augmented embeddings of a batch in ONE pass: (image, text, image_aug, text_aug).

    The paper's augmented views: element-wise dropout (p) on each frozen encoder's input embeddings (the image
    after ln_pre, the text after token + positional embedding), active only in training. Clean and dropped
    embeddings go through each transformer as one batch of 2B sequences; the adapter's own dropout then
    differs between the two halves by itself. In eval mode both views equal encode_image / encode_text.
    """
    x = model.visual.embed(images.to(model.visual.conv1.weight.dtype))
    x = torch.cat([x, F.dropout(x, p, model.training)])
    image, image_aug = model.pool_image(model.visual.transformer(x)).chunk(2)
    t, tokens = model.embed_text(tokens)
    t = torch.cat([t, F.dropout(t, p, model.training)])
    text, text_aug = model.pool_text(model.transformer(t), torch.cat([tokens, tokens])).chunk(2)
    return image, text, image_aug, text_aug


class ViewsEncoder(nn.Module):
    """The clean and augmented embeddings of a batch in one pass, as a module DDP can wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        # CLIP's temperature rides along for the InfoNCE loss (trainable only under full fine-tuning).
        return (*encode_views(self.model, images, tokens), self.model.logit_scale.exp())


def count_trainable(model):
    """Number of trainable parameters, each shared tensor once (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_state_dict(model):
    """What the attached method trains, by name, each tensor once (the shared MRS-Adapter is stored once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state_dict):
    """Load a trainable_state_dict into a model that has the same method applied (strict)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match the trainable parameters of method "
                         f"{getattr(model, 'petl_method', None)!r}: missing {missing}, unexpected {unexpected}")
    for name, p in params.items():
        if state_dict[name].shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(state_dict[name].shape)} in state_dict, "
                             f"the model needs {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state_dict[name])
