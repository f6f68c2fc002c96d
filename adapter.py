"""Parameter-efficient transfer learning on a clip_min CLIP: PE-RSITR's MRS-Adapter and the PETL baselines.

    model = adapter.apply(clip_min.load("ViT-B/32")[0], "mrs")   # CLIP frozen, only the adapter trains
    image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    torch.save(adapter.trainable_state_dict(model), "mrs.pt")   # 161,088 numbers instead of CLIP's 151M

Methods attach as modules: block-level methods replace CLIP's residual blocks with blocks that hold the backbone's own
modules, the others take CLIP's extension points (text_prompt, image_head, text_head), so the backbone's parameter
names (and OpenAI checkpoints) stay valid after apply.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import recipe

# Every method with its options and their defaults (override them as keyword arguments of apply). Defaults follow
# each method's own paper and code; the sizes of adapter, adaptformer and clip_adapter are chosen so that the
# ViT-B/32 counts come near those PE-RSITR reports for them.
METHOD_OPTIONS = {
    "zeroshot": {},  # frozen CLIP, nothing trained
    "linear": {},  # linear probe: a linear map on each output embedding, identity at the start
    "full": {},  # full fine-tuning: every CLIP parameter trains
    "mrs": dict(bottleneck=recipe.MRS_BOTTLENECK, dropout=recipe.MRS_DROPOUT),  # the paper's MRS-Adapter
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
METHODS = tuple(METHOD_OPTIONS)
BLOCK_METHODS = ("mrs", "adapter", "adaptformer", "lora")  # the methods that live inside residual blocks


class MRSAdapter(nn.Module):
    """The multimodal remote sensing adapter: ONE instance serves every block of both encoders.

    Per-modality down-projection, ReLU, dropout, then the concatenation of a per-modality up-projection
    (to width - bottleneck) and an up-projection shared by both modalities (bottleneck -> bottleneck).
    """

    def __init__(self, image_width, text_width, bottleneck=64, dropout=0.5):
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


def bottleneck_mlp(width, hidden):
    """Down-projection, ReLU, up-projection; the up-projection and biases start at zero, so it outputs 0."""
    layers = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    for p in (layers[0].bias, layers[2].weight, layers[2].bias):
        nn.init.zeros_(p)
    return layers


class BackboneBlock(nn.Module):
    """Base of the block-level methods: holds the SAME attn, ln_1, mlp and ln_2 objects as the CLIP block it
    replaces, so names such as visual.transformer.resblocks.0.attn.in_proj_weight are unchanged."""

    def __init__(self, block):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = block.attn, block.ln_1, block.mlp, block.ln_2
        self.width = block.ln_1.normalized_shape[0]


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


class HoulsbyBlock(BackboneBlock):
    """Houlsby et al.: h + Adapter(h) for the output h of attention and of the MLP, inside each residual."""

    def __init__(self, block, hidden):
        super().__init__(block)
        self.adapter_attn, self.adapter_mlp = bottleneck_mlp(self.width, hidden), bottleneck_mlp(self.width, hidden)

    def forward(self, x):
        h = self.attn(self.ln_1(x))
        x = x + (h + self.adapter_attn(h))
        h = self.mlp(self.ln_2(x))
        return x + (h + self.adapter_mlp(h))


class AdaptFormerBlock(BackboneBlock):
    """Chen et al.: x = x + Attn(LN1(x));  x = x + MLP(LN2(x)) + scale * Adapter(x, or LN2(x) if reads="ln2")."""

    def __init__(self, block, hidden, scale, reads):
        super().__init__(block)
        self.adaptformer, self.scale, self.reads = bottleneck_mlp(self.width, hidden), scale, reads

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        y = self.ln_2(x)
        return x + self.mlp(y) + self.scale * self.adaptformer(y if self.reads == "ln2" else x)


class LoRABlock(BackboneBlock):
    """Hu et al.: the targeted attention projections W (of q, k, v) become W + (alpha / rank) B A."""

    full_precision = ("attn",)  # the update is added to attn's frozen weight in fp32, outside any matrix product

    def __init__(self, block, targets, rank, alpha):
        super().__init__(block)
        self.lora_a = nn.Parameter(torch.empty(len(targets), rank, self.width))  # one A and one B per target
        for a in self.lora_a:  # each A as nn.Linear draws its weight: Kaiming-uniform, a = sqrt(5)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(len(targets), self.width, rank))
        self.targets, self.scale = targets, alpha / rank

    def forward(self, x):
        # in_proj_weight holds q, k and v stacked; add the updates to the targeted ones and run the backbone's
        # own attention with that weight (B starts at zero, so the weight starts unchanged).
        updates, zero = iter(self.scale * (self.lora_b @ self.lora_a)), self.lora_a.new_zeros(self.width, self.width)
        delta = torch.cat([next(updates) if part in self.targets else zero for part in "qkv"])
        weight = self.attn.in_proj_weight + delta.to(self.attn.in_proj_weight.dtype)
        x = x + functional_call(self.attn, {"in_proj_weight": weight}, (self.ln_1(x),))
        return x + self.mlp(self.ln_2(x))


def adapted_block(model, block, modality, method, options):
    """The replacement of one CLIP block for a block-level method."""
    if method == "mrs":
        return MRSBlock(block, model.mrs_adapter, modality)
    if method == "adapter":
        return HoulsbyBlock(block, options["bottleneck"])
    if method == "adaptformer":
        return AdaptFormerBlock(block, options["bottleneck"], options["scale"], options["reads"])
    if method == "lora":
        return LoRABlock(block, options["targets"], options["rank"], options["alpha"])
    raise ValueError(f"{method!r} is not a block-level method; those are: {', '.join(BLOCK_METHODS)}")


class PromptedTransformer(nn.Module):
    """VPT: the image transformer with learned tokens inserted right after the class token.

    The tokens are removed again after the last block, so every other token is back at its own index and
    pooling reads what it always reads. deep=True gives each block fresh tokens (VPT-deep); otherwise the
    first block's inputs flow on (VPT-shallow).
    """

    def __init__(self, transformer, n_tokens, deep, patch_area):
        super().__init__()
        self.width, self.resblocks = transformer.width, transformer.resblocks  # same objects, same names
        # VPT's initialisation: uniform, with the Xavier bound of a layer from a 3-channel patch to the prompt width.
        bound = math.sqrt(6 / (3 * patch_area + self.width))
        prompts = torch.empty(len(self.resblocks) if deep else 1, n_tokens, self.width)
        self.prompts = nn.Parameter(prompts.uniform_(-bound, bound))

    def forward(self, x):
        n = self.prompts.shape[1]
        for i, block in enumerate(self.resblocks):
            if i < len(self.prompts):
                prompts = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + (n if i else 0):]], dim=1)
            x = block(x)
        return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)


class CoOpPrompt(nn.Module):
    """CoOp: learned context vectors between the start token and the caption, "start X .. X caption end", positions
    then added over it all. A caption that no longer fits in the context length loses its last words, and its end
    token (the highest id, where pooling reads) takes the last position."""

    def __init__(self, n_ctx, width, context_length):
        super().__init__()
        self.context = nn.Parameter(torch.randn(n_ctx, width) * 0.02)  # CoOp's generic context: N(0, 0.02)
        self.context_length = context_length

    def forward(self, x, tokens):
        n, length = len(self.context), self.context_length
        rows, ends = torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)
        context = self.context.to(x.dtype).expand(len(x), -1, -1)
        laid = torch.cat([x[:, :1], context, x[:, 1:]], dim=1)[:, :length]
        laid_tokens = torch.cat([tokens[:, :1], tokens.new_zeros(len(tokens), n), tokens[:, 1:]], dim=1)[:, :length]
        last = (ends + n).clamp(max=length - 1)
        laid[rows, last], laid_tokens[rows, last] = x[rows, ends], tokens[rows, ends]
        return laid, laid_tokens


class ClipAdapterHead(nn.Module):
    """CLIP-Adapter: alpha * MLP(f) + (1 - alpha) * f. Unlike the other methods it is NOT the identity at
    the start (its MLP is random, as in the original), so it changes CLIP's embeddings before any training."""

    def __init__(self, dim, reduction, alpha):
        super().__init__()
        hidden = dim // reduction
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.alpha = alpha

    def forward(self, f):
        return self.alpha * self.mlp(f) + (1 - self.alpha) * f


def identity_linear(dim):
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def checked_options(method, options):
    """The method's defaults overridden by `options`, validated; LoRA's targets in q, k, v order, its alpha set."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options (with defaults) are "
                         f"{METHOD_OPTIONS[method] or 'none'}")
    options = {**METHOD_OPTIONS[method], **options}
    if method == "lora":
        targets = options["targets"]
        if not targets or set(targets) - set("qkv") or len(set(targets)) != len(targets):
            raise ValueError(f"lora targets must be a non-empty subset of 'qkv' (like 'qv'), got {targets!r}")
        options["targets"] = "".join(part for part in "qkv" if part in targets)
        options["alpha"] = 2 * options["rank"] if options["alpha"] is None else options["alpha"]
    if method == "adaptformer" and options["reads"] not in ("stream", "ln2"):
        raise ValueError(f"adaptformer reads 'stream' (the residual stream) or 'ln2', got {options['reads']!r}")
    return options


def apply(model, method="mrs", **options):
    """Attach `method` to a clip_min CLIP in place, freeze everything it does not train, return the model.

    The model's encode_image / encode_text then include the method. The method's name and options are kept
    in model.petl_method and model.petl_options (all a checkpoint needs to rebuild it).
    """
    options = checked_options(method, options)
    if hasattr(model, "petl_method"):
        raise ValueError(f"this model already has {model.petl_method!r} attached; apply a method to a fresh model")
    device, context_length = model.text_projection.device, len(model.positional_embedding)
    dim = model.text_projection.shape[1]
    if method == "coop" and not 0 < options["n_ctx"] <= context_length - 2:
        raise ValueError(f"coop n_ctx must leave room for the start and end tokens in the context of "
                         f"{context_length}, got {options['n_ctx']}")
    model.requires_grad_(method == "full")  # new parameters created below are trainable by default

    if method == "mrs":
        model.mrs_adapter = MRSAdapter(model.visual.transformer.width, model.transformer.width, **options)
    if method in BLOCK_METHODS:
        for modality, tower in (("image", model.visual.transformer), ("text", model.transformer)):
            for i, block in enumerate(tower.resblocks):
                tower.resblocks[i] = adapted_block(model, block, modality, method, options)
    elif method == "linear":
        model.image_head, model.text_head = identity_linear(dim), identity_linear(dim)
    elif method == "clip_adapter":
        head = functools.partial(ClipAdapterHead, dim, options["reduction"], options["alpha"])
        model.image_head, model.text_head = head(), head()
    elif method == "vpt":
        model.visual.transformer = PromptedTransformer(model.visual.transformer, options["n_prompts"],
                                                       options["deep"], math.prod(model.visual.conv1.kernel_size))
    elif method == "coop":
        model.text_prompt = CoOpPrompt(options["n_ctx"], model.transformer.width, context_length)
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
