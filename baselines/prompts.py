"""The prompt baselines: learned tokens in the image encoder (VPT) or in the text encoder (CoOp)."""
import math

import torch
import torch.nn as nn


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
