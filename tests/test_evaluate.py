"""End-to-end tests of evaluate.py's command line, and the exactness of metrics.similarity."""
import glob
import json
import os
import re
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapter
import clip_min
import evaluate
import metrics
import train
from support import runtime
from helpers import MICRO, make_world

# OpenAI's published preprocessing constants.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NUMBERS = r"([\d.]+)/([\d.]+)/([\d.]+)"
LAYOUT = re.compile(rf"i2t R@1/5/10 {NUMBERS} \| t2i R@1/5/10 {NUMBERS} \| mR ([\d.]+)")
pytestmark = pytest.mark.usefixtures("exact_cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset, a micro CLIP, and a two-epoch MRS-Adapter run on them."""
    root = tmp_path_factory.mktemp("trained")
    world = make_world(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # as exact_cpu does for each test
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        train.main(["--dataset", world.name, "--data-root", world.root, "--clip", world.clip, "--workers", "1",
                    "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--out", str(root / "run")])
    torch.set_num_threads(threads)
    return SimpleNamespace(**vars(world), out=root / "run")


def printed_metrics(text):
    found = LAYOUT.findall(text)
    assert len(found) == 1, text
    return [float(x) for x in found[0]]


def test_checkpoint_reproduces_the_runs_test_numbers(trained, tmp_path, capsys):
    result = tmp_path / "test_eval.json"
    evaluate.main(["--checkpoint", str(trained.out / "best.pt"), "--workers", "1", "--out", str(tmp_path)])
    with open(trained.out / "test.json") as f:
        expected = json.load(f)
    with open(result) as f:
        written = json.load(f)
    # Same checkpoint, same split, same code path: identical numbers, not merely close ones.
    assert {k: written[k] for k in expected} == expected
    assert written["dataset"] == trained.name and written["method"] == "mrs"
    keys = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"]
    assert printed_metrics(capsys.readouterr().out) == pytest.approx([expected[k] for k in keys], abs=0.006)


def test_zeroshot_needs_no_checkpoint(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the working directory either
    result = tmp_path / "zeroshot" / f"test_eval-{trained.name}.json"
    evaluate.main(["--method", "zeroshot", "--dataset", trained.name, "--data-root", trained.root,
                   "--clip", trained.clip, "--workers", "1", "--out", str(result.parent)])
    with open(result) as f:
        written = json.load(f)
    assert written["checkpoint"] is None and written["method"] == "zeroshot"
    # train.py's zero-shot "run" scores the same frozen CLIP on the same test split.
    zeroshot = train.main(["--method", "zeroshot", "--dataset", trained.name, "--data-root", trained.root,
                           "--clip", trained.clip, "--workers", "1", "--out", str(tmp_path / "run")])
    assert {k: written[k] for k in zeroshot} == zeroshot
    assert sorted(os.listdir(tmp_path)) == ["run", "zeroshot"]


@pytest.mark.parametrize("k, columns", [(3, 3), (25, 20)], ids=["top3", "more-than-the-20-test-images"])
def test_visualize_writes_a_gallery(trained, tmp_path, k, columns):
    evaluate.main(["--checkpoint", str(trained.out / "best.pt"), "--workers", "1", "--visualize", str(k),
                   "--out", str(tmp_path)])
    with Image.open(tmp_path / "test_eval.png") as png:
        png.load()
        # A 330-pixel text column, then k thumbnails of 96 + 8 pixels, and room for a truth ranked below k.
        assert png.size[0] == 12 + 330 + 8 + (columns + 1) * 104 + 36
        assert len(png.getcolors(1 << 20)) > 100  # thumbnails and text were drawn, not a blank canvas


GREEN = evaluate.GREEN  # the ground truth's frame


def test_gallery_ranks_images_and_frames_the_truth(tmp_path):
    """Each caption row shows its top-k images by descending score; a green frame marks the caption's own image,
    exactly where it appears, and a truth ranked below k is shown after them with its rank. Solid-colour images: any
    resize keeps their colour. The image of each caption comes from image_of_caption (here two per image, not 5)."""
    colours = [(200, 30, 30), (30, 30, 200), (220, 220, 40), (120, 40, 160), (40, 180, 200), (240, 140, 20)]
    images = torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 32, 32).contiguous()
    split = SimpleNamespace(captions=[f"caption {j}" for j in range(12)], image_paths=[f"{i}.png" for i in range(6)])
    image_of_caption = [j // 2 for j in range(12)]
    # The four caption queries spread over the split, first and last included, and the images to rank first for
    # each: the truth second, first, fourth (outside the top 3) and third.
    rankings = {0: [3, 0, 5, 1], 3: [1, 4, 2, 0], 7: [2, 5, 0, 3], 11: [4, 1, 5, 0]}
    sim = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))
    for caption, order in rankings.items():
        sim[order, caption] = torch.tensor([4.0, 3.0, 2.0, 1.5])  # above every random score
    # Embeddings whose product is sim: one-hot images, captions = the columns of sim.
    placed = evaluate.gallery((torch.eye(6), sim.t()), split, images, 3, tmp_path / "gallery.png", image_of_caption)

    with Image.open(tmp_path / "gallery.png") as png:
        pixels = png.convert("RGB").load()
    expected = [(caption, col, i) for caption, order in rankings.items() for col, i in enumerate(order[:3])]
    expected.insert(9, (7, 3, 3))  # caption 7's truth, image 3, ranks 4th: shown after the top 3
    assert [p[:3] for p in placed] == expected
    for caption, col, i, (x, y) in placed:
        assert pixels[x + 48, y + 48] == colours[i], (caption, col)
        assert (pixels[x + 1, y + 48] == GREEN) == (i == image_of_caption[caption]), (caption, col)
    assert placed[9][3][0] > placed[8][3][0] + 96  # apart from the top 3


def test_no_arguments_evaluate_the_latest_runs_best_checkpoint(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    now = time.time()
    # The newest best.pt is neither first nor last by name, and in table.py's deeper layout; a newer last.pt is not a
    # candidate.
    cell = os.path.join("table", "demo", "mrs-hmmc-s2")
    for run, name, age in [("b", "best.pt", 50), ("a", "best.pt", 100), (cell, "best.pt", 20), ("c", "best.pt", 200),
                           ("c", "last.pt", 0)]:
        os.makedirs(f"runs/{run}", exist_ok=True)
        shutil.copy(trained.out / name, f"runs/{run}/{name}")
        os.utime(f"runs/{run}/{name}", (now - age, now - age))
    evaluate.main([])
    chosen = os.path.join("runs", cell, "best.pt")
    assert capsys.readouterr().out.startswith(f"checkpoint: {chosen} (the newest best.pt under runs/")
    assert glob.glob("runs/**/*.json", recursive=True) == [os.path.join("runs", cell, "test_eval.json")]
    with open(os.path.join("runs", cell, "test_eval.json")) as f:
        written = json.load(f)
    with open(trained.out / "test.json") as f:
        expected = json.load(f)
    assert written["checkpoint"] == chosen
    assert {k: written[k] for k in expected} == expected


def test_bad_visualize_count(trained, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(trained.out / "best.pt"), "--visualize", "-1"])
    with pytest.raises(SystemExit):  # zero-shot reads no checkpoint: one given is a mistake, not silently ignored
        evaluate.main(["--checkpoint", str(trained.out / "best.pt"), "--method", "zeroshot"])


def test_checkpoint_options_and_precision(trained, tmp_path, monkeypatch):
    """The method is rebuilt with the checkpoint's options (a bottleneck of 32 here, not the default 64), and a run
    trained with bf16 on a GPU is evaluated in fp32 on a CPU."""
    state = torch.load(trained.out / "best.pt", weights_only=True)
    model = adapter.apply(clip_min.load(trained.clip)[0], "mrs", bottleneck=32)
    state.update(trainable=adapter.trainable_state_dict(model), options=model.petl_options,
                 args={**state["args"], "amp": "bf16"})
    torch.save(state, tmp_path / "small.pt")
    seen = []
    monkeypatch.setattr(metrics, "split_embeddings",
                        lambda *a: seen.append(a[-1]) or (torch.eye(len(a[1])), torch.eye(len(a[1])).repeat(5, 1)))
    evaluate.main(["--checkpoint", str(tmp_path / "small.pt"), "--workers", "1", "--out", str(tmp_path)])
    assert seen == ["off"]


def test_a_checkpoint_is_scored_from_another_folder(trained, tmp_path, monkeypatch, capsys):
    """A run trained with paths relative to its folder (--clip clip.pt, --data-root .) names its backbone by absolute
    path and SHA-256: evaluate.py started from another folder rebuilds the same model and scores the run's numbers.
    The backbone moved: said, with the option that finds it; --clip with the moved file scores the same. Scored on
    another copy of the data, the result has its own file: the run's test_eval.json stays as it was."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    for name in (f"{trained.name}_precomp", f"{trained.name}_images"):
        shutil.copytree(os.path.join(trained.root, name), home / name)
    shutil.copy(trained.clip, home / "clip.pt")
    monkeypatch.chdir(home)
    train.main(["--dataset", trained.name, "--data-root", ".", "--clip", "clip.pt", "--workers", "1", "--epochs", "1",
                "--batch-size", "8", "--out", "run"])
    best, expected = home / "run" / "best.pt", json.loads((home / "run" / "test.json").read_text())
    assert torch.load(best, weights_only=True)["backbone"]["file"] == str(home / "clip.pt")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def scored(*extra, name="test_eval.json"):
        evaluate.main(["--checkpoint", str(best), "--workers", "1", *extra])
        return {k: v for k, v in json.loads((home / "run" / name).read_text()).items() if k in expected}
    assert scored() == expected
    os.rename(home / "clip.pt", home / "moved.pt")
    with pytest.raises(FileNotFoundError, match=r"backbone, .*home/clip.pt \(sha256 \w+...\), is not there any more"):
        scored()
    capsys.readouterr()
    assert scored("--clip", str(home / "moved.pt")) == expected and "note:" not in capsys.readouterr().out
    own = (home / "run" / "test_eval.json").read_text()
    shutil.copytree(home / f"{trained.name}_images", tmp_path / "copy" / f"{trained.name}_images")
    shutil.copytree(home / f"{trained.name}_precomp", tmp_path / "copy" / f"{trained.name}_precomp")
    assert scored("--clip", str(home / "moved.pt"), "--data-root", str(tmp_path / "copy"),
                  name=f"test_eval-{trained.name}.json") == expected
    assert (home / "run" / "test_eval.json").read_text() == own


def test_no_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no trained run"):
        evaluate.main([])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_similarity_is_exact():
    """Chunked images and captions cut after their longest end token give the plain 77-token computation."""
    torch.manual_seed(0)
    model = clip_min.CLIP(MICRO).eval()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    captions = ["a river", "two white buildings on the left side of a dense green meadow near a road .",
                "x", "a " * 90, "the farmland has no water and no road but four red houses .", "", "lake ."]
    tokens = clip_min.tokenize(captions, truncate=True)
    assert tokens.shape == (7, 77)

    got = metrics.similarity(model, images, tokens, torch.device("cpu"), batch_size=3)
    pixels = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(pixels.float()), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
    expected = image_features @ text_features.t()
    assert got.shape == (7, 7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_missing_dataset_is_said_before_the_backbone_loads(trained, tmp_path, monkeypatch):
    """For ViT-B/32 the backbone may be a 338 MB download: a dataset that is not there is reported first."""
    monkeypatch.setattr(runtime, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded before the data"))
    for argv in (["--checkpoint", str(trained.out / "best.pt")], ["--method", "zeroshot"]):
        with pytest.raises(FileNotFoundError, match="not found under"):
            evaluate.main([*argv, "--dataset", "nowhere", "--data-root", str(tmp_path)])
