"""clip_min computes what OpenAI's reference CLIP computes, loaded from OpenAI's file format."""
import pytest
import torch
import torch.nn.functional as F

import clip_min
from clip_min.model import CLIP, config_from_state_dict
from helpers import SMALL, VIT_B_32, openai_clip, openai_model, reference_clip, save_openai_archive

CAPTIONS = ["many green trees are around a white storage tank.", "a river", "",
            "two baseball fields are next to a parking lot with 14 cars", "an airport with 3 planes!"]


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("shape", [VIT_B_32, SMALL], ids=["ViT-B-32", "small-p16"])
@pytest.mark.parametrize("file_format", ["openai-torchscript", "state-dict"])
def test_outputs_match_reference(shape, file_format, tmp_path):
    reference = reference_clip(shape)
    path = tmp_path / "model.pt"
    if file_format == "openai-torchscript":
        save_openai_archive(reference, path)
    else:
        torch.save({k: v.half() for k, v in reference.state_dict().items()}, path)

    model, preprocess = clip_min.load(str(path))
    assert set(model.state_dict()) == set(reference.state_dict())
    res = shape["image_resolution"]
    assert model.visual.input_resolution == res

    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, res, res)
    tokens = openai_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        ours = model.encode_image(images), model.encode_text(tokens), model(images, tokens)
        theirs = reference.encode_image(images), reference.encode_text(tokens), reference(images, tokens)
    assert max_diff(ours[0], theirs[0]) <= 1e-4
    assert max_diff(ours[1], theirs[1]) <= 1e-4
    scale = reference.logit_scale.exp().item()  # logits are cosine similarities times ~14
    for a, b in zip(ours[2], theirs[2]):
        assert max_diff(a, b) <= 1e-4 * scale
    # The embeddings are not trivially small: a zero model would pass the tolerance otherwise.
    assert theirs[0].abs().mean() > 1e-2 and theirs[1].abs().mean() > 1e-2


RELEASED = {  # OpenAI's published ViT architectures (the reference constructor's arguments)
    "ViT-B/32": VIT_B_32,
    "ViT-B/16": {**VIT_B_32, "vision_patch_size": 16},
    "ViT-L/14": {**VIT_B_32, "embed_dim": 768, "vision_layers": 24, "vision_width": 1024, "vision_patch_size": 14,
                 "transformer_width": 768, "transformer_heads": 12},
    "ViT-L/14@336px": {**VIT_B_32, "embed_dim": 768, "image_resolution": 336, "vision_layers": 24,
                       "vision_width": 1024, "vision_patch_size": 14, "transformer_width": 768,
                       "transformer_heads": 12},
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_architecture_inferred_from_shapes(name):
    shape = RELEASED[name]
    with torch.device("meta"):  # shapes only: no memory, no time
        reference = openai_model.CLIP(**shape)
        config = config_from_state_dict(reference.state_dict())
        ours = CLIP(config)
    assert config.image_resolution == shape["image_resolution"]
    assert config.patch_size == shape["vision_patch_size"]
    assert config.vision_layers == shape["vision_layers"] and config.text_layers == shape["transformer_layers"]
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    heads = [b.attn.heads for b in ours.visual.transformer.resblocks] + [b.attn.heads for b in ours.transformer.resblocks]
    assert heads == [shape["vision_width"] // 64] * shape["vision_layers"] + [shape["transformer_heads"]] * shape["transformer_layers"]


def test_text_cut_to_longest_caption_is_exact():
    """The causal mask and end-token pooling make trailing padding irrelevant: cutting it changes nothing."""
    model = CLIP(clip_min.CLIPConfig(**{"embed_dim": 64, "image_resolution": 32, "patch_size": 16, "vision_width": 64,
                                        "vision_layers": 1, "text_width": 128, "text_layers": 2})).eval()
    tokens = clip_min.tokenize(CAPTIONS)
    trimmed = clip_min.trim(tokens)
    last_end = max(row.tolist().index(row.max().item()) for row in tokens)  # the end token: the highest id
    assert trimmed.shape[1] == last_end + 1 < 20 and torch.equal(trimmed, tokens[:, :last_end + 1])
    assert (tokens[:, last_end + 1:] == 0).all()  # only padding was cut
    with torch.no_grad():
        full, cut = model.encode_text(tokens), model.encode_text(trimmed)
    assert max_diff(full, cut) <= 1e-5


def test_not_a_vit_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="not a ViT CLIP"):
        clip_min.build_model({"visual.layer1.0.conv1.weight": torch.zeros(1)})


def test_quick_gelu_forward_is_the_formula_and_backward_its_derivative():
    """The forward is x * sigmoid(1.702 x) bit for bit; the fused backward is the formula's derivative."""
    fused = clip_min.fast_paths.QuickGELUWithFusedBackward.apply
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64).requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64)
    ours, formula = fused(x), x * torch.sigmoid(1.702 * x)
    assert torch.equal(ours, formula)
    ours_grad, = torch.autograd.grad(ours, x, grad)
    formula_grad, = torch.autograd.grad(formula, x, grad)
    torch.testing.assert_close(ours_grad, formula_grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x[::200].detach().requires_grad_(),))


def test_quick_gelu_fuses_its_backward_in_bf16_and_fp16_only():
    """fp32 training keeps autograd's own derivative of the formula, so its numbers are unchanged bit for bit."""
    activation = clip_min.model.QuickGELU()
    for dtype, grad_fn in ((torch.bfloat16, "QuickGELUWithFusedBackwardBackward"),
                           (torch.float16, "QuickGELUWithFusedBackwardBackward"), (torch.float32, "MulBackward0")):
        x = torch.randn(64, dtype=dtype, requires_grad=True)
        assert activation(x).grad_fn.name() == grad_fn, dtype
    assert activation(x.detach()).grad_fn is None


@pytest.mark.parametrize("causal", [False, True], ids=["image", "text"])
def test_spelled_out_attention_is_scaled_dot_product_attention(causal):
    """In float64 the spelled-out attention (clip_min.fast_paths.attention_by_matmul) equals torch's kernel, forward and
    backward; the causal mask is built once per shape."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 7, 3, 2, 64, dtype=torch.float64, requires_grad=True)  # [batch, tokens, q|k|v, heads, dim]
    grad = torch.randn(3, 7, 128, dtype=torch.float64)
    ours = clip_min.fast_paths.attention_by_matmul(qkv, causal)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    torchs = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(3, 7, 128)
    torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(out, qkv, grad)[0] for out in (ours, torchs)),
                               rtol=1e-12, atol=1e-12)
    bias = clip_min.fast_paths.causal_bias(7, torch.float64, qkv.device)
    assert bias is clip_min.fast_paths.causal_bias(7, torch.float64, qkv.device)


def test_attention_kernel_follows_the_step():
    """A CPU training step in bf16 or fp16 computes attention as two batched products, eager and compiled alike
    (torch.compile would lower scaled_dot_product_attention to the fused kernel); inference and fp32 keep torch's
    kernel, and a compiled module traces again when the grad mode changes."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append({str(node.target) for node in graph.graph.nodes})
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(clip_min.model.Attention(128, 2, causal=True).bfloat16(), backend=backend, fullgraph=True)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    compiled(x)
    with torch.no_grad():
        compiled(x)
    assert len(graphs) == 2
    assert any("baddbmm" in t for t in graphs[0]) and not any("scaled_dot_product" in t for t in graphs[0])
    assert any("scaled_dot_product" in t for t in graphs[1])
    qkv, spelled = torch.randn(2, 5, 3, 2, 64), clip_min.fast_paths.spelled_out_attention
    assert spelled(qkv.bfloat16()) and spelled(qkv.half()) and not spelled(qkv)
    with torch.inference_mode():
        assert not spelled(qkv.bfloat16())
