"""CLIP's ViT image encoder and causal text transformer, with OpenAI's parameter names.

Every parameter carries the name it has in OpenAI's state_dict, so a released checkpoint loads with
strict=True and no renaming. Two deliberate differences from OpenAI's clip/model.py, neither of which
changes a result: tensors are batch-first [batch, tokens, width], and attention goes through
scaled_dot_product_attention instead of nn.MultiheadAttention (same parameters, fused kernel). In bf16/fp16 training,
attention (on CPUs) and QuickGELU's backward take the faster forms of fast_paths.py, equal to the formulas up to that
precision's rounding.
"""
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast_paths


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # size of the joint image-text space
    image_resolution: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    # heads are always width // 64 in OpenAI's ViT models
    activation: str = "quick_gelu"  # OpenAI trained with QuickGELU; many open_clip models with the exact GELU ("gelu")

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """The GELU approximation OpenAI trained CLIP with; the exact GELU would change every output."""

    def forward(self, x):
        if fast_paths.fused_quick_gelu(x):  # bf16/fp16 training: the same formula, a one-pass backward
            return fast_paths.QuickGELUWithFusedBackward.apply(x)
        return quick_gelu(x)


# Part of the architecture, not of the weights: a state_dict cannot tell which one a model was trained with.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class Attention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameters (in_proj_*, out_proj)."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, tokens, 3, self.heads, -1)
        # The text encoder is causal: token t sees tokens <= t, which is also why text can be cut to
        # the batch's longest caption without changing the feature read at the end token.
        if fast_paths.spelled_out_attention(qkv):  # CPU bf16/fp16 training: two products around a softmax
            return self.out_proj(fast_paths.attention_by_matmul(qkv, self.causal))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # unbind, not qkv[i]: its backward stacks the three gradients
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, width, activation):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, width, heads, causal=False, activation="quick_gelu"):
        super().__init__()
        self.attn = Attention(width, heads, causal)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width, activation)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, causal, activation="quick_gelu"):
        super().__init__()
        self.width = width
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, width // 64, causal, activation)
                                         for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, output_dim, activation="quick_gelu"):
        super().__init__()
        self.input_resolution = resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, causal=False, activation=activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def embed(self, image):
        """Patch embeddings + class token + positions, then ln_pre: the input of the first block."""
        x = self.conv1(image).flatten(2).transpose(1, 2)  # [batch, patches, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def pool(self, x):
        return self.ln_post(x[:, 0]) @ self.proj  # the class token summarises the image

    def forward(self, image):
        return self.pool(self.transformer(self.embed(image)))


class NoPrompt(nn.Module):
    """The text prompt step of plain CLIP: the caption's token embeddings as they are. A method that learns a prompt
    (CoOp) replaces it: forward(x, tokens) returns the first text block's input without positions, [batch, L, width],
    and the token ids in that layout, so that pooling finds the end token where the prompt put it."""

    def forward(self, x, tokens):
        return x, tokens


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.image_resolution, config.patch_size, config.vision_width,
                                        config.vision_layers, config.embed_dim, config.activation)
        self.transformer = Transformer(config.text_width, config.text_layers, causal=True, activation=config.activation)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        # Extension points, parameter-free here: a PETL method attaches by replacing them with its own module, so
        # encode_image / encode_text say everything the model computes and the backbone's names never change.
        self.text_prompt = NoPrompt()  # CoOp's learned context
        self.image_head = nn.Identity()  # after the image projection: linear probe, CLIP-Adapter
        self.text_head = nn.Identity()  # after the text projection
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation, for models trained from scratch (a checkpoint overwrites it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))
        for tower in (self.visual.transformer, self.transformer):
            width, layers = tower.width, len(tower.resblocks)
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        scale = self.visual.conv1.out_channels ** -0.5
        for p in (self.visual.class_embedding, self.visual.positional_embedding, self.visual.proj):
            nn.init.normal_(p, std=scale)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def embed_text(self, text):
        """Token embeddings through the prompt step, + positions: the input of the first text block, and the token
        ids in its layout."""
        x, text = self.text_prompt(self.token_embedding(text), text)
        return x + self.positional_embedding[: x.shape[1]], text

    def pool_text(self, x, text):
        """The feature is read at the end-of-text token, the highest id in every sequence."""
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)])
        return self.text_head(x @ self.text_projection)

    def pool_image(self, x):
        return self.image_head(self.visual.pool(x))

    def encode_image(self, image):
        image = image.to(self.visual.conv1.weight.dtype)
        return self.pool_image(self.visual.transformer(self.visual.embed(image)))

    def encode_text(self, text):
        """text: [batch, tokens] ids, at most context_length long; may be cut to the longest caption."""
        x, text = self.embed_text(text)
        return self.pool_text(self.transformer(x), text)

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def unsupported_key(state_dict):
    """The first key of `state_dict` that no clip_min CLIP has a place for, or None."""
    def any_block(key):
        return re.sub(r"resblocks\.\d+\.", "resblocks.#.", key)

    with torch.device("meta"):  # names only: no memory, no time
        known = {any_block(k) for k in CLIP(CLIPConfig(vision_layers=1, text_layers=1)).state_dict()}
    return next((k for k in state_dict if any_block(k) not in known), None)


def config_from_state_dict(state_dict) -> CLIPConfig:
    """Read the architecture off the tensor shapes, as every OpenAI ViT checkpoint determines it."""
    if (key := unsupported_key(state_dict)) is not None:
        raise ValueError(f"not a ViT CLIP state_dict that clip_min can hold: no place for {key!r} (ResNet image "
                         "towers and Hugging Face text towers inside open_clip are not supported)")
    if "visual.conv1.weight" not in state_dict:
        raise ValueError("not a ViT CLIP state_dict (no 'visual.conv1.weight')")

    def count_layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in state_dict if k.startswith(prefix + ".")})

    conv = state_dict["visual.conv1.weight"]
    if conv.shape[0] in (1280, 1408, 1664):  # the shapes cannot tell heads apart: refuse rather than compute wrong
        raise ValueError(f"an image tower {conv.shape[0]} wide is open_clip's ViT-H, -g or -bigG, whose attention heads "
                         "are not 64 wide; clip_min supports OpenAI's ViT shapes (B and L)")
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=conv.shape[-1] * grid,
        patch_size=conv.shape[-1],
        vision_width=conv.shape[0],
        vision_layers=count_layers("visual.transformer.resblocks"),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=state_dict["ln_final.weight"].shape[0],
        text_layers=count_layers("transformer.resblocks"),
    )


def build_model(state_dict, activation="quick_gelu") -> CLIP:
    """A CLIP in fp32 and eval mode holding exactly the weights of `state_dict` (strict loading), with the MLP
    activation it was trained with ("quick_gelu" or "gelu": the weights cannot tell)."""
    # OpenAI's files also store these three integers next to the tensors.
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    config = dataclasses.replace(config_from_state_dict(state_dict), activation=activation)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (seconds at ViT-B/32)
        model = CLIP(config)
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()
