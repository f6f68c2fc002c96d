"""The synthetic demo dataset: deterministic, resumable, readable as the precomp layout, captions true to the pictures."""
import os

import numpy as np
import pytest
from PIL import Image

import data
from support import demo


def test_demo_is_deterministic_and_readable(tmp_path):
    for run in ("a", "b"):
        assert demo.make_demo(str(tmp_path / run), n_train=30, n_test=10, seed=5) == "demo"
    for file in ("train_caps.txt", "train_filename.txt", "test_caps.txt", "test_filename.txt"):
        assert (tmp_path / "a/demo_precomp" / file).read_bytes() == (tmp_path / "b/demo_precomp" / file).read_bytes()
    train = data.load_split("demo", str(tmp_path / "a"), "trainval")
    test = data.load_split("demo", str(tmp_path / "a"), "test")
    assert (len(train.image_paths), len(train.captions), len(test.image_paths)) == (30, 150, 10)
    for path in train.image_paths + test.image_paths:
        twin = path.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))
    other_seed = demo.make_demo(str(tmp_path / "c"), n_train=30, n_test=10, seed=6)
    assert data.load_split(other_seed, str(tmp_path / "c"), "trainval").captions != train.captions


def test_demo_captions_describe_the_drawing(tmp_path):
    name = demo.make_demo(str(tmp_path), n_train=40, n_test=5, seed=1)
    split = data.load_split(name, str(tmp_path), "trainval")
    halves = dict(left=np.s_[:, :32], right=np.s_[:, 32:], top=np.s_[:32, :], bottom=np.s_[32:, :])
    for i, path in enumerate(split.image_paths):
        words = split.captions[5 * i].split()  # "two red buildings on the left side of ..."
        count, colour, position = words[0], words[1], words[5]
        pixels = np.asarray(Image.open(path)).astype(int)
        match = (np.abs(pixels - demo.COLOURS[colour]).max(axis=2) <= 12)
        inside, other = match[halves[position]].sum(), match.sum() - match[halves[position]].sum()
        assert inside >= 20 * ["one", "two", "three", "four"].index(count) + 20 and inside > 5 * other, path


def test_demo_generation_is_resumable_and_has_two_domains(tmp_path):
    root = str(tmp_path)
    demo.make_demo(root, n_train=10, n_test=5)
    marker = tmp_path / "demo_precomp" / "complete.json"
    stamp = os.stat(tmp_path / "demo_precomp" / "train_caps.txt").st_mtime_ns
    demo.make_demo(root, n_train=10, n_test=5)  # complete: skipped
    assert os.stat(tmp_path / "demo_precomp" / "train_caps.txt").st_mtime_ns == stamp
    os.remove(marker)  # as if interrupted: redone
    os.remove(tmp_path / "demo_images" / "demo_00003.png")
    demo.make_demo(root, n_train=10, n_test=5)
    assert marker.exists() and len(data.load_split("demo", root, "trainval").image_paths) == 10
    demo.make_demo(root, n_train=12, n_test=5)  # other parameters: regenerated
    assert len(data.load_split("demo", root, "trainval").image_paths) == 12
    natural = demo.make_demo(root, domain="natural", n_train=10, n_test=5)
    assert natural == "demo_natural"
    remote_caps = data.load_split("demo", root, "test").captions
    natural_caps = data.load_split(natural, root, "test").captions
    assert all("photo" not in c for c in remote_caps) and any("photo" in c for c in natural_caps)
    with pytest.raises(ValueError, match="domain"):
        demo.make_demo(root, domain="aerial")


def test_demo_location_follows_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEMO_ROOT", str(tmp_path / "cache"))
    assert data.prepare_dataset("rsitmd", None) == ("rsitmd", "data")
    assert data.prepare_dataset("rsitmd", "elsewhere") == ("rsitmd", "elsewhere")
    assert data.prepare_dataset("demo", None) == ("demo", str(tmp_path / "cache"))
    assert data.prepare_dataset("demo", str(tmp_path / "mine")) == ("demo", str(tmp_path / "mine"))
    assert (tmp_path / "cache/demo_precomp/complete.json").is_file()
    assert (tmp_path / "mine/demo_precomp/complete.json").is_file()
