"""Hugging Face's CLIPModel state_dicts under OpenAI's names, and the activation their config.json records."""
import json

import torch

_HUGGING_FACE_NAMES = [  # substrings of transformers' CLIPModel names -> OpenAI's, replaced in this order
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"), ("text_projection.weight", "text_projection"),
]


def from_hugging_face(state_dict):
    """A transformers CLIPModel state_dict under OpenAI's names; a key it cannot place keeps its name."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("embeddings.position_ids"):
            continue  # a buffer holding 0..n-1, not a weight
        for old, new in _HUGGING_FACE_NAMES:
            name = name.replace(old, new)
        # Hugging Face's projections are nn.Linear weights [out, in]; OpenAI's are matrices x @ proj.
        out[name] = tensor.t() if name in ("visual.proj", "text_projection") else tensor
    for q_name in [k for k in out if ".self_attn.q_proj." in k]:  # separate q, k, v -> nn.MultiheadAttention's in_proj
        qkv = [out.pop(q_name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[q_name.replace("self_attn.q_proj.", "attn.in_proj_")] = torch.cat(qkv)
    return out


def hugging_face_activation(config_path):
    """The MLP activation a transformers CLIPConfig (config.json) records; checks what clip_min cannot vary."""
    with open(config_path) as f:
        config = json.load(f)
    towers = {"text": (512, 8), "vision": (768, 12)}  # transformers' defaults (width, heads) where a key is left out
    activations = set()
    for tower, (width, heads) in towers.items():
        # Old files also hold text_config_dict / vision_config_dict, which win, as in transformers.
        settings = {**(config.get(f"{tower}_config") or {}), **(config.get(f"{tower}_config_dict") or {})}
        if settings.get("hidden_size", width) != 64 * settings.get("num_attention_heads", heads):
            raise ValueError(f"{config_path}: the {tower} tower's attention heads are not 64 wide, as clip_min's are")
        activations.add(settings.get("hidden_act", "quick_gelu"))
    if len(activations) != 1:
        raise ValueError(f"{config_path}: the towers use different activations {sorted(activations)}; clip_min has one")
    return activations.pop()
