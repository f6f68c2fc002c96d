"""The miniature: the committed mini CLIP, the pretraining's OpenAI-format output, and its table through table.py."""
import copy
import math
import zipfile

import pytest
import torch

import adapter
import clip_min
import data
import metrics
import miniature
import table
from support import demo, runtime

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")


def test_committed_checkpoint_loads_with_the_mini_architecture():
    assert zipfile.is_zipfile(runtime.DEMO_CLIP), "assets/mini-clip.pt must be a TorchScript archive"
    model, preprocess = clip_min.load(runtime.DEMO_CLIP)
    assert model.config == demo.MINI_CLIP
    assert list(model.state_dict()) == list(clip_min.CLIP(demo.MINI_CLIP).state_dict())
    # OpenAI's format: the archive itself stores fp16 weights (torch.jit.load is fine on our own file).
    stored = torch.jit.load(runtime.DEMO_CLIP, map_location="cpu").state_dict()
    assert all(v.dtype == torch.float16 for v in stored.values())


def test_committed_checkpoint_retrieves_its_domain(tmp_path):
    """The bundled mini CLIP was pretrained on the side-view "natural" scenes: on fresh ones it retrieves far above
    chance (mR about 90 at 50 images, where chance is about 10), so the file holds trained weights, not noise."""
    name = demo.make_demo(str(tmp_path), domain="natural", n_train=5, n_test=50, seed=3)
    split = data.load_split(name, str(tmp_path), "test")
    model = clip_min.load(runtime.DEMO_CLIP)[0]
    images = data.cache_images(split.image_paths, model.visual.input_resolution, log_every=0)
    similarity = metrics.similarity(model, images, clip_min.tokenize(split.captions), torch.device("cpu"))
    n, per = len(split.image_paths), 5
    chance = sum([1 - math.comb(per * n - per, k) / math.comb(per * n, k) for k in (1, 5, 10)]  # an own caption in the top k
                 + [k / n for k in (1, 5, 10)]) / 6 * 100
    assert metrics.retrieval_metrics(similarity)["mR"] > max(60, 4 * chance)


@pytest.mark.slow
def test_tiny_pretrain_writes_an_archive_that_loads_back(tmp_path):
    def run(out):
        return miniature.pretrain(out=out, steps=3, batch_size=4, n_train=8, n_test=2, root=tmp_path, log_every=1)

    model, metrics = run(tmp_path / "a.pt")
    assert set(table.METRICS) <= set(metrics)
    torch.manual_seed(0)
    initial = clip_min.CLIP(demo.MINI_CLIP).state_dict()
    assert not torch.equal(initial["visual.conv1.weight"], model.visual.conv1.weight), "pretraining changed nothing"

    loaded = clip_min.load(str(tmp_path / "a.pt"))[0]
    # The file holds exactly the trained weights rounded to fp16 ...
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    # ... so it computes what the in-memory model computes, up to that rounding.
    torch.manual_seed(1)
    image, text = torch.randn(3, 3, 64, 64), clip_min.tokenize(["two red houses", "a lake", "a road on the left"])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            args = (image,) if encode == "encode_image" else (text,)
            expected, actual = getattr(model, encode)(*args), getattr(loaded, encode)(*args)
            torch.testing.assert_close(actual, expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)

    # Seeded: a second run gives the same weights.
    again, _ = run(tmp_path / "b.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_table_is_table_py_on_the_demo_with_every_method(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(table, "main", lambda argv, again: calls.append((argv, again)))
    miniature.table(seeds=(0, 1), epochs=2, lr=1e-3, out_root=str(tmp_path))
    args, forwarded = table.parse_args(calls[0][0])
    assert calls[0][1] == "python miniature.py table --seeds 0 1 --epochs 2 --lr 0.001"  # what a stop says
    assert args.datasets == ["demo"] and args.seeds == [0, 1] and args.lr == 1e-3 and args.out == str(tmp_path)
    assert sorted(args.rows) == sorted([(m, "hmmc") for m in adapter.METHODS] + [("mrs", "infonce")])
    assert forwarded == ["--clip", runtime.DEMO_CLIP, "--epochs", "2"]


def test_every_method_runs_on_the_mini_clip(exact_cpu):
    """The mini CLIP's encoders differ in depth (4 image, 3 text layers) and width: every method of its table attaches
    and encodes there, and the methods that start as frozen CLIP do."""
    torch.manual_seed(0)
    base = clip_min.CLIP(demo.MINI_CLIP).eval()
    images, tokens = torch.randn(2, 3, 64, 64), clip_min.tokenize(["a roof at the top", "a field"])
    with torch.no_grad():
        frozen = base.encode_image(images), base.encode_text(tokens)
    for method in adapter.METHODS:
        model = adapter.apply(copy.deepcopy(base), method)
        with torch.no_grad():
            ours = model.encode_image(images), model.encode_text(tokens)
        assert all(a.shape == b.shape and torch.isfinite(a).all() for a, b in zip(ours, frozen)), method
        if method in ("adapter", "adaptformer", "convpass", "uniadapter", "lora", "mrs"):
            assert all(torch.equal(a, b) for a, b in zip(ours, frozen)), method
