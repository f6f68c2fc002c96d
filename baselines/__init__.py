"""The PETL baselines of PE-RSITR's benchmark, attached to a clip_min CLIP as modules: blocks that replace CLIP's
residual blocks and hold the backbone's own modules (adapters.py), learned tokens (prompts.py), and maps on the
output embeddings through CLIP's image_head / text_head (heads.py). adapter.apply attaches them."""
import functools
import math

import torch.nn as nn

from baselines.adapters import (ConvpassBlock, Convpass, CrossModalAdapter, LoRABlock, ParallelAdapterBlock,
                                SerialAdapterBlock, UniAdapter, bottleneck_mlp, shared_call)
from baselines.heads import ClipAdapterHead, identity_linear
from baselines.prompts import CoOpPrompt, PromptedTransformer, normal_prompts, vpt_prompts

# Every baseline with its options and their defaults (override them as keyword arguments of adapter.apply). Each
# follows its own paper and code; the sizes are those whose ViT-B/32 counts land on the counts PE-RSITR reports
# (docs/baselines.md). per_layer=False: one module per encoder (or one for both) serves every block, as PE-RSITR's
# own MRS-Adapter does; per_layer=True: a module per block, as the original method.
METHOD_OPTIONS = {
    "linear": {},  # linear probe: a linear map on each output embedding, identity at the start
    "adapter": dict(bottleneck=64, per_layer=False),  # Houlsby et al.: serial bottlenecks after attention and the MLP
    # Chen et al.: a scaled bottleneck beside the MLP, reading the residual stream ("stream", as AdaptFormer's
    # released code does) or the MLP's input LN2(x) ("ln2")
    "adaptformer": dict(bottleneck=64, scale=0.1, reads="stream", per_layer=False),
    "clip_adapter": dict(reduction=2, alpha=0.2),  # Gao et al.: a residual MLP on each output embedding
    # Zhou et al.: learned context tokens between the start token and the caption; deep: fresh ones at every layer
    "coop": dict(n_ctx=16, deep=True),
    "vpt": dict(n_prompts=50, deep=True),  # Jia et al.: learned prompt tokens in the image encoder
    "vl_prompt": dict(n_image=40, n_text=16, deep=True),  # prompt tokens in both encoders (MaPLe's IVLP)
    "convpass": dict(dim=64, scale=1.0, per_layer=False),  # Jie & Deng: convolutional bypasses in the image encoder
    # Jiang et al.: serial adapters whose up-projection is partly shared by the two encoders
    "cross_modal_adapter": dict(bottleneck=64, shared_dim=64, init_std=0.01, per_layer=False),
    "uniadapter": dict(bottleneck=21, scale=0.1),  # Lu et al.: layer i's adapter shared by both encoders' layer i
    # Hu et al.: W + (alpha / rank) B A for the q, k and/or v projections; alpha None means 2 x rank
    "lora": dict(rank=4, alpha=None, targets="qv"),
}
MODALITIES = ("image", "text")


def check_options(method, options, context_length):
    """A baseline's options (defaults already filled in) validated; LoRA's targets in q, k, v order, its alpha set."""
    if method == "lora":
        targets = options["targets"]
        if not targets or set(targets) - set("qkv") or len(set(targets)) != len(targets):
            raise ValueError(f"lora targets must be a non-empty subset of 'qkv' (like 'qv'), got {targets!r}")
        options["targets"] = "".join(part for part in "qkv" if part in targets)
        options["alpha"] = 2 * options["rank"] if options["alpha"] is None else options["alpha"]
    if method == "adaptformer" and options["reads"] not in ("stream", "ln2"):
        raise ValueError(f"adaptformer reads 'stream' (the residual stream) or 'ln2', got {options['reads']!r}")
    text_tokens = {"coop": "n_ctx", "vl_prompt": "n_text"}.get(method)
    if text_tokens and not 0 < options[text_tokens] <= context_length - 2:
        raise ValueError(f"{method} {text_tokens} must leave room for the start and end tokens in the context of "
                         f"{context_length}, got {options[text_tokens]}")
    return options


def towers(model):
    return {"image": model.visual.transformer, "text": model.transformer}


def replace_blocks(model, new_block, modalities=MODALITIES):
    """Each block of the given encoders replaced by new_block(block, modality, layer index)."""
    for modality in modalities:
        resblocks = towers(model)[modality].resblocks
        for i, block in enumerate(resblocks):
            resblocks[i] = new_block(block, modality, i)


def adapter_source(model, name, make, per_layer, modalities=MODALITIES):
    """What each use in a block gets: per_layer, a fresh make(width) (the block registers it); otherwise a call of
    the one make(width) of its encoder, registered once on the model as `name` (by modality)."""
    widths = {m: towers(model)[m].width for m in modalities}
    if per_layer:
        return lambda modality: make(widths[modality])
    setattr(model, name, nn.ModuleDict({m: make(w) for m, w in widths.items()}))
    return lambda modality: shared_call(getattr(model, name)[modality])


def attach_cross_modal_adapter(model, bottleneck, shared_dim, init_std, per_layer):
    """One adapter serving every block of both encoders, or per_layer one per layer and sublayer, shared by the two
    encoders' layers of that index (the released layout)."""
    widths, depths = {m: t.width for m, t in towers(model).items()}, {len(t.resblocks) for t in towers(model).values()}
    if not 0 <= shared_dim <= min(widths.values()):
        raise ValueError(f"cross_modal_adapter shared_dim must be in 0..{min(widths.values())} (the narrower encoder's "
                         f"width), got {shared_dim}")
    if per_layer and len(depths) > 1:
        raise ValueError(f"cross_modal_adapter per_layer=True pairs the encoders' layers: they need the same depth, "
                         f"got {sorted(depths)}")
    make = functools.partial(CrossModalAdapter, widths, bottleneck, shared_dim, init_std)
    model.cross_modal_adapter = nn.ModuleList([make() for _ in range(2 * max(depths) if per_layer else 1)])

    def new_block(block, modality, i):
        adapters = model.cross_modal_adapter
        attn, mlp = (adapters[2 * i], adapters[2 * i + 1]) if per_layer else (adapters[0], adapters[0])
        return SerialAdapterBlock(block, shared_call(attn, modality=modality), shared_call(mlp, modality=modality))
    replace_blocks(model, new_block)


def attach_uniadapter(model, bottleneck, scale):
    """Layer i's adapter serves layer i of both encoders; past the shorter encoder's depth, the longer one's alone."""
    depths = {m: len(t.resblocks) for m, t in towers(model).items()}
    model.uniadapter = nn.ModuleList([
        UniAdapter({m: t.width for m, t in towers(model).items() if i < depths[m]}, bottleneck)
        for i in range(max(depths.values()))])
    replace_blocks(model, lambda block, modality, i: ParallelAdapterBlock(
        block, shared_call(model.uniadapter[i], modality=modality), scale, "stream"))


def attach_prompts(model, method, o):
    """VPT's image prompts, CoOp's text prompts, or both (VL-Prompt, with MaPLe's N(0, 0.02) on both sides)."""
    image, text = model.visual.transformer, model.transformer
    if method in ("vpt", "vl_prompt"):
        layers = len(image.resblocks) if o["deep"] else 1
        if method == "vpt":
            prompts = vpt_prompts(layers, o["n_prompts"], image.width, math.prod(model.visual.conv1.kernel_size))
        else:
            prompts = normal_prompts(layers, o["n_image"], image.width)
        model.visual.transformer = PromptedTransformer(image, prompts, inserts=True)
    if method in ("coop", "vl_prompt"):
        n = o["n_ctx"] if method == "coop" else o["n_text"]
        model.text_prompt = CoOpPrompt(n, text.width, len(model.positional_embedding))
        if o["deep"] and len(text.resblocks) > 1:
            model.transformer = PromptedTransformer(text, normal_prompts(len(text.resblocks) - 1, n, text.width),
                                                    inserts=False)


def attach(model, method, o):
    """Attach a baseline to a (frozen) clip_min CLIP in place: its modules are created trainable."""
    dim = model.text_projection.shape[1]
    if method == "adapter":
        source = adapter_source(model, "houlsby", lambda w: bottleneck_mlp(w, o["bottleneck"]), o["per_layer"])
        replace_blocks(model, lambda block, m, i: SerialAdapterBlock(block, source(m), source(m)))
    elif method == "adaptformer":
        source = adapter_source(model, "adaptformer", lambda w: bottleneck_mlp(w, o["bottleneck"]), o["per_layer"])
        replace_blocks(model, lambda block, m, i: ParallelAdapterBlock(block, source(m), o["scale"], o["reads"]))
    elif method == "convpass":  # the image encoder only, as the original: text has no patch grid to convolve
        source = adapter_source(model, "convpass", lambda w: Convpass(w, o["dim"]), o["per_layer"], ("image",))
        replace_blocks(model, lambda block, m, i: ConvpassBlock(block, source(m), source(m), o["scale"]), ("image",))
    elif method == "cross_modal_adapter":
        attach_cross_modal_adapter(model, **o)
    elif method == "uniadapter":
        attach_uniadapter(model, **o)
    elif method == "lora":
        replace_blocks(model, lambda block, m, i: LoRABlock(block, o["targets"], o["rank"], o["alpha"]))
    elif method in ("vpt", "coop", "vl_prompt"):
        attach_prompts(model, method, o)
    elif method == "linear":
        model.image_head, model.text_head = identity_linear(dim), identity_linear(dim)
    elif method == "clip_adapter":
        head = functools.partial(ClipAdapterHead, dim, o["reduction"], o["alpha"])
        model.image_head, model.text_head = head(), head()
