"""Dataset reading (precomp and Karpathy JSON), image decoding, caching, the train/val split and the demo dataset,
on tiny datasets written under tmp_path."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from helpers import (caption_groups, image_array, openai_clip, released_generate_random_samples, write_images,
                     write_precomp)

# ---------------------------------------------------------------- helpers: write small datasets in both layouts


TRAIN = ["a16.tif", "b.tif", "c.jpg", "d.png"]
TEST = ["e16.tif", "f.jpg"]


# ---------------------------------------------------------------- parsing


def test_precomp_layout_and_empty_captions(tmp_path, capsys):
    caps = caption_groups(TRAIN)
    caps[1][2] = "   "  # one empty caption: replaced by another caption of the same image
    caps[2] = [""] * 5  # all empty (like four RSITMD images): the image is dropped
    write_precomp(tmp_path, "fake", TRAIN, TEST, train_caps=caps)
    train = data.load_split("fake", str(tmp_path), "trainval")
    assert [os.path.basename(p) for p in train.image_paths] == ["a16.tif", "b.tif", "d.png"]
    assert all(p.startswith(str(tmp_path / "fake_images")) for p in train.image_paths)
    assert len(train.captions) == 5 * len(train.image_paths)
    assert train.captions[:5] == caps[0] and train.captions[10:] == caps[3]
    b = train.captions[5:10]
    assert b[:2] + b[3:] == caps[1][:2] + caps[1][3:] and b[2] in caps[1] and b[2].strip()
    assert train.anomalies == dict(empty_captions=6, images_dropped=1, images_padded=0, images_truncated=0)
    assert "empty_captions 6" in capsys.readouterr().out and "images_dropped 1" in train.summary()
    test = data.load_split("fake", str(tmp_path), "test")
    assert [os.path.basename(p) for p in test.image_paths] == TEST
    assert test.captions == [c for caps in caption_groups(TEST) for c in caps]
    for j, caption in enumerate(test.captions):  # caption j belongs to image j // 5
        assert caption.endswith(os.path.basename(test.image_paths[j // 5]))
    assert test.image_of_caption == [j // 5 for j in range(len(test.captions))]
    assert train.image_of_caption == [j // 5 for j in range(len(train.captions))]
    assert not any(test.anomalies.values())


@pytest.mark.parametrize("image_dir", ["fake_images", "fake_precomp/fake_images", "fake_precomp/images", "images"])
def test_image_folder_lookups(tmp_path, image_dir):
    write_precomp(tmp_path, "fake", TRAIN, TEST, image_dir=tmp_path / image_dir)
    split = data.load_split("fake", str(tmp_path), "test")
    assert split.image_paths == [str(tmp_path / image_dir / n) for n in TEST]


def test_karpathy_json_layout(tmp_path, capsys):
    entries = [("t1.jpg", "train", 5), ("v1.jpg", "val", 4), ("x1.jpg", "test", 5), ("t2.jpg", "train", 7),
               ("x2.tif", "test", 3), ("t3.jpg", "restval", 5)]
    images = [dict(filename=f, split=s, imgid=i, sentences=[dict(raw=f"{f} sentence {k}", tokens=[]) for k in range(n)])
              for i, (f, s, n) in enumerate(entries)]
    (tmp_path / "dataset_kp.json").write_text(json.dumps(dict(images=images, dataset="kp")))
    write_images(tmp_path / "images", [e[0] for e in entries])
    train = data.load_split("kp", str(tmp_path), "trainval")  # train + val + restval
    assert [os.path.basename(p) for p in train.image_paths] == ["t1.jpg", "v1.jpg", "t2.jpg", "t3.jpg"]
    # Every sentence of each image, none padded or cut (only the paper's precomp files are made five per image).
    counts = [5, 4, 7, 5]
    assert train.captions == [f"{f} sentence {k}" for f, n in zip(["t1.jpg", "v1.jpg", "t2.jpg", "t3.jpg"], counts)
                              for k in range(n)]
    assert train.image_of_caption == [i for i, n in enumerate(counts) for _ in range(n)]
    assert train.anomalies == dict(empty_captions=0, images_dropped=0, images_padded=0, images_truncated=0)
    test = data.load_split("kp", str(tmp_path), "test")
    assert [os.path.basename(p) for p in test.image_paths] == ["x1.jpg", "x2.tif"]
    assert test.captions[5:] == [f"x2.tif sentence {k}" for k in range(3)] and test.image_of_caption == [0] * 5 + [1] * 3
    assert "repaired" not in capsys.readouterr().out


def test_karpathy_empty_sentences_are_dropped_and_counted(tmp_path, capsys):
    sentences = {"a.jpg": ["one", " ", "two"], "b.jpg": ["", ""], "c.jpg": ["three"]}
    images = [dict(filename=f, split="test", sentences=[dict(raw=r) for r in raws]) for f, raws in sentences.items()]
    (tmp_path / "dataset_kp.json").write_text(json.dumps(dict(images=images)))
    write_images(tmp_path / "images", list(sentences))
    test = data.load_split("kp", str(tmp_path), "test")
    assert [os.path.basename(p) for p in test.image_paths] == ["a.jpg", "c.jpg"]
    assert test.captions == ["one", "two", "three"] and test.image_of_caption == [0, 0, 1]
    assert test.anomalies["empty_captions"] == 3 and test.anomalies["images_dropped"] == 1
    assert "images_dropped 1" in capsys.readouterr().out


# ---------------------------------------------------------------- errors say what is wrong and where


def test_missing_dataset_names_layouts_and_sources(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_split("rsitmd", str(tmp_path), "train")
    message = str(e.value)
    for part in (str(tmp_path / "rsitmd_precomp"), str(tmp_path / "dataset_rsitmd.json"), "GaLR", "AMFMN"):
        assert part in message
    with pytest.raises(ValueError, match="split must be"):
        data.load_split("rsitmd", str(tmp_path), "validation")


def test_count_mismatch_names_files_and_counts(tmp_path):
    folder = write_precomp(tmp_path, "fake", TRAIN, TEST)
    (folder / "train_caps.txt").write_text("a caption\n" * 19)
    with pytest.raises(ValueError, match=r"train_caps.txt has 19 lines but .*train_filename.txt has 4"):
        data.load_split("fake", str(tmp_path), "trainval")
    names = (folder / "test_filename.txt").read_text().splitlines()
    names[7] = "f.jpg" if names[7] != "f.jpg" else "e16.tif"
    (folder / "test_filename.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(ValueError, match="test_filename.txt line 8"):
        data.load_split("fake", str(tmp_path), "test")
    os.remove(folder / "test_caps.txt")
    with pytest.raises(FileNotFoundError, match="test_caps.txt"):
        data.load_split("fake", str(tmp_path), "test")


def test_missing_images_are_named(tmp_path):
    write_precomp(tmp_path, "fake", TRAIN, TEST)
    os.remove(tmp_path / "fake_images" / "c.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 images of fake trainval are missing .*c\.jpg"):
        data.load_split("fake", str(tmp_path), "trainval")
    os.remove(tmp_path / "fake_images" / "a16.tif")
    with pytest.raises(FileNotFoundError) as e:
        data.load_split("fake", str(tmp_path), "trainval")
    assert "a16.tif" in str(e.value) and str(tmp_path / "fake_precomp" / "fake_images") in str(e.value)


def test_bad_karpathy_file(tmp_path):
    (tmp_path / "dataset_kp.json").write_text('{"images": [{"file": "x.jpg"}]}')
    with pytest.raises(ValueError, match="dataset_kp.json is not a Karpathy-style"):
        data.load_split("kp", str(tmp_path), "test")


def test_corrupt_and_missing_image_files(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image")
    Image.fromarray(image_array(0, 64, 64)).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    for name in ("garbage.jpg", "truncated.jpg"):
        with pytest.raises(ValueError, match=f"cannot decode image .*{name}"):
            data.open_image(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="nothing.tif"):
        data.open_image(str(tmp_path / "nothing.tif"))


# ---------------------------------------------------------------- decoding


def test_open_image_modes(tmp_path):
    sixteen = np.random.default_rng(0).integers(0, 65536, (9, 11), dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "i16.tif")
    assert Image.open(tmp_path / "i16.tif").mode == "I;16"
    rgb = np.asarray(data.open_image(str(tmp_path / "i16.tif")))
    assert rgb.shape == (9, 11, 3) and (rgb == (sixteen >> 8)[..., None]).all()  # high byte, not clipped
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert (np.asarray(data.open_image(str(tmp_path / "i16.png"))) == (sixteen >> 8)[..., None]).all()

    grey = image_array(1)[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.tif")
    assert (np.asarray(data.open_image(str(tmp_path / "grey.tif"))) == grey[..., None]).all()

    floats = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32) * 1e3
    Image.fromarray(floats).save(tmp_path / "float.tif")
    expected = np.round((floats.astype(np.float64) - floats.min()) * 255 / np.ptp(floats))
    assert (np.asarray(data.open_image(str(tmp_path / "float.tif")))[..., 0] == expected).all()

    colour = image_array(3)
    palette = Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "palette.png")
    assert (np.asarray(data.open_image(str(tmp_path / "palette.png"))) == np.asarray(palette.convert("RGB"))).all()

    alpha = np.random.default_rng(4).integers(0, 256, (20, 28, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([colour, alpha], axis=2)).save(tmp_path / "rgba.png")
    assert (np.asarray(data.open_image(str(tmp_path / "rgba.png"))) == colour).all()  # the colours as stored


def test_cached_tensors_match_openai_preprocessing(tmp_path, capsys):
    paths = []
    for k, (h, w) in enumerate([(37, 50), (50, 37), (32, 32), (90, 41), (33, 64)]):
        Image.fromarray(image_array(k, h, w)).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    images = data.cache_images(paths, resolution=32, workers=2, log_every=2)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert capsys.readouterr().out.count("decoded") == 2
    reference = openai_clip.clip._transform(32)
    expected = torch.stack([reference(Image.open(p)) for p in paths])
    assert torch.allclose(data.normalise(images), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- train / val split


@pytest.mark.parametrize("n_images, seed", [(53, 2), (4291, 2), (40, 7)])
def test_precomp_train_val_is_the_released_split(tmp_path, n_images, seed):
    names = [f"img{i:05d}.jpg" for i in range(n_images)]
    caps = caption_groups(names)
    caps[1] = caps[n_images - 1] = [""] * 5  # RSITMD's images with only empty captions: dropped AFTER the split
    folder = tmp_path / "x_precomp"
    folder.mkdir()
    (folder / "train_caps.txt").write_text("".join(c + "\n" for group in caps for c in group))
    (folder / "train_filename.txt").write_text("".join(n + "\n" for n in names))
    os.makedirs(tmp_path / "x_images")
    for n in names:
        (tmp_path / "x_images" / n).touch()  # only looked up here, never decoded
    lines = (folder / "train_caps.txt").read_text().splitlines(keepends=True)
    their_train, their_val = released_generate_random_samples(lines, names, seed)
    empty = {names[1], names[n_images - 1]}
    for part, theirs in (("train", their_train), ("val", their_val)):
        ours = data.load_split("x", str(tmp_path), part, seed=seed)
        assert [os.path.basename(p) for p in ours.image_paths] == sorted(set(theirs) - empty)
        assert ours.captions == [c for p in ours.image_paths for c in caps[names.index(os.path.basename(p))]]
    assert data.load_split("x", str(tmp_path), "val", seed=seed + 1).image_paths != ours.image_paths


def test_karpathy_json_keeps_its_own_split(tmp_path):
    entries = [("t1.jpg", "train"), ("v1.jpg", "val"), ("t2.jpg", "restval"), ("x1.jpg", "test"), ("v2.jpg", "val")]
    images = [dict(filename=f, split=s, sentences=[dict(raw=f"{f} {k}") for k in range(5)]) for f, s in entries]
    (tmp_path / "dataset_kp.json").write_text(json.dumps(dict(images=images)))
    write_images(tmp_path / "images", [e[0] for e in entries])
    for split, expected in (("train", ["t1.jpg", "t2.jpg"]), ("val", ["v1.jpg", "v2.jpg"]), ("test", ["x1.jpg"])):
        for seed in (2, 3):  # the file's labels, whatever the seed
            paths = data.load_split("kp", str(tmp_path), split, seed=seed).image_paths
            assert [os.path.basename(p) for p in paths] == expected


# ---------------------------------------------------------------- one preprocessing truth


@pytest.mark.parametrize("mode, file", [("RGB", "a.png"), ("RGB", "b.jpg"), ("RGB", "c.tif"), ("L", "d.png"),
                                        ("L", "e.tif")])
def test_cached_images_are_openais_preprocessing(tmp_path, mode, file):
    """Training and evaluation decode once into a uint8 cache and normalise per batch: the same tensors OpenAI's
    preprocess (clip_min.transform, itself tested against OpenAI's) gives for the same file."""
    from clip_min import transform
    path = str(tmp_path / file)
    Image.fromarray(image_array(3, h=173, w=301)[..., 0] if mode == "L" else image_array(3, h=173, w=301)).save(path)
    ours = data.normalise(data.cache_images([path], 224, workers=1, log_every=0))[0]
    with Image.open(path) as image:
        openai = transform(224)(image)
    assert (ours - openai).abs().max() < 1e-5


def transparent_image(mode, path, height, width):
    """An image with transparency, saved as PNG: RGBA and LA with an alpha of 0 over their left half and random
    elsewhere, P (a palette) with one transparent entry (a tRNS chunk) and without."""
    rng = np.random.default_rng(len(mode))
    colour = image_array(7, h=height, w=width)
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
    alpha[:, :width // 2] = 0
    if mode == "RGBA":
        image = Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=2))
    elif mode == "LA":
        image = Image.fromarray(np.stack([colour[..., 0], alpha], axis=-1), mode="LA")
    else:
        image = Image.fromarray(colour).quantize(colors=16)
        if mode == "P+transparency":
            image.info["transparency"] = 3
    image.save(path)
    return path


@pytest.mark.parametrize("height, width, resolution", [(173, 301, 224), (90, 41, 32)])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "P"])
def test_transparent_and_palette_images_are_openais_preprocessing(tmp_path, mode, height, width, resolution):
    """What OpenAI's preprocess (clip-anytorch's clip.clip._transform) gives for an image with transparency or a
    palette: PIL's resize in the file's own mode (alpha premultiplied; a palette nearest-neighbour), then RGB, the
    colour channels as stored. The decode cache gives the same tensors, and open_image the same colours."""
    path = transparent_image(mode, str(tmp_path / "image.png"), height, width)
    with Image.open(path) as image:
        assert image.mode == mode.split("+")[0] and ("transparency" in image.info) == ("+transparency" in mode)
        expected = openai_clip.clip._transform(resolution)(image)
        colours = np.asarray(image.convert("RGB"))
    ours = data.normalise(data.cache_images([path], resolution, workers=1, log_every=0))[0]
    assert (ours - expected).abs().max() < 1e-6
    assert (np.asarray(data.open_image(path)) == colours).all()
