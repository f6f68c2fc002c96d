"""Parameter-efficient transfer learning on a clip_min CLIP: PE-RSITR's MRS-Adapter and the PETL baselines.

    model = adapter.apply(clip_min.load("ViT-B/32")[0], "mrs")   # CLIP frozen, only the adapter trains
    image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    torch.save(adapter.trainable_state_dict(model), "mrs.pt")   # 161,088 numbers instead of CLIP's 151M

Methods attach from outside by replacing blocks or wrapping modules. A replacement holds the backbone's own
modules, so the backbone's parameter names (and OpenAI checkpoints) stay valid after apply.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

# Every method with its options and their defaults (override them as keyword arguments of apply).
# Sizes put the ViT-B/32 counts near those the paper reports for its baselines where that is natural.
METHOD_OPTIONS = {
    "zeroshot": {},  # frozen CLIP, nothing trained
    "linear": {},  # linear probe: a linear map on each output embedding, identity at the start
    "full": {},  # full fine-tuning: every CLIP parameter trains
    "mrs": dict(bottleneck=64, dropout=0.5),  # the paper's MRS-Adapter
    "adapter": dict(bottleneck=2),  # Houlsby et al.: serial bottlenecks after attention and after the MLP
    "adaptformer": dict(bottleneck=5, scale=0.1),  # Chen et al.: a scaled bottleneck beside the MLP
    "clip_adapter": dict(reduction=2, alpha=0.2),  # Gao et al.: a residual MLP on each output embedding
    "coop": dict(n_ctx=4),  # Zhou et al.: learned context tokens in front of every caption
    "vpt": dict(n_prompts=8, deep=True),  # Jia et al.: learned prompt tokens in the image encoder
    "lora": dict(rank=4, targets="qv"),  # Hu et al.: low-rank updates of the attention's q, k and/or v
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


def bottleneck(width, hidden):
    """Down-projection, ReLU, up-projection; the up-projection and biases start at zero, so it outputs 0."""
    layers = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    for p in (layers[0].bias, layers[2].weight, layers[2].bias):
        nn.init.zeros_(p)
    return layers


class AdaptedBlock(nn.Module):
    """A ResidualAttentionBlock with a block-level method attached (the attributes left as None are skipped).

    It holds the SAME attn, ln_1, mlp and ln_2 objects as the block it replaces, so names such as
    visual.transformer.resblocks.0.attn.in_proj_weight are unchanged.
    """

    def __init__(self, block, modality):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = block.attn, block.ln_1, block.mlp, block.ln_2
        self.modality = modality
        self.mrs = None  # (MRSAdapter,): a tuple, so the shared instance is registered once, on the model
        self.adapter_attn = self.adapter_mlp = None  # Houlsby adapter
        self.adaptformer, self.adaptformer_scale = None, 0.0
        self.lora_a = self.lora_b = None  # LoRA: [targets, rank, width] and [targets, width, rank]
        self.lora_targets = ""

    def attention(self, x):
        if self.lora_b is None:
            return self.attn(x)
        # LoRA: in_proj_weight holds q, k and v stacked; add B @ A to the targeted ones and run the
        # backbone's own attention with that weight (B starts at zero, so the weight starts unchanged).
        updates, zero = iter(self.lora_b @ self.lora_a), self.lora_a.new_zeros(x.shape[-1], x.shape[-1])
        delta = torch.cat([next(updates) if part in self.lora_targets else zero for part in "qkv"])
        weight = self.attn.in_proj_weight + delta.to(self.attn.in_proj_weight.dtype)
        return functional_call(self.attn, {"in_proj_weight": weight}, (x,))

    def forward(self, x):
        h = self.attention(self.ln_1(x))
        if self.adapter_attn is not None:
            h = h + self.adapter_attn(h)
        x = x + h
        y = self.ln_2(x)
        h = self.mlp(y)
        if self.adapter_mlp is not None:
            h = h + self.adapter_mlp(h)
        out = x + h
        if self.adaptformer is not None:
            out = out + self.adaptformer_scale * self.adaptformer(y)
        if self.mrs is not None:  # x = x + MLP(LN2(x)) + Adapter(x): the adapter reads the residual stream
            out = out + self.mrs[0](x, self.modality).to(x.dtype)
        return out


class PromptedTransformer(nn.Module):
    """A tower's transformer with learned tokens inserted right after token 0 (class / start-of-text token).

    The tokens are removed again after the last block, so every other token is back at its own index and
    pooling reads what it always reads. deep=True gives each block fresh tokens (VPT-deep); otherwise the
    first block's inputs flow on (VPT-shallow, CoOp).
    """

    def __init__(self, transformer, n_tokens, deep):
        super().__init__()
        self.width, self.resblocks = transformer.width, transformer.resblocks  # same objects, same names
        self.prompts = nn.Parameter(torch.randn(len(self.resblocks) if deep else 1, n_tokens, self.width) * 0.02)

    def forward(self, x):
        n = self.prompts.shape[1]
        for i, block in enumerate(self.resblocks):
            if i < len(self.prompts):
                prompts = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + (n if i else 0):]], dim=1)
            x = block(x)
        return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)


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


def _pool_then_head(pool, tower, head, *args):
    return head(pool(tower, *args))


def add_output_heads(model, make_head):
    """Put a trainable head on each encoder's output embedding (after the projection).

    clip_min has no module after its projections, so this instance's pooling steps are replaced;
    encode_image, encode_text and encode_views all go through them.
    """
    dim = model.text_projection.shape[1]
    model.image_head, model.text_head = make_head(dim), make_head(dim)
    model.visual.pool = functools.partial(_pool_then_head, type(model.visual).pool, model.visual, model.image_head)
    model.pool_text = functools.partial(_pool_then_head, type(model).pool_text, model, model.text_head)


def identity_linear(dim):
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def attach_to_block(model, block, method, options):
    width, hidden = block.ln_1.normalized_shape[0], options.get("bottleneck")
    if method == "mrs":
        block.mrs = (model.mrs_adapter,)
    elif method == "adapter":
        block.adapter_attn, block.adapter_mlp = bottleneck(width, hidden), bottleneck(width, hidden)
    elif method == "adaptformer":
        block.adaptformer, block.adaptformer_scale = bottleneck(width, hidden), options["scale"]
    elif method == "lora":
        targets, rank = options["targets"], options["rank"]
        block.lora_a = nn.Parameter(torch.empty(len(targets), rank, width))
        for a in block.lora_a:  # each A as nn.Linear draws its weight: Kaiming-uniform, a = sqrt(5)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        block.lora_b, block.lora_targets = nn.Parameter(torch.zeros(len(targets), width, rank)), targets


def apply(model, method="mrs", **options):
    """Attach `method` to a clip_min CLIP in place, freeze everything it does not train, return the model.

    The model's encode_image / encode_text then include the method. The method's name and options are kept
    in model.petl_method and model.petl_options (all a checkpoint needs to rebuild it).
    """
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; its options (with defaults) are "
                         f"{METHOD_OPTIONS[method] or 'none'}")
    if hasattr(model, "petl_method"):
        raise ValueError(f"this model already has {model.petl_method!r} attached; apply a method to a fresh model")
    options = {**METHOD_OPTIONS[method], **options}
    if method == "lora":
        targets = options["targets"]
        if not targets or set(targets) - set("qkv") or len(set(targets)) != len(targets):
            raise ValueError(f"lora targets must be a non-empty subset of 'qkv' (like 'qv'), got {targets!r}")
        options["targets"] = "".join(part for part in "qkv" if part in targets)
    device = model.text_projection.device
    model.requires_grad_(method == "full")  # new parameters created below are trainable by default

    if method == "mrs":
        model.mrs_adapter = MRSAdapter(model.visual.transformer.width, model.transformer.width, **options)
    if method in BLOCK_METHODS:
        for modality, tower in (("image", model.visual.transformer), ("text", model.transformer)):
            for i, block in enumerate(tower.resblocks):
                tower.resblocks[i] = AdaptedBlock(block, modality)
                attach_to_block(model, tower.resblocks[i], method, options)
    elif method == "linear":
        add_output_heads(model, identity_linear)
    elif method == "clip_adapter":
        add_output_heads(model, lambda dim: ClipAdapterHead(dim, options["reduction"], options["alpha"]))
    elif method == "vpt":
        model.visual.transformer = PromptedTransformer(model.visual.transformer, options["n_prompts"], options["deep"])
    elif method == "coop":
        # CoOp's learned context goes between the start token and the caption, in sequence order: the
        # caption's tokens keep the positional embeddings embed_text gave them (the context is learned, it
        # needs none), and the context is cut out after the last block, so the end token is back at
        # text.argmax(-1), where pool_text reads it: no index needs shifting, exactly.
        model.transformer = PromptedTransformer(model.transformer, options["n_ctx"], deep=False)
    model.to(device).train(model.training)  # new modules take the model's device and train/eval mode
    model.petl_method, model.petl_options = method, options
    return model


def encode_views(model, images, tokens, p=0.2):
    """Clean and augmented embeddings of a batch in ONE pass: (image, text, image_aug, text_aug).

    The paper's augmented views: element-wise dropout (p) on each frozen encoder's input embeddings (the image
    after ln_pre, the text after token + positional embedding), active only in training. Clean and dropped
    embeddings go through each transformer as one batch of 2B sequences; the adapter's own dropout then
    differs between the two halves by itself. In eval mode both views equal encode_image / encode_text.
    """
    x = model.visual.embed(images.to(model.visual.conv1.weight.dtype))
    x = torch.cat([x, F.dropout(x, p, model.training)])
    image, image_aug = model.visual.pool(model.visual.transformer(x)).chunk(2)
    t = model.embed_text(tokens)
    t = torch.cat([t, F.dropout(t, p, model.training)])
    text, text_aug = model.pool_text(model.transformer(t), torch.cat([tokens, tokens])).chunk(2)
    return image, text, image_aug, text_aug


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


# The authors' names for the MRS-Adapter's layers -> ours.
OFFICIAL_MRS_NAMES = {"visual_down_proj": "image_down", "down_proj": "text_down", "visual_up_proj": "image_up",
                      "up_proj": "text_up", "share_up_proj": "shared_up"}


def load_official_mrs(model, state_dict):
    """Import MRS-Adapter weights trained with the authors' released code.

    Their adapter sat at `Uniadapt` inside `PE_RSITR`, maybe under DataParallel's `module.` prefix: keys such
    as `Uniadapt.visual_down_proj.weight`, `module.Uniadapt.down_proj.bias` or the bare names are read, the rest
    ignored.
    """
    if not isinstance(getattr(model, "mrs_adapter", None), MRSAdapter):
        raise ValueError("the model has no MRS-Adapter; call apply(model, 'mrs') first")
    found = {k.removeprefix("module.").removeprefix("Uniadapt."): v for k, v in state_dict.items()}
    pairs = []
    for official, ours in OFFICIAL_MRS_NAMES.items():
        for kind in ("weight", "bias"):
            key, target = f"{official}.{kind}", getattr(getattr(model.mrs_adapter, ours), kind)
            if key not in found:
                raise ValueError(f"released MRS-Adapter tensor {key!r} is missing (looked for it bare and under "
                                 f"'Uniadapt.' and 'module.Uniadapt.'); the state_dict has {len(state_dict)} keys")
            if tuple(found[key].shape) != tuple(target.shape):
                raise ValueError(f"released MRS-Adapter tensor {key!r} has shape {tuple(found[key].shape)}, but this "
                                 f"model's adapter needs {tuple(target.shape)} (a different CLIP or bottleneck?)")
            pairs.append((target, found[key]))
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
