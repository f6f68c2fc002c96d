"""Shared test helpers: OpenAI's reference CLIP (PyPI clip-anytorch) as the oracle, and its file format; a micro
world (dataset + CLIP) for the end-to-end tests of train.py and evaluate.py."""
import copy
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

import clip_min
import data
import demo
import runtime

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


@pytest.fixture
def reference_factory():
    return reference_clip


# Widths of 128: the MRS-Adapter's default bottleneck (64) must be narrower than the encoders.
MICRO = clip_min.CLIPConfig(embed_dim=64, image_resolution=32, patch_size=16, vision_width=128, vision_layers=1,
                            text_width=128, text_layers=1)


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
    import train
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


@pytest.fixture
def exact_cpu(monkeypatch, tmp_path):
    """One CPU thread (the same reduction order in every run, so bit-exact comparisons hold), the CPU also on a GPU
    machine, fp32 by default whatever the CPU's bf16 units, and the demo cache in tmp_path (nothing may land in
    ~/.cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "DEMO_ROOT", str(tmp_path / "demo-cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def decode_cache_of_the_session(tmp_path_factory):
    """Decoded splits go to a folder of this test session, never to ~/.cache (subprocesses inherit the variable)."""
    before = os.environ.get(data.DECODE_CACHE_ENV)
    os.environ[data.DECODE_CACHE_ENV] = str(tmp_path_factory.mktemp("decoded"))
    yield
    if before is None:
        os.environ.pop(data.DECODE_CACHE_ENV)
    else:
        os.environ[data.DECODE_CACHE_ENV] = before
