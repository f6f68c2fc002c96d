"""The adapter baselines: bottleneck modules inside CLIP's residual blocks (Houlsby et al.'s Adapter, AdaptFormer)
and LoRA's low-rank updates of the attention projections. Each block holds the backbone's own modules, so CLIP's
parameter names (and OpenAI checkpoints) stay valid."""
import math

import torch
import torch.nn as nn
from torch.func import functional_call


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
