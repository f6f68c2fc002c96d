"""What the tests share: OpenAI's reference CLIP (PyPI clip-anytorch) as the oracle and its file format, small
worlds (a dataset and a CLIP) for the end-to-end tests, writers of the dataset layouts, the released split draw,
runs of train.py with what they left behind, and archives of images for retrieve.py with its brute-force oracle.
Fixtures live in conftest.py."""
import copy
import json
import os
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapter
import clip_min
import data
import retrieve
import train
from support import demo, runtime

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
    import clip as openai_clip  # noqa: F401  (the reference package, a test-only dependency)
    from clip import model as openai_model


# Published architectures of OpenAI's ViT checkpoints, as the reference constructor takes them.
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
# A second, smaller shape: different patch size, widths, heads, depth and resolution.
SMALL = dict(embed_dim=96, image_resolution=64, vision_layers=2, vision_width=192, vision_patch_size=16,
             context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
             transformer_layers=3)


def reference_clip(shape, seed=0):
    """OpenAI's CLIP with random weights, rounded to fp16 as the released files are, returned in fp32."""
    torch.manual_seed(seed)
    model = openai_model.CLIP(**shape)
    # Randomise the LayerNorms and biases too, so that a transposed or misplaced one cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    # Round every tensor to fp16, as OpenAI stores the weights; the oracle then computes in fp32.
    return model.half().float().eval()


def save_openai_archive(model, path):
    """Write `model` the way OpenAI's files are made: a traced TorchScript archive holding fp16 weights."""
    res = model.visual.input_resolution
    example = (torch.randn(1, 3, res, res), torch.zeros(1, model.context_length, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(model), example, check_trace=False)  # .half() below must not touch `model`
    traced.half()
    torch.jit.save(traced, str(path))


# Widths of 128: the MRS-Adapter's default bottleneck (64) must be narrower than the encoders.
MICRO = clip_min.CLIPConfig(embed_dim=64, image_resolution=32, patch_size=16, vision_width=128, vision_layers=1,
                            text_width=128, text_layers=1)
# Two layers per encoder, so that deep and per-layer methods differ from shallow ones; 1 and 2 attention heads.
LAYERED = clip_min.CLIPConfig(embed_dim=48, image_resolution=32, patch_size=16, vision_width=128, vision_layers=2,
                              context_length=77, vocab_size=500, text_width=96, text_layers=2)


def make_world(root):
    """A 40 + 20 image dataset in the precomp layout and a random micro CLIP saved as a state_dict, under root."""
    # The "natural" demo is named demo_natural: read from --data-root like any dataset (not from the demo cache).
    name = demo.make_demo(str(root), domain="natural", n_train=40, n_test=20, seed=0)
    torch.manual_seed(0)
    clip = str(root / "clip.pt")
    torch.save(clip_min.CLIP(MICRO).state_dict(), clip)
    return SimpleNamespace(root=str(root), name=name, clip=clip)


def interrupted(monkeypatch, after_steps, command):
    """Run command() as if Ctrl-C came during training step after_steps + 1 (counted over the whole command)."""
    real_step, calls = train.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) > after_steps:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        command()
    monkeypatch.setattr(train, "train_step", real_step)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(world, out, *extra):
    # fp32 unless a test asks otherwise: torchrun's processes do not see exact_cpu's pinned default
    return ["--dataset", world.name, "--data-root", world.root, "--clip", world.clip, "--workers", "1",
            "--batch-size", "8", "--amp", "off", "--out", str(out), *extra]


def run(world, out, *extra):
    return train.main(args_for(world, out, *extra))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trainable(path):
    return torch.load(path, map_location="cpu", weights_only=True)["trainable"]


def initial_trainable(world, method, seed=2):
    """The trainable tensors train.py starts from (same seed, same construction order)."""
    torch.manual_seed(seed)
    model = adapter.apply(runtime.load_backbone(world.clip, world.name, seed, torch.device("cpu")), method)
    return model, {k: v.clone() for k, v in adapter.trainable_state_dict(model).items()}


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def image_array(seed, h=20, w=28):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_images(folder, names):
    """One image per name, its format taken from the name: .tif (16-bit and 8-bit single channel), .jpg, .png."""
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        if name.endswith("16.tif"):
            Image.fromarray((np.arange(20 * 28).reshape(20, 28) * 97 + k).astype(np.uint16)).save(f"{folder}/{name}")
        elif name.endswith(".tif"):
            Image.fromarray(image_array(k)[..., 0]).save(f"{folder}/{name}")
        else:
            Image.fromarray(image_array(k)).save(f"{folder}/{name}")


def caption_groups(names):
    return [[f"caption {c} of {n}" for c in range(5)] for n in names]


def write_precomp(root, name, train, test, train_caps=None, image_dir=None):
    """The GaLR layout: train_filename one line per image, test_filename one line per caption."""
    folder = root / f"{name}_precomp"
    folder.mkdir(parents=True)
    train_caps = train_caps or caption_groups(train)
    (folder / "train_caps.txt").write_text("".join(c + "\n" for caps in train_caps for c in caps))
    (folder / "train_filename.txt").write_text("".join(n + "\n" for n in train))
    (folder / "test_caps.txt").write_text("".join(c + "\n" for caps in caption_groups(test) for c in caps))
    (folder / "test_filename.txt").write_text("".join(n + "\n" for n in test for _ in range(5)))
    write_images(image_dir or root / f"{name}_images", train + test)
    return folder


def released_generate_random_samples(caps_lines, name_lines, seed):
    """The authors' train.py, as published: random.seed(seed) at start-up, then its generate_random_samples: the
    file's (five captions, filename) groups in file order, one random.shuffle, the first int(0.8 n) train."""
    random.seed(seed)
    infos = [[caps_lines[5 * i:5 * i + 5], name_lines[i]] for i in range(len(name_lines))]
    random.shuffle(infos)
    cut = int(len(infos) * 0.8)
    return [info[1] for info in infos[:cut]], [info[1] for info in infos[cut:]]


def noise_images(folder, names, seed=0, size=(30, 24)):
    """Random images: each one's embedding differs from the others' (no ties in a top-k)."""
    rng = np.random.default_rng(seed)
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or ".", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, name))
    return [os.path.join(os.path.abspath(folder), n) for n in names]


def retrieve_json(capsys, *argv):
    retrieve.main(list(argv))
    return json.loads(capsys.readouterr().out)


def index_archive(capsys, source, folder, clip_path, *more):
    return retrieve_json(capsys, "index", str(folder), str(source), "--clip", clip_path,
               "--clip-activation", "quick_gelu", "--workers", "1", "--json", *more)


def brute_force(model, paths, query, k):
    """Top-k paths and scores computed here: CLIP's preprocessing by data.cache_images, encode_image, L2 norm, the
    index's fp16 rounding, one matrix product over everything, topk."""
    images = data.normalise(data.cache_images(paths, model.visual.input_resolution, workers=1))
    with torch.no_grad():
        embeddings = F.normalize(model.encode_image(images), dim=-1).half().float()
        if isinstance(query, str):
            query = F.normalize(model.encode_text(clip_min.tokenize([query])), dim=-1)[0]
    scores, rows = (embeddings @ query).topk(min(k, len(paths)))
    return [paths[r] for r in rows.tolist()], scores.tolist()


def assert_same(found, expected):
    paths, scores = expected
    assert [hit["path"] for hit in found["results"]] == paths
    assert [hit["score"] for hit in found["results"]] == pytest.approx(scores, abs=2e-4)
