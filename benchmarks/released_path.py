"""The authors' released training path (github.com/ZhanYang-nwpu/PE-RSITR), written against OpenAI's reference CLIP
(PyPI clip-anytorch): the baseline benchmarks/bench.py times our step against, and the tests compare ours with.
"""
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
import recipe
from support.released import OFFICIAL_MRS_NAMES


class ReleasedPath(nn.Module):
    """The baseline, holding exactly the weights of `ours`. fp16: the backbone's, as the released code on a GPU."""

    def __init__(self, ours, fp16=False):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
            from clip import model as openai  # OpenAI's reference code (PyPI clip-anytorch)
        c = ours.config
        self.clip = openai.CLIP(c.embed_dim, c.image_resolution, c.vision_layers, c.vision_width, c.patch_size,
                                c.context_length, c.vocab_size, c.text_width, c.text_width // 64, c.text_layers)
        self.clip.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mrs_adapter.")})
        self.clip.requires_grad_(False)
        if fp16:
            openai.convert_weights(self.clip)
        self.adapter = nn.ModuleDict({official: copy.deepcopy(getattr(ours.mrs_adapter, mine))  # released names
                                      for official, mine in OFFICIAL_MRS_NAMES.items()})
        self.adapter_dropout = ours.mrs_adapter.dropout.p
        self.to(ours.text_projection.device).train(ours.training)

    def blocks(self, x, resblocks, visual):
        a = self.adapter
        down, up = (a.visual_down_proj, a.visual_up_proj) if visual else (a.down_proj, a.up_proj)
        x = x.permute(1, 0, 2)  # NLD -> LND, the reference blocks' layout
        for block in resblocks:
            x = x + block.attention(block.ln_1(x))
            h = F.dropout(F.relu(down(x.float())), self.adapter_dropout, self.training)  # the adapter runs in fp32
            x = x + block.mlp(block.ln_2(x)) + torch.cat([up(h), a.share_up_proj(h)], dim=-1).to(x.dtype)
        return x.permute(1, 0, 2)

    def encode_image(self, images, p):
        v = self.clip.visual
        x = v.conv1(images.type(v.conv1.weight.dtype)).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        x = self.blocks(F.dropout(x, p, self.training), v.transformer.resblocks, True)  # p > 0: the augmented view
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, tokens, p):
        dtype = self.clip.dtype
        x = self.clip.token_embedding(tokens).type(dtype) + self.clip.positional_embedding.type(dtype)
        x = self.blocks(F.dropout(x, p, self.training), self.clip.transformer.resblocks, False)
        x = self.clip.ln_final(x).type(dtype)
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ self.clip.text_projection

    def step(self, optimizer, images, tokens, margin=recipe.MARGIN):
        """Four passes (clean and augmented, image and text), HMMC, backward, Adam. Returns the loss."""
        image, image_aug = self.encode_image(images, 0.0), self.encode_image(images, recipe.VIEW_DROPOUT)
        text, text_aug = self.encode_text(tokens, 0.0), self.encode_text(tokens, recipe.VIEW_DROPOUT)
        loss, _ = losses.hmmc(image.float(), text.float(), image_aug.float(), text_aug.float(), margin=margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
