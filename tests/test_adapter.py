"""adapter.py: the MRS-Adapter's structure, counts, fp32 path and dropout, the released-weight import, the augmented
views, each baseline's formula against a direct computation, and for every PETL method: it trains only its own
parameters, changes the output, and round-trips."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import adapter
import clip_min
from support import released
from helpers import LAYERED

VIT_B_32 = clip_min.CLIPConfig()  # the defaults are OpenAI's ViT-B/32
IDENTITY_AT_INIT = ("zeroshot", "linear", "full", "mrs", "adapter", "adaptformer", "convpass", "uniadapter", "lora")
# (method, options) pairs: every method, plus the non-default variants worth covering.
CASES = [(m, {}) for m in adapter.METHODS] + [
    ("vpt", {"deep": False}), ("coop", {"deep": False}), ("vl_prompt", {"deep": False}),
    ("adapter", {"per_layer": True, "bottleneck": 2}), ("adaptformer", {"reads": "ln2", "per_layer": True}),
    ("convpass", {"per_layer": True, "dim": 8}), ("cross_modal_adapter", {"per_layer": True, "shared_dim": 16}),
    ("lora", {"rank": 2, "alpha": 1, "targets": "kqv"})]
CASE_IDS = [m + "".join(f"-{k}={v}" for k, v in o.items()) for m, o in CASES]


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster than several contending for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed=0):
    torch.manual_seed(seed)
    model = clip_min.CLIP(LAYERED)
    with torch.no_grad():  # non-trivial LayerNorms, so a misplaced one cannot hide
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(seed=0):
    """3 images and 3 captions (start token, words, end token = highest id), cut to the longest caption."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, LAYERED.image_resolution, LAYERED.image_resolution, generator=g)
    lengths = [5, 9, 2]
    tokens = torch.zeros(3, max(lengths) + 2, dtype=torch.long)
    for row, n in zip(tokens, lengths):
        row[0], row[n + 1] = LAYERED.vocab_size - 2, LAYERED.vocab_size - 1
        row[1:n + 1] = torch.randint(1, LAYERED.vocab_size - 2, (n,), generator=g)
    return images, tokens


def encode(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def randomize_trainable(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.1)


def meta_vit_b32(monkeypatch):
    # CLIP's initialisation reads a value back (.item()), which the meta device cannot; skip it.
    monkeypatch.setattr(clip_min.CLIP, "initialize_parameters", lambda self: None)
    with torch.device("meta"):
        return clip_min.CLIP(VIT_B_32)


def expected_count(method, options, backbone_total):
    """Trainable parameters at ViT-B/32, from each method's definition."""
    o, layers, embed = {**adapter.METHOD_OPTIONS[method], **options}, 12, 512
    widths = (768, 512)  # image, text

    def bottleneck(w, h):
        return w * h + h + h * w + w

    def convpass(w, d):  # down, 3x3 convolution, up
        return w * d + d + 9 * d * d + d + d * w + w

    def cross_modal(r, s):  # per-modality down and up (to width - s), one shared up (to s)
        return sum(w * r + r + r * (w - s) + (w - s) for w in widths) + r * s + s

    def modules(positions):  # per encoder: a module per block and position, or one serving them all
        return layers * positions if o.get("per_layer") else 1

    r, depth = o.get("bottleneck", 0), layers if o.get("deep") else 1
    return {
        "zeroshot": 0,
        "full": backbone_total,
        "mrs": 161_088,  # the paper's count: 49,216 + 32,832 + 29,120 + 45,760 + 4,160
        "linear": 2 * (embed * embed + embed),
        "adapter": modules(2) * sum(bottleneck(w, r) for w in widths),
        "adaptformer": modules(1) * sum(bottleneck(w, r) for w in widths),
        "clip_adapter": 2 * 2 * embed * (embed // o.get("reduction", 1)),
        "coop": depth * o.get("n_ctx", 0) * widths[1],
        "vpt": depth * o.get("n_prompts", 0) * widths[0],
        "vl_prompt": depth * (o.get("n_image", 0) * widths[0] + o.get("n_text", 0) * widths[1]),
        "convpass": modules(2) * convpass(widths[0], o.get("dim", 0)),
        "cross_modal_adapter": modules(2) * cross_modal(r, o.get("shared_dim", 0)),
        # a LayerNorm and down-projection as wide as the image stream, an up-projection to each stream
        "uniadapter": layers * (2 * widths[0] + widths[0] * r + r + sum(r * w + w for w in widths)),
        "lora": sum(layers * len(o.get("targets", "")) * 2 * w * o.get("rank", 0) for w in widths),
    }[method]


@pytest.mark.parametrize("method, options", CASES, ids=CASE_IDS)
def test_vit_b32_counts_and_backbone_names(method, options, monkeypatch):
    model = meta_vit_b32(monkeypatch)
    backbone_names, backbone_total = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    adapter.apply(model, method, **options)
    assert adapter.count_trainable(model) == expected_count(method, options, backbone_total)
    assert sum(v.numel() for v in adapter.trainable_state_dict(model).values()) == adapter.count_trainable(model)
    assert backbone_names <= set(model.state_dict())  # e.g. visual.transformer.resblocks.0.attn.in_proj_weight
    assert all(p.device.type == "meta" for p in model.parameters())


def test_mrs_structure_and_checkpoint_size(monkeypatch, tmp_path):
    model = adapter.apply(meta_vit_b32(monkeypatch), "mrs")
    mrs = model.mrs_adapter
    shapes = {name: tuple(p.shape) for name, p in mrs.named_parameters()}
    assert shapes == {"image_down.weight": (64, 768), "image_down.bias": (64,), "text_down.weight": (64, 512),
                      "text_down.bias": (64,), "image_up.weight": (704, 64), "image_up.bias": (704,),
                      "text_up.weight": (448, 64), "text_up.bias": (448,), "shared_up.weight": (64, 64),
                      "shared_up.bias": (64,)}
    assert mrs.dropout.p == 0.5
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    assert len(blocks) == 24 and all(block.shared_adapter.func is mrs for block in blocks)  # one shared instance
    mrs.to_empty(device="cpu")  # real storage for the adapter only; the frozen backbone stays on meta
    state = adapter.trainable_state_dict(model)
    assert sorted(state) == sorted("mrs_adapter." + name for name in shapes)  # each tensor once, not 24 times
    torch.save(state, tmp_path / "mrs.pt")
    assert 161_088 * 4 <= (tmp_path / "mrs.pt").stat().st_size < 1_000_000


def test_mrs_init():
    mrs = adapter.MRSAdapter(128, 96)
    for layer in (mrs.image_up, mrs.text_up, mrs.shared_up):
        assert not layer.weight.any()
    for layer in (mrs.image_down, mrs.text_down, mrs.image_up, mrs.text_up, mrs.shared_up):
        assert not layer.bias.any()
    for layer, fan_in in ((mrs.image_down, 128), (mrs.text_down, 96)):  # Kaiming-uniform, a = sqrt(5)
        bound = math.sqrt(6 / ((1 + 5) * fan_in))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="bottleneck"):
        adapter.MRSAdapter(128, 64)


def test_mrs_computes_the_formula():
    """x = x + Attn(LN1(x)); x = x + MLP(LN2(x)) + concat(up(a), shared_up(a)), a = ReLU(down(x)), every block."""
    base, (images, tokens) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), "mrs")
    randomize_trainable(model)
    mrs = model.mrs_adapter

    def naive_tower(blocks, x, down, up):
        for b in blocks:
            x = x + b.attn(b.ln_1(x))
            a = F.relu(F.linear(x, down.weight, down.bias))
            unique, shared = F.linear(a, up.weight, up.bias), F.linear(a, mrs.shared_up.weight, mrs.shared_up.bias)
            x = x + b.mlp(b.ln_2(x)) + torch.cat([unique, shared], dim=-1)
        return x

    with torch.no_grad():
        image = base.pool_image(naive_tower(base.visual.transformer.resblocks, base.visual.embed(images),
                                             mrs.image_down, mrs.image_up))
        text = base.pool_text(naive_tower(base.transformer.resblocks, base.embed_text(tokens)[0],
                                          mrs.text_down, mrs.text_up), tokens)
    ours = encode(model, images, tokens)
    frozen = encode(base, images, tokens)
    assert not torch.allclose(ours[0], frozen[0], atol=1e-3) and not torch.allclose(ours[1], frozen[1], atol=1e-3)
    torch.testing.assert_close(ours[0], image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], text, rtol=1e-5, atol=1e-5)


def test_mrs_runs_in_fp32_under_autocast():
    model, (images, tokens) = adapter.apply(small_model(), "mrs"), batch()
    dtypes = {}

    def record(name):
        return lambda module, args, output: dtypes.setdefault(name, set()).add(output.dtype)

    for name in ("image_down", "text_down", "image_up", "text_up", "shared_up"):
        getattr(model.mrs_adapter, name).register_forward_hook(record(name))
    model.mrs_adapter.register_forward_hook(record("adapter"))
    model.transformer.resblocks[0].mlp.c_fc.register_forward_hook(record("backbone"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(images), model.encode_text(tokens)
    assert dtypes.pop("backbone") == {torch.bfloat16}  # autocast is really on
    assert dtypes == {name: {torch.float32} for name in dtypes} and len(dtypes) == 6


def test_mrs_dropout_is_active_in_training_only():
    model, (images, tokens) = adapter.apply(small_model(), "mrs"), batch()
    randomize_trainable(model)  # non-zero up-projections, so the dropped activations reach the output
    seen = []
    model.mrs_adapter.dropout.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    for training in (True, False):
        model.train(training)
        first, second = encode(model, images, tokens), encode(model, images, tokens)
        assert all(torch.equal(a, b) != training for a, b in zip(first, second))
        hidden, dropped = torch.cat([h.flatten() for h, _ in seen]), torch.cat([d.flatten() for _, d in seen])
        active = hidden != 0  # after the ReLU
        kept = dropped[active] != 0
        if training:  # p = 0.5: about half of the thousands of active entries dropped, the rest scaled by 2
            assert 0.45 < kept.float().mean() < 0.55
            torch.testing.assert_close(dropped[active][kept], 2 * hidden[active][kept])
        else:
            assert torch.equal(dropped, hidden)
        seen.clear()


@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_identity_at_init(method):
    base, (images, tokens) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), method)
    for ours, frozen in zip(encode(model, images, tokens), encode(base, images, tokens)):
        assert torch.equal(ours, frozen)


@pytest.mark.parametrize("method, options", CASES, ids=CASE_IDS)
def test_encode_views_eval_mode_equals_encode(method, options):
    model, (images, tokens) = adapter.apply(small_model(), method, **options), batch()
    with torch.no_grad():
        image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    clean_image, clean_text = encode(model, images, tokens)
    # Equal up to the summation order a CPU kernel picks per row block and batch size (2B rows against B).
    torch.testing.assert_close(image_aug, image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_aug, text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image, clean_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, clean_text, rtol=1e-5, atol=1e-6)
    # Captions cut to the batch's longest one give what the full 77-token context gives.
    full_context = F.pad(tokens, (0, LAYERED.context_length - tokens.shape[1]))
    torch.testing.assert_close(encode(model, images, full_context)[1], clean_text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"deep": False}])
def test_vpt_computes_the_formula(options):
    """Learned tokens right after the class token, fresh ones before every block for VPT-deep, then removed."""
    base, (images, tokens) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), "vpt", **options)
    prompts = model.visual.transformer.prompts.detach()
    n = prompts.shape[1]

    def naive_tower(blocks, x):
        x = torch.cat([x[:, :1], prompts[0].expand(len(x), -1, -1), x[:, 1:]], dim=1)
        for i, block in enumerate(blocks):
            if 0 < i < len(prompts):
                x = torch.cat([x[:, :1], prompts[i].expand(len(x), -1, -1), x[:, 1 + n:]], dim=1)
            x = block(x)
        return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)

    with torch.no_grad():
        expected = base.pool_image(naive_tower(base.visual.transformer.resblocks, base.visual.embed(images)))
    torch.testing.assert_close(encode(model, images, tokens)[0], expected, rtol=1e-5, atol=1e-5)


def test_vpt_init():
    """VPT's official initialisation: uniform in +-sqrt(6 / (3 x patch area + width))."""
    prompts = adapter.apply(small_model(), "vpt").visual.transformer.prompts.detach()
    assert prompts.shape == (LAYERED.vision_layers, 50, LAYERED.vision_width)
    bound = math.sqrt(6 / (3 * LAYERED.patch_size ** 2 + LAYERED.vision_width))
    assert prompts.abs().max() <= bound
    assert abs(prompts.std() / (bound / math.sqrt(3)) - 1) < 0.05  # a uniform's spread, over 12,800 values


@pytest.mark.parametrize("deep", [True, False])
def test_coop_computes_the_formula(deep):
    """CoOp's sequence [start, context, caption, end]: positions added over all of it, the feature read at the
    end token; a caption too long to follow the context loses its last words but keeps its end token. Deep: every
    later block finds fresh context tokens in the context's places."""
    base, (images, short) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), "coop", deep=deep)
    randomize_trainable(model)
    ctx = model.text_prompt.context.detach()
    later = model.transformer.prompts.detach() if deep else torch.zeros(0, *ctx.shape)
    assert ctx.shape == (16, LAYERED.text_width) and later.shape == (LAYERED.text_layers - 1 if deep else 0, *ctx.shape)
    start, end = LAYERED.vocab_size - 2, LAYERED.vocab_size - 1
    long = torch.tensor([[start, *torch.randint(1, start, (70,)).tolist(), end]])
    tokens = torch.cat([F.pad(short, (0, long.shape[1] - short.shape[1])), long])  # 1 + 70 + 1 + 16 > 77

    def naive(row):
        ids = row[: row.argmax() + 1]
        words = ids[1:-1][: LAYERED.context_length - 2 - len(ctx)]
        x = torch.cat([base.token_embedding(ids[:1]), ctx, base.token_embedding(words), base.token_embedding(ids[-1:])])
        x = x + base.positional_embedding[: len(x)]
        for i, block in enumerate(base.transformer.resblocks):
            if 0 < i <= len(later):
                x = torch.cat([x[:1], later[i - 1], x[1 + len(ctx):]])
            x = block(x[None])[0]
        return base.ln_final(x[-1]) @ base.text_projection

    with torch.no_grad():
        expected = torch.stack([naive(row) for row in tokens])
    torch.testing.assert_close(encode(model, images, tokens)[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options", [("adapter", {}), ("adapter", {"per_layer": True}), ("adaptformer", {}),
                                             ("adaptformer", {"reads": "ln2", "per_layer": True}), ("lora", {}),
                                             ("lora", {"rank": 2, "alpha": 1, "targets": "kqv"})])
def test_block_methods_compute_their_formula(method, options):
    base, (images, tokens) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), method, **options)
    randomize_trainable(model)
    o = {**adapter.METHOD_OPTIONS[method], **options}

    def naive_block(b, ours, x):  # b: the frozen CLIP block, ours: the adapted one (for the method's weights)
        if method == "adapter":  # h + Adapter(h) for each sublayer's output h
            h = b.attn(b.ln_1(x))
            x = x + h + ours.adapter_attn(h)
            h = b.mlp(b.ln_2(x))
            return x + h + ours.adapter_mlp(h)
        if method == "adaptformer":  # x + MLP(LN2(x)) + s * Adapter(x or LN2(x))
            x = x + b.attn(b.ln_1(x))
            reads = options.get("reads", "stream")  # by default the residual stream, as AdaptFormer's code reads
            return x + b.mlp(b.ln_2(x)) + o["scale"] * ours.adapter(b.ln_2(x) if reads == "ln2" else x)
        rank, alpha = o["rank"], options.get("alpha", 2 * o["rank"])  # LoRA: W + (alpha / rank) B A
        attn, width = copy.deepcopy(b.attn), x.shape[-1]
        for a, b_, part in zip(ours.lora_a, ours.lora_b, sorted(o["targets"], key="qkv".index)):
            start = "qkv".index(part) * width
            attn.in_proj_weight[start:start + width] += alpha / rank * b_ @ a
        x = x + attn(b.ln_1(x))
        return x + b.mlp(b.ln_2(x))

    def naive_tower(frozen, adapted, x):
        for b, ours in zip(frozen.resblocks, adapted.resblocks):
            x = naive_block(b, ours, x)
        return x

    with torch.no_grad():
        image = base.pool_image(naive_tower(base.visual.transformer, model.visual.transformer,
                                             base.visual.embed(images)))
        text = base.pool_text(naive_tower(base.transformer, model.transformer, base.embed_text(tokens)[0]), tokens)
    ours, frozen = encode(model, images, tokens), encode(base, images, tokens)
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(ours, frozen))
    torch.testing.assert_close(ours[0], image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], text, rtol=1e-5, atol=1e-5)


def test_encode_views_train_mode():
    images, tokens = batch()
    # The augmented half is the encoders run on dropout(p) of the embeddings (after ln_pre / token + position).
    model = adapter.apply(small_model(), "zeroshot").train()
    torch.manual_seed(5)
    views = adapter.encode_views(model, images, tokens)  # by default the paper's p = 0.2
    torch.manual_seed(5)
    with torch.no_grad():
        image_aug = model.pool_image(model.visual.transformer(F.dropout(model.visual.embed(images), 0.2)))
        text_aug = model.pool_text(model.transformer(F.dropout(model.embed_text(tokens)[0], 0.2)), tokens)
    torch.testing.assert_close(views[2], image_aug, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(views[3], text_aug, rtol=1e-5, atol=1e-6)
    # With the adapter's own dropout off, the clean half is the clean pass; the augmented half differs.
    model = adapter.apply(small_model(), "mrs", dropout=0.0).train()
    randomize_trainable(model)
    image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    clean_image, clean_text = encode(model, images, tokens)
    torch.testing.assert_close(image, clean_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text, clean_text, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(image, image_aug, atol=1e-3) and not torch.allclose(text, text_aug, atol=1e-3)


@pytest.mark.parametrize("method, options", CASES, ids=CASE_IDS)
def test_one_step_trains_only_the_method(method, options):
    model, (images, tokens) = adapter.apply(small_model(), method, **options).train(), batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = trainable(model)
    assert adapter.count_trainable(model) == sum(p.numel() for p in params.values())
    if method == "zeroshot":
        assert not params
        return
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    image, text, image_aug, text_aug = adapter.encode_views(model, images, tokens)
    loss = (image @ text.T).logsumexp(dim=1).sum() + (image_aug - image).square().sum() + text_aug.square().sum()
    loss.backward()
    optimizer.step()
    changed = set()
    for name, p in model.named_parameters():
        if name in params:
            changed |= {name} if not torch.equal(p, before[name]) else set()
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    assert changed
    if method == "full":
        assert len(params) == len(before)
    else:  # the backbone is frozen: what trains is exactly what the method added
        assert not set(params) & set(clip_min.CLIP(LAYERED).state_dict())


@pytest.mark.parametrize("method, options", [c for c in CASES if c[0] != "zeroshot"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "zeroshot"])
def test_parameters_change_the_output_and_round_trip(method, options, tmp_path):
    base, (images, tokens) = small_model(), batch()
    model = adapter.apply(copy.deepcopy(base), method, **options)
    randomize_trainable(model)
    ours, frozen = encode(model, images, tokens), encode(base, images, tokens)
    towers = {"coop": (False, True), "vpt": (True, False), "convpass": (True, False)}.get(method, (True, True))
    for out, ref, changes in zip(ours, frozen, towers):
        assert torch.allclose(out, ref, atol=1e-4) != changes
    torch.save(adapter.trainable_state_dict(model), tmp_path / "trained.pt")
    fresh = adapter.apply(copy.deepcopy(base), method, **options)
    adapter.load_trainable(fresh, torch.load(tmp_path / "trained.pt"))
    for a, b in zip(encode(fresh, images, tokens), ours):
        assert torch.equal(a, b)


def test_deepcopy_of_an_applied_model_is_independent():
    model, (images, tokens) = adapter.apply(small_model(), "linear"), batch()
    before = encode(model, images, tokens)
    duplicate = copy.deepcopy(model)
    randomize_trainable(duplicate)
    assert all(torch.equal(a, b) for a, b in zip(encode(model, images, tokens), before))
    assert not any(torch.allclose(a, b) for a, b in zip(encode(duplicate, images, tokens), before))


def test_load_trainable_is_strict():
    model = adapter.apply(small_model(), "lora")
    state = adapter.trainable_state_dict(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing.*" + name.replace(".", r"\.")):
        adapter.load_trainable(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        adapter.load_trainable(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        adapter.load_trainable(model, {**state, name: torch.zeros(1)})


def test_apply_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown method 'mrs_adapter'.*zeroshot, full, mrs, linear"):
        adapter.apply(small_model(), "mrs_adapter")
    with pytest.raises(ValueError, match="unknown option.*'rnak'.*rank"):
        adapter.apply(small_model(), "lora", rnak=8)
    with pytest.raises(ValueError, match="unknown option.*none"):
        adapter.apply(small_model(), "zeroshot", scale=1)
    with pytest.raises(ValueError, match="subset of 'qkv'"):
        adapter.apply(small_model(), "lora", targets="qo")
    with pytest.raises(ValueError, match="reads 'stream'.*'ln2', got 'x'"):
        adapter.apply(small_model(), "adaptformer", reads="x")
    with pytest.raises(ValueError, match="n_ctx must leave room.*76"):
        adapter.apply(small_model(), "coop", n_ctx=76)
    with pytest.raises(ValueError, match="already has 'mrs'"):
        adapter.apply(adapter.apply(small_model(), "mrs"), "lora")


# The authors' released names -> ours (written out here, independently of released.OFFICIAL_MRS_NAMES).
RELEASED = {"visual_down_proj": "image_down", "down_proj": "text_down", "visual_up_proj": "image_up",
            "up_proj": "text_up", "share_up_proj": "shared_up"}


@pytest.mark.parametrize("prefix", ["", "Uniadapt.", "module.Uniadapt."])
def test_load_official_mrs(prefix):
    base, (images, tokens) = small_model(), batch()
    trained = adapter.apply(copy.deepcopy(base), "mrs")
    randomize_trainable(trained)
    theirs_state = {f"{prefix}{theirs}.{kind}": getattr(getattr(trained.mrs_adapter, ours), kind).detach().clone()
                for theirs, ours in RELEASED.items() for kind in ("weight", "bias")}
    theirs_state[prefix + "clip.visual.proj"] = torch.zeros(3)  # the rest of PE_RSITR's state: ignored
    model = adapter.apply(copy.deepcopy(base), "mrs")
    released.load_official_mrs(model, theirs_state)
    for a, b in zip(encode(model, images, tokens), encode(trained, images, tokens)):
        assert torch.equal(a, b)
    expected = adapter.trainable_state_dict(trained)
    assert all(torch.equal(v, expected[k]) for k, v in adapter.trainable_state_dict(model).items())

    with pytest.raises(ValueError, match="'share_up_proj.bias' is missing"):
        released.load_official_mrs(model, {k: v for k, v in theirs_state.items() if "share_up_proj.bias" not in k})
    with pytest.raises(ValueError, match="'down_proj.weight' has shape"):
        released.load_official_mrs(model, {**theirs_state, prefix + "down_proj.weight": torch.zeros(64, 7)})
    with pytest.raises(ValueError, match="no MRS-Adapter"):
        released.load_official_mrs(adapter.apply(small_model(), "lora"), theirs_state)
