"""The prompt baselines: learned tokens in the image encoder (VPT), in the text encoder (CoOp) or in both
(VL-Prompt)."""
import math

import torch
import torch.nn as nn


def vpt_prompts(layers, n_tokens, width, patch_area):
    """VPT's initialisation: uniform, with the Xavier bound of a layer from a 3-channel patch to the prompt width."""
    bound = math.sqrt(6 / (3 * patch_area + width))
    return torch.empty(layers, n_tokens, width).uniform_(-bound, bound)


def normal_prompts(layers, n_tokens, width):
    """CoOp's and MaPLe's initialisation: N(0, 0.02)."""
    return torch.randn(layers, n_tokens, width) * 0.02


class PromptedTransformer(nn.Module):
    """A transformer whose blocks find learned tokens at positions 1..n, right after the class or start token.

    prompts[k] is what the k-th prompted block finds there. With inserts=True (VPT, an image tower) the tokens are
    inserted before the first block and removed again after the last, so every other token is back at its own
    index and pooling reads what it always reads; the first len(prompts) blocks are prompted (deep: all of them).
    With inserts=False (deep text prompts) the input already holds the first block's tokens (laid out by CoOpPrompt)
    and the following len(prompts) blocks find fresh ones in their place; pooling reads the end token, where the
    prompt step put it. A block without tokens of its own sees those that flowed on from the one before.
    """

    def __init__(self, transformer, prompts, inserts):
        super().__init__()
        self.width, self.resblocks = transformer.width, transformer.resblocks  # same objects, same names
        self.prompts, self.inserts = nn.Parameter(prompts), inserts

    def forward(self, x):
        n, first = self.prompts.shape[1], 0 if self.inserts else 1
        for i, block in enumerate(self.resblocks):
            if 0 <= i - first < len(self.prompts):
                prompts = self.prompts[i - first].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + (n if i else 0):]], dim=1)  # the first block: inserted
            x = block(x)
        return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1) if self.inserts else x


class CoOpPrompt(nn.Module):
    """CoOp: learned context vectors between the start token and the caption, "start X .. X caption end", positions
    then added over it all. A caption that no longer fits in the context length loses its last words, and its end
    token (the highest id, where pooling reads) takes the last position."""

    def __init__(self, n_ctx, width, context_length):
        super().__init__()
        self.context = nn.Parameter(normal_prompts(1, n_ctx, width)[0])  # CoOp's generic context
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
