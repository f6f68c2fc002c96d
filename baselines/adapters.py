"""The adapter baselines: modules inside CLIP's residual blocks (Houlsby et al.'s Adapter, AdaptFormer, Convpass, the
Cross-Modal Adapter, UniAdapter) and LoRA's low-rank updates of the attention projections. Each block holds the
backbone's own modules, so CLIP's parameter names (and OpenAI checkpoints) stay valid. A module that several blocks
use is registered once, on the model, and the blocks keep a call of it (shared_call)."""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from clip_min.model import quick_gelu


def shared_call(module, **kwargs):
    """A call of `module` that a block keeps as a plain attribute, not as its submodule: a module used by many blocks
    is registered once, on the model, so a checkpoint stores it once."""
    return functools.partial(module, **kwargs)


def bottleneck_mlp(width, hidden):
    """Down-projection, ReLU, up-projection; the up-projection and biases start at zero, so it outputs 0."""
    layers = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
    for p in (layers[0].bias, layers[2].weight, layers[2].bias):
        nn.init.zeros_(p)
    return layers


class Convpass(nn.Module):
    """Jie & Deng's convolutional bypass: down-projection, QuickGELU, a 3x3 convolution over the patch grid, QuickGELU,
    dropout, up-projection. The class token goes through the convolution as a 1x1 map, where only the kernel's centre
    meets it. Convpass's init: the down-projection Xavier-uniform, the convolution the identity at its centre, the
    up-projection and every bias zero, so it outputs 0."""

    def __init__(self, width, dim, dropout=0.1):
        super().__init__()
        self.down, self.conv, self.up = nn.Linear(width, dim), nn.Conv2d(dim, dim, 3, padding=1), nn.Linear(dim, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.dirac_(self.conv.weight)
        for p in (self.down.bias, self.conv.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(p)

    def forward(self, x):
        h = quick_gelu(self.down(x))
        batch, tokens, dim = h.shape
        side = math.isqrt(tokens - 1)
        grid = self.conv(h[:, 1:].reshape(batch, side, side, dim).permute(0, 3, 1, 2))
        centre = F.linear(h[:, :1], self.conv.weight[:, :, 1, 1], self.conv.bias)
        h = torch.cat([centre, grid.permute(0, 2, 3, 1).reshape(batch, side * side, dim)], dim=1)
        return self.up(self.dropout(quick_gelu(h)))


class CrossModalAdapter(nn.Module):
    """Jiang et al.: a per-modality down-projection, QuickGELU, then the concatenation of a per-modality up-projection
    (to width - shared) and an up-projection shared by both modalities (to `shared`). The released init: every weight
    normal with std init_std (truncated at +-2), biases zero, so it does NOT output 0 at the start. Computed in fp32
    and cast back, as the released code does."""

    def __init__(self, widths, bottleneck, shared, init_std):
        super().__init__()
        self.down = nn.ModuleDict({m: nn.Linear(w, bottleneck) for m, w in widths.items()})
        self.up = nn.ModuleDict({m: nn.Linear(bottleneck, w - shared) for m, w in widths.items()})
        self.shared_up = nn.Linear(bottleneck, shared)
        for layer in (*self.down.values(), *self.up.values(), self.shared_up):
            nn.init.trunc_normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x, modality):
        with torch.autocast(x.device.type, enabled=False):
            h = quick_gelu(self.down[modality](x.float()))
            return torch.cat([self.up[modality](h), self.shared_up(h)], dim=-1).to(x.dtype)


class UniAdapter(nn.Module):
    """Lu et al.: LayerNorm, a down-projection shared by the modalities, ReLU, a per-modality up-projection. One
    instance serves layer i of both encoders. The LayerNorm and the down-projection are as wide as the widest
    modality; a narrower stream (CLIP's text, 512 against 768) reads the leading entries of both along the width,
    which is the down-projection of the stream zero-padded to 768. Released init (init_adapter_weights): the
    down-projection Kaiming-uniform, the up-projections and biases zero, so it outputs 0."""

    def __init__(self, widths, bottleneck):
        super().__init__()
        width = max(widths.values())
        self.norm, self.down = nn.LayerNorm(width), nn.Linear(width, bottleneck)
        self.up = nn.ModuleDict({m: nn.Linear(bottleneck, w) for m, w in widths.items()})
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for p in (self.down.bias, *self.up.parameters()):
            nn.init.zeros_(p)

    def forward(self, x, modality):
        width = x.shape[-1]
        h = F.layer_norm(x, (width,), self.norm.weight[:width], self.norm.bias[:width], self.norm.eps)
        return self.up[modality](F.relu(F.linear(h, self.down.weight[:, :width], self.down.bias)))


class BackboneBlock(nn.Module):
    """Base of the block-level methods: holds the SAME attn, ln_1, mlp and ln_2 objects as the CLIP block it
    replaces, so names such as visual.transformer.resblocks.0.attn.in_proj_weight are unchanged."""

    def __init__(self, block):
        super().__init__()
        self.attn, self.ln_1, self.mlp, self.ln_2 = block.attn, block.ln_1, block.mlp, block.ln_2
        self.width = block.ln_1.normalized_shape[0]


class SerialAdapterBlock(BackboneBlock):
    """Houlsby et al.'s placement, also the Cross-Modal Adapter's: h + Adapter(h) for the output h of attention and
    of the MLP, inside each residual."""

    def __init__(self, block, adapter_attn, adapter_mlp):
        super().__init__(block)
        self.adapter_attn, self.adapter_mlp = adapter_attn, adapter_mlp

    def forward(self, x):
        h = self.attn(self.ln_1(x))
        x = x + (h + self.adapter_attn(h))
        h = self.mlp(self.ln_2(x))
        return x + (h + self.adapter_mlp(h))


class ParallelAdapterBlock(BackboneBlock):
    """AdaptFormer's placement, also UniAdapter's: x = x + Attn(LN1(x));  x = x + MLP(LN2(x)) + scale * Adapter(x),
    the adapter reading the residual stream, or LN2(x) if reads="ln2"."""

    def __init__(self, block, adapter, scale, reads):
        super().__init__(block)
        self.adapter, self.scale, self.reads = adapter, scale, reads

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        y = self.ln_2(x)
        return x + self.mlp(y) + self.scale * self.adapter(y if self.reads == "ln2" else x)


class ConvpassBlock(BackboneBlock):
    """Convpass's placement: a bypass beside attention and one beside the MLP, each reading its sublayer's input:
    x = x + Attn(y) + scale * Bypass(y), y = LN1(x);  x = x + MLP(y) + scale * Bypass(y), y = LN2(x)."""

    def __init__(self, block, bypass_attn, bypass_mlp, scale):
        super().__init__(block)
        self.bypass_attn, self.bypass_mlp, self.scale = bypass_attn, bypass_mlp, scale

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y) + self.scale * self.bypass_attn(y)
        y = self.ln_2(x)
        return x + self.mlp(y) + self.scale * self.bypass_mlp(y)


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
