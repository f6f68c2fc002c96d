"""The PETL baselines of PE-RSITR's benchmark, attached to a clip_min CLIP as modules: blocks that replace CLIP's
residual blocks and hold the backbone's own modules (adapters.py), learned tokens (prompts.py), and maps on the
output embeddings through CLIP's image_head / text_head (heads.py). adapter.apply attaches them."""
import functools
import math

from baselines.adapters import AdaptFormerBlock, HoulsbyBlock, LoRABlock
from baselines.heads import ClipAdapterHead, identity_linear
from baselines.prompts import CoOpPrompt, PromptedTransformer

# Every baseline with its options and their defaults (override them as keyword arguments of adapter.apply). Defaults
# follow each method's own paper and code; the sizes of adapter, adaptformer and clip_adapter are chosen so that the
# ViT-B/32 counts come near those PE-RSITR reports for them.
METHOD_OPTIONS = {
    "linear": {},  # linear probe: a linear map on each output embedding, identity at the start
    "adapter": dict(bottleneck=2),  # Houlsby et al.: serial bottlenecks after attention and after the MLP
    # Chen et al.: a scaled bottleneck beside the MLP, reading the residual stream ("stream", as AdaptFormer's
    # released code does) or the MLP's input LN2(x) ("ln2")
    "adaptformer": dict(bottleneck=5, scale=0.1, reads="stream"),
    "clip_adapter": dict(reduction=2, alpha=0.2),  # Gao et al.: a residual MLP on each output embedding
    "coop": dict(n_ctx=16),  # Zhou et al.: learned context tokens between the start token and the caption
    "vpt": dict(n_prompts=50, deep=True),  # Jia et al.: learned prompt tokens in the image encoder
    # Hu et al.: W + (alpha / rank) B A for the q, k and/or v projections; alpha None means 2 x rank
    "lora": dict(rank=4, alpha=None, targets="qv"),
}
BLOCK_METHODS = ("adapter", "adaptformer", "lora")  # the baselines that live inside residual blocks


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
    if method == "coop" and not 0 < options["n_ctx"] <= context_length - 2:
        raise ValueError(f"coop n_ctx must leave room for the start and end tokens in the context of "
                         f"{context_length}, got {options['n_ctx']}")
    return options


def adapted_block(block, method, options):
    """The replacement of one CLIP block for a block-level baseline."""
    if method == "adapter":
        return HoulsbyBlock(block, options["bottleneck"])
    if method == "adaptformer":
        return AdaptFormerBlock(block, options["bottleneck"], options["scale"], options["reads"])
    if method == "lora":
        return LoRABlock(block, options["targets"], options["rank"], options["alpha"])
    raise ValueError(f"{method!r} is not a block-level method; those are: {', '.join(BLOCK_METHODS)}")


def attach(model, method, options):
    """Attach a baseline to a (frozen) clip_min CLIP in place: its modules are created trainable."""
    dim = model.text_projection.shape[1]
    if method in BLOCK_METHODS:
        for tower in (model.visual.transformer, model.transformer):
            for i, block in enumerate(tower.resblocks):
                tower.resblocks[i] = adapted_block(block, method, options)
    elif method == "linear":
        model.image_head, model.text_head = identity_linear(dim), identity_linear(dim)
    elif method == "clip_adapter":
        head = functools.partial(ClipAdapterHead, dim, options["reduction"], options["alpha"])
        model.image_head, model.text_head = head(), head()
    elif method == "vpt":
        model.visual.transformer = PromptedTransformer(model.visual.transformer, options["n_prompts"],
                                                       options["deep"], math.prod(model.visual.conv1.kernel_size))
    elif method == "coop":
        model.text_prompt = CoOpPrompt(options["n_ctx"], model.transformer.width, len(model.positional_embedding))
