"""The baselines of the paper's whole benchmark: every method's ViT-B/32 count beside the paper's, and VL-Prompt,
Convpass, the Cross-Modal Adapter and UniAdapter against direct computations of their original code's formulas,
their inits, their layouts, a training step in fp32 and under bf16 autocast. The generic checks (only the method's
parameters train, the checkpoint round trip) run for every method in test_adapter.py."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import adapter
import clip_min
import table
from clip_min.model import quick_gelu
from helpers import MICRO

pytestmark = pytest.mark.usefixtures("exact_cpu")  # one thread: the models are tiny
NEW = ("vl_prompt", "convpass", "cross_modal_adapter", "uniadapter")
# Unequal depths and widths (3 image layers of 128, 2 text layers of 96) and a 3 x 3 patch grid.
UNEVEN = clip_min.CLIPConfig(embed_dim=48, image_resolution=48, patch_size=16, vision_width=128, vision_layers=3,
                             text_width=96, text_layers=2)
CAPTIONS = ["a river beside a road", "two ships", "farmland with a very long road and many small houses"]


def frozen_clip(config=UNEVEN, seed=0):
    """A random CLIP with non-trivial LayerNorms and biases, so that a misplaced one cannot hide."""
    torch.manual_seed(seed)
    model = clip_min.CLIP(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def applied(base, method, **options):
    """The method on a copy of base, its parameters moved off their init so every path matters."""
    model = adapter.apply(copy.deepcopy(base), method, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter.trainable_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(config=UNEVEN):
    torch.manual_seed(2)
    return torch.randn(3, 3, config.image_resolution, config.image_resolution), clip_min.tokenize(CAPTIONS)


def encode(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def naive_encode(base, images, tokens, image_block, text_block):
    """CLIP's two encoders with each block computed by image_block / text_block(frozen block, layer, x)."""
    x = base.visual.embed(images)
    for i, b in enumerate(base.visual.transformer.resblocks):
        x = image_block(b, i, x)
    t = base.embed_text(tokens)[0]
    for i, b in enumerate(base.transformer.resblocks):
        t = text_block(b, i, t)
    return base.pool_image(x), base.pool_text(t, tokens)


def assert_encodes(model, expected):
    for ours, theirs in zip(encode(model, *inputs()), expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(table.PAPER_PARAMS))
def test_vit_b32_count_within_10_percent_of_the_papers(method):
    with torch.device("meta"):  # shapes only
        count = adapter.count_trainable(adapter.apply(clip_min.CLIP(clip_min.CLIPConfig()), method))
    paper = float(table.PAPER_PARAMS[method].rstrip("M")) * 1e6
    if method == "linear":  # one 512 x 512 map per encoder is half the paper's count (docs/baselines.md)
        count *= 2
    assert abs(count - paper) <= 0.1 * paper


@pytest.mark.parametrize("options", [{}, {"per_layer": True, "dim": 8, "scale": 0.5}])
def test_convpass_computes_the_released_formula(options):
    """Convpass's released forward, literally: the class token convolved as a 1 x 1 map with padding 1; a bypass
    beside attention and one beside the MLP of every image block, each reading its sublayer's input; text frozen."""
    base = frozen_clip()
    model = applied(base, "convpass", **options)
    scale, blocks = options.get("scale", 1.0), model.visual.transformer.resblocks

    def bypass(cp, x):
        h = quick_gelu(F.linear(x, cp.down.weight, cp.down.bias))
        side = math.isqrt(h.shape[1] - 1)
        grid = h[:, 1:].reshape(len(h), side, side, -1).permute(0, 3, 1, 2)
        grid = F.conv2d(grid, cp.conv.weight, cp.conv.bias, padding=1).permute(0, 2, 3, 1).flatten(1, 2)
        cls = F.conv2d(h[:, :1].reshape(len(h), 1, 1, -1).permute(0, 3, 1, 2), cp.conv.weight, cp.conv.bias, padding=1)
        h = quick_gelu(torch.cat([cls.permute(0, 2, 3, 1).flatten(1, 2), grid], dim=1))
        return F.linear(h, cp.up.weight, cp.up.bias)

    def image_block(b, i, x):
        attn_bypass, mlp_bypass = ((blocks[i].bypass_attn, blocks[i].bypass_mlp) if options
                                   else (model.convpass["image"],) * 2)
        x = x + b.attn(b.ln_1(x)) + scale * bypass(attn_bypass, b.ln_1(x))
        return x + b.mlp(b.ln_2(x)) + scale * bypass(mlp_bypass, b.ln_2(x))

    with torch.no_grad():
        expected = naive_encode(base, *inputs(), image_block, lambda b, i, x: b(x))
    assert_encodes(model, expected)
    assert torch.equal(expected[1], encode(base, *inputs())[1])  # the text encoder is frozen CLIP's
    names = adapter.trainable_state_dict(model)
    assert all(n.startswith("visual.transformer.resblocks." if options else "convpass.image.") for n in names)


def test_convpass_init():
    """The released init: down Xavier-uniform, the convolution the identity at its kernel's centre, the rest zero."""
    cp = adapter.apply(frozen_clip(), "convpass").convpass["image"]
    assert torch.equal(cp.conv.weight[:, :, 1, 1], torch.eye(64)) and cp.conv.weight.abs().sum() == 64
    bound = math.sqrt(6 / (128 + 64))
    assert bound * 0.9 < cp.down.weight.abs().max() <= bound
    assert not any(p.any() for p in (cp.down.bias, cp.conv.bias, cp.up.weight, cp.up.bias))
    assert cp.dropout.p == 0.1


@pytest.mark.parametrize("options", [{}, {"per_layer": True, "shared_dim": 16, "bottleneck": 8}])
def test_cross_modal_adapter_computes_the_released_formula(options):
    """h + concat(up_m(a), shared_up(a)), a = QuickGELU(down_m(h)), in fp32, after attention and after the MLP of
    every block of both encoders; per_layer: one adapter per layer and sublayer, shared by the two encoders."""
    config = dataclasses.replace(UNEVEN, text_layers=3)  # per_layer pairs the encoders' layers
    base = frozen_clip(config)
    model = applied(base, "cross_modal_adapter", **options)
    adapters = model.cross_modal_adapter
    assert len(adapters) == (2 * 3 if options else 1)

    def serial(modality):
        def block(b, i, x):
            for k, (sublayer, norm) in enumerate(((b.attn, b.ln_1), (b.mlp, b.ln_2))):
                cma = adapters[2 * i + k] if options else adapters[0]
                h = sublayer(norm(x))
                a = quick_gelu(F.linear(h, cma.down[modality].weight, cma.down[modality].bias))
                x = x + h + torch.cat([F.linear(a, cma.up[modality].weight, cma.up[modality].bias),
                                       F.linear(a, cma.shared_up.weight, cma.shared_up.bias)], dim=-1)
            return x
        return block

    with torch.no_grad():
        expected = naive_encode(base, *inputs(), serial("image"), serial("text"))
    assert_encodes(model, expected)


def test_cross_modal_adapter_init_and_fp32_under_autocast():
    """The released init (every weight N(0, 0.01), biases zero): not frozen CLIP at the start, but close to it; the
    adapter computes in fp32 under bf16 autocast and hands the stream its dtype back."""
    base = frozen_clip()
    model = adapter.apply(copy.deepcopy(base), "cross_modal_adapter")
    cma = model.cross_modal_adapter[0]
    weights = torch.cat([p.flatten() for n, p in cma.named_parameters() if n.endswith("weight")])
    assert abs(weights.std() / 0.01 - 1) < 0.05 and weights.abs().max() < 0.07
    assert not any(p.any() for n, p in cma.named_parameters() if n.endswith("bias"))
    for ours, frozen in zip(encode(model, *inputs()), encode(base, *inputs())):
        assert not torch.equal(ours, frozen) and torch.allclose(ours, frozen, rtol=0.05, atol=0.05)
    dtypes = []
    cma.shared_up.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    model.visual.transformer.resblocks[0].register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(inputs()[0])
    assert dtypes[:2] == [torch.float32, torch.float32] and dtypes[-1] == torch.float32  # the stream stays fp32


def test_uniadapter_computes_the_released_formula():
    """x = x + Attn(LN1(x)); x = x + MLP(LN2(x)) + 0.1 up_m(ReLU(down(LN(x)))), layer i's LayerNorm and down-projection
    shared by both encoders' layer i; the narrower text stream through the down-projection as if zero-padded."""
    base = frozen_clip()
    model = applied(base, "uniadapter")
    adapters = model.uniadapter
    assert [sorted(a.up) for a in adapters] == [["image", "text"], ["image", "text"], ["image"]]  # 3 vs 2 layers
    for i, a in enumerate(adapters):
        users = [model.visual.transformer.resblocks[i]] + list(model.transformer.resblocks[i:i + 1])
        assert all(block.adapter.func is a for block in users)  # one instance for both encoders' layer i

    def parallel(modality):
        def block(b, i, x):
            a = adapters[i]
            x = x + b.attn(b.ln_1(x))
            width = x.shape[-1]
            h = F.layer_norm(x, (width,), a.norm.weight[:width], a.norm.bias[:width])
            h = F.pad(h, (0, a.down.in_features - width))  # the text stream zero-padded to the image width
            h = F.relu(F.linear(h, a.down.weight, a.down.bias))
            return x + b.mlp(b.ln_2(x)) + 0.1 * F.linear(h, a.up[modality].weight, a.up[modality].bias)
        return block

    with torch.no_grad():
        expected = naive_encode(base, *inputs(), parallel("image"), parallel("text"))
    assert_encodes(model, expected)


def test_uniadapter_init():
    """The released init_adapter_weights: down Kaiming-uniform (a = sqrt(5)), up-projections and biases zero (both
    up-projections here, so that it starts as frozen CLIP); the LayerNorm the identity."""
    a = adapter.apply(frozen_clip(), "uniadapter").uniadapter[0]
    bound = 1 / math.sqrt(128)  # Kaiming-uniform with a = sqrt(5): sqrt(6 / ((1 + 5) fan_in))
    assert bound * 0.9 < a.down.weight.abs().max() <= bound
    assert not any(p.any() for p in (a.down.bias, *a.up.parameters(), a.norm.bias))
    assert torch.equal(a.norm.weight, torch.ones(128))


@pytest.mark.parametrize("deep", [True, False])
def test_vl_prompt_computes_ivlp(deep):
    """MaPLe's independent V-L prompting, literally: image tokens appended after the patches (the first layer's
    here after ln_pre), replaced at the end of the sequence before each later block; text tokens after the start
    token before the positions are added, replaced in place before each later block. Where the image tokens sit
    does not matter: the positions are already added and attention ignores order."""
    base = frozen_clip()
    model = applied(base, "vl_prompt", deep=deep)
    image_prompts = model.visual.transformer.prompts
    text_context = model.text_prompt.context
    text_later = model.transformer.prompts if deep else text_context[None][:0]
    assert image_prompts.shape == ((3 if deep else 1), 40, 128) and text_context.shape == (16, 96)
    assert text_later.shape == ((1 if deep else 0), 16, 96)

    def image_block(b, i, x):
        if i < len(image_prompts):
            x = torch.cat([x[:, :x.shape[1] - (40 if i else 0)], image_prompts[i].expand(len(x), -1, -1)], dim=1)
        return b(x)

    def text_block(b, i, x):
        if 0 < i <= len(text_later):
            x = torch.cat([x[:, :1], text_later[i - 1].expand(len(x), -1, -1), x[:, 17:]], dim=1)
        return b(x)

    with torch.no_grad():
        ids = [row[: row.argmax() + 1] for row in inputs()[1]]
        laid = [torch.cat([base.token_embedding(r[:1]), text_context, base.token_embedding(r[1:])]) for r in ids]
        longest = max(len(x) for x in laid)
        text = torch.stack([F.pad(x, (0, 0, 0, longest - len(x))) for x in laid]) + base.positional_embedding[:longest]
        for i, b in enumerate(base.transformer.resblocks):
            text = text_block(b, i, text)
        ends = torch.tensor([len(x) - 1 for x in laid])
        text = base.ln_final(text[torch.arange(len(text)), ends]) @ base.text_projection
        x = base.visual.embed(inputs()[0])
        for i, b in enumerate(base.visual.transformer.resblocks):
            x = image_block(b, i, x)
        image = base.visual.pool(x)
    assert_encodes(model, (image, text))


def test_vl_prompt_init():
    """MaPLe's N(0, 0.02) for the tokens of both encoders."""
    model = adapter.apply(frozen_clip(), "vl_prompt")
    for p in (model.visual.transformer.prompts, model.text_prompt.context, model.transformer.prompts):
        assert abs(p.std() / 0.02 - 1) < 0.1


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("method", NEW)
def test_a_training_step_in_fp32_and_bf16(method, amp):
    """One step on the helpers' micro CLIP: finite, a gradient for every parameter of the method and for none of
    CLIP's; under bf16 autocast, embeddings within bf16 rounding of fp32's."""
    base = frozen_clip(MICRO)
    model = applied(base, method).train()
    images, tokens = inputs(MICRO)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        image, text, image_aug, text_aug = adapter.encode_views(model, images, clip_min.trim(tokens))
    loss = (image @ text.T).logsumexp(dim=1).sum() + (image_aug - text_aug).square().sum()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert (p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any()) == p.requires_grad, name
    if amp:
        with torch.no_grad(), torch.autocast("cpu", dtype=amp):
            low = model.eval().encode_image(images), model.encode_text(tokens)
        for a, b in zip(low, encode(model, images, tokens)):
            assert F.cosine_similarity(a.float(), b).min() > 0.99


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="shared_dim must be in 0..96.*got 97"):
        adapter.apply(frozen_clip(), "cross_modal_adapter", shared_dim=97)
    with pytest.raises(ValueError, match="same depth, got \\[2, 3\\]"):
        adapter.apply(frozen_clip(), "cross_modal_adapter", per_layer=True)
    with pytest.raises(ValueError, match="vl_prompt n_text must leave room.*got 76"):
        adapter.apply(frozen_clip(), "vl_prompt", n_text=76)
