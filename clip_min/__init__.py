"""A minimal CLIP that loads OpenAI's released ViT checkpoints and computes what OpenAI's code computes; it also loads
open_clip state_dicts and Hugging Face CLIP folders (activation="gelu" for models trained with the exact GELU).

    model, preprocess = clip_min.load("ViT-B/32")
    logits_per_image, logits_per_text = model(images, clip_min.tokenize(["a river", "a runway"]))
"""
from .model import CLIP, CLIPConfig, build_model
from .tokenizer import tokenize, trim
from .transform import transform
from .weights import available_models, load

__all__ = ["CLIP", "CLIPConfig", "available_models", "build_model", "load", "tokenize", "transform", "trim"]
