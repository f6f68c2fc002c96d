"""The default precision follows the hardware (bf16 autocast where it is native, fp32 elsewhere), and bf16 autocast
keeps CLIP's embeddings where fp32 puts them."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import adapter
import clip_min
import metrics
from support import runtime
from helpers import VIT_B_32, reference_clip


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "off")])
def test_cpu_default_follows_the_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    said = []
    assert runtime.default_amp(torch.device("cpu"), say=said.append) == expected
    assert len(said) == 1 and f"--amp {expected}" in said[0]
    assert ("has bf16 matrix instructions" if native else "slower than fp32") in said[0]


def test_the_capability_query_asks_torch(monkeypatch):
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert runtime.cpu_has_native_bf16() == (avx512_bf16 or amx)


@pytest.mark.slow
def test_bf16_autocast_embeddings_stay_close_to_fp32():
    """ViT-B/32 with random weights: bf16 autocast moves no image or caption embedding below cosine 0.999."""
    torch.manual_seed(0)
    model = clip_min.build_model(reference_clip(VIT_B_32).state_dict()).eval()
    images = torch.randn(2, 3, 224, 224)
    tokens = clip_min.trim(clip_min.tokenize(["a river crosses green farmland beside a small town",
                                              "many planes are parked near the terminal of an airport",
                                              "a baseball field", "dense residential buildings"]))
    with torch.no_grad():
        fp32 = model.encode_image(images), model.encode_text(tokens)
        with runtime.autocast("cpu", "bf16"):
            bf16 = model.encode_image(images), model.encode_text(tokens)
    for a, b in zip(fp32, bf16):
        assert b.dtype == torch.bfloat16  # autocast really ran the matrix products in bf16
        assert F.cosine_similarity(a, b.float(), dim=-1).min() >= 0.999


@pytest.mark.slow
def test_bf16_training_step_follows_the_fp32_gradient():
    """ViT-B/32 with random weights, the bf16 CPU training path as train.py runs it (frozen weights stored in bf16,
    attention in bf16, the fused QuickGELU backward): every trainable tensor's update points where fp32's does.
    InfoNCE, not HMMC: a hinge on the hardest negative can switch negatives under any rounding."""
    import argparse
    import copy

    import train
    torch.manual_seed(0)
    base = adapter.apply(clip_min.build_model(reference_clip(VIT_B_32).state_dict()), "mrs")
    for p in base.mrs_adapter.parameters():
        torch.nn.init.normal_(p, std=0.02)  # non-zero up-projections: every path of the adapter matters
    images = torch.randn(4, 3, 224, 224)
    tokens = clip_min.tokenize(["a river crosses green farmland beside a small town", "a baseball field",
                                "many planes are parked near the terminal of an airport", "dense residential area"])

    def update(amp):
        model = copy.deepcopy(base)
        runtime.keep_frozen_weights_in(model, amp)
        before = {k: v.clone() for k, v in adapter.trainable_state_dict(model).items()}
        args = argparse.Namespace(amp=amp, loss="infonce", mask_same_image=False, margin=0.2, grad_clip=0.0)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        torch.manual_seed(1)  # the same dropout masks in both runs
        train.train_step(adapter.ViewsEncoder(model), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                         images, tokens, None, args)
        return {k: (before[k] - v).flatten() for k, v in adapter.trainable_state_dict(model).items()}

    fp32, bf16 = update("off"), update("bf16")
    for name in fp32:
        assert not torch.equal(fp32[name], bf16[name]), name  # bf16 really ran
        assert F.cosine_similarity(fp32[name], bf16[name], dim=0) >= 0.99, name


def test_encoding_a_split_says_how_far_it_is(capsys):
    model = clip_min.CLIP(clip_min.CLIPConfig(embed_dim=16, image_resolution=32, patch_size=16, vision_width=64,
                                              vision_layers=1, text_width=64, text_layers=1)).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    tokens = clip_min.tokenize([f"caption {i}" for i in range(25)])
    quiet = metrics.similarity(model, images, tokens, torch.device("cpu"), batch_size=2)
    assert capsys.readouterr().out == ""
    loud = metrics.similarity(model, images, tokens, torch.device("cpu"), batch_size=2, progress_seconds=0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["encoded 2/5 images", "encoded 4/5 images", "encoded 5/5 images"]
    assert lines[3] == "encoded 2/25 captions" and lines[-1] == "encoded 25/25 captions" and len(lines) == 3 + 13
    torch.testing.assert_close(loud, quiet, rtol=0, atol=0)


# zeroshot trains nothing and full freezes nothing: every other method
@pytest.mark.parametrize("method", [m for m in adapter.METHODS if m not in ("zeroshot", "full")])
def test_frozen_weights_kept_in_bf16_change_no_result(method):
    """Storing the frozen matmul weights in bf16 once gives bit-identical bf16 training steps: the same rounding
    autocast made at every call."""
    import argparse
    import copy

    import train
    config = clip_min.CLIPConfig(embed_dim=32, image_resolution=32, patch_size=16, vision_width=128, vision_layers=2,
                                 text_width=128, text_layers=2)
    torch.manual_seed(0)
    base = adapter.apply(clip_min.CLIP(config), method)
    for p in adapter.trainable_state_dict(base).values():
        torch.nn.init.normal_(p, std=0.05)  # up-projections are zero at the start: make every path matter
    images, tokens = torch.randn(4, 3, 32, 32), clip_min.tokenize(["a red roof", "two ships", "a river", "farmland"])
    args = argparse.Namespace(amp="bf16", loss="hmmc", mask_same_image=False, margin=0.2, grad_clip=0.0)
    results = []
    for keep in (False, True):
        model = copy.deepcopy(base)
        if keep:
            runtime.keep_frozen_weights_in(model, "bf16")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(1)
        terms = train.train_step(adapter.ViewsEncoder(model), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                 images, tokens, None, args)
        results.append((model, terms["loss"]))
    (plain, plain_loss), (kept, kept_loss) = results
    assert torch.equal(plain_loss, kept_loss)
    for (name, a), b in zip(adapter.trainable_state_dict(plain).items(), adapter.trainable_state_dict(kept).values()):
        assert torch.equal(a, b), name
    block = kept.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == kept.visual.conv1.weight.dtype == torch.bfloat16
    assert block.ln_1.weight.dtype == kept.positional_embedding.dtype == torch.float32  # read outside matmuls
    assert block.attn.in_proj_weight.dtype == (torch.float32 if method == "lora" else torch.bfloat16)


@contextlib.contextmanager
def math_attention_in_bf16():
    """torch's unfused kernel, multiplying q, k and v in bf16 instead of casting them to fp32 first."""
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten operations run inside it, forward and backward."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


MASK_CHECKS = {"isneginf", "all", "tril", "triu", "_safe_softmax"}  # the math kernel builds and checks masks per call


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_cpu_training_attention_kernel(amp, monkeypatch):
    """A bf16 CPU training step computes attention as softmax between two bf16 matrix products, spelled out: no
    torch attention kernel, no mask built or checked per call, and a step as close to the fp32 step as torch's own
    kernels in bf16 come. fp32 keeps torch's default kernel, bit for bit."""
    import argparse
    import copy

    import train
    config = clip_min.CLIPConfig(embed_dim=32, image_resolution=32, patch_size=8, vision_width=128, vision_layers=2,
                                 text_width=128, text_layers=2)
    torch.manual_seed(0)
    base = adapter.apply(clip_min.CLIP(config), "mrs")
    for p in base.mrs_adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)  # non-zero up-projections: every weight gets a gradient
    images, tokens = torch.randn(4, 3, 32, 32), clip_min.tokenize(["a red roof", "two ships", "a river", "farmland"])
    args = argparse.Namespace(amp=amp, loss="infonce", mask_same_image=False, margin=0.2, grad_clip=0.0)

    def step(kernel=contextlib.nullcontext, ops=None):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        with kernel(), ops or contextlib.nullcontext():
            train.train_step(adapter.ViewsEncoder(model), torch.optim.SGD(model.parameters(), lr=0.1),
                             torch.amp.GradScaler("cpu", enabled=False), images, tokens, None, args)
        return model.mrs_adapter.image_down.weight.detach()

    step()  # builds the causal mask once
    ops = OpNames()
    chosen = step(ops=ops)
    monkeypatch.setattr(clip_min.fast_paths, "spelled_out_attention", lambda qkv: False)  # torch's kernels, to compare
    kernels = {"default": step(), "math in bf16": step(math_attention_in_bf16),
               "fused": step(lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))}
    if amp == "off":
        assert torch.equal(chosen, kernels["default"])
        assert "_scaled_dot_product_flash_attention_for_cpu" in ops.names
        return
    assert not MASK_CHECKS & ops.names and not any("scaled_dot_product" in name for name in ops.names), MASK_CHECKS & ops.names
    assert {"baddbmm", "bmm", "_softmax"} <= ops.names
    args.amp = "off"
    fp32 = step()  # the update every bf16 kernel rounds away from

    def distance(update):
        return ((update - fp32).norm() / fp32.norm()).item()

    assert 0 < distance(chosen) <= 1.25 * max(distance(kernels["math in bf16"]), distance(kernels["fused"]))
