"""Remote sensing image-caption data: RSITMD, RSICD, UCM-Captions, and a synthetic demo dataset.

Two on-disk layouts give the same Split:
  precomp (GaLR, AMFMN, PE-RSITR): <root>/<name>_precomp/{train,test}_caps.txt, one caption per line, five per
      image in image order, and {train,test}_filename.txt, one line per image (train) or per caption (test).
  Karpathy JSON: <root>/dataset_<name>.json = {"images": [{"filename", "split", "sentences": [{"raw"}]}]}.
Images are looked up in <root>/<name>_images/, <root>/<name>_precomp/<name>_images/, <root>/<name>_precomp/images/
and <root>/images/. Splits: "train", "val", "test", and "trainval" (both of the first). The precomp train file holds
train and val: they are split as the authors' released code splits it (released_split); Karpathy JSON labels its own.
"""
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

from clip_min.transform import CLIP_MEAN, CLIP_STD

DEMO_ROOT = os.environ.get("PE_RSITR_CACHE", os.path.expanduser("~/.cache/pe-rsitr"))  # generated demo datasets
CAPTIONS_PER_IMAGE = 5  # every dataset of the paper; reading repairs images with fewer or more
SOURCES = ("The precomp files (<name>_precomp/ plus the <name>_images/ folder) come with the GaLR and AMFMN "
           "repositories (github.com/xiaoyuan1996/GaLR, github.com/xiaoyuan1996/AMFMN); the Karpathy-style "
           "JSON files are named dataset_<name>.json (dataset_rsicd.json, ...).")


@dataclass
class Split:
    name: str
    part: str  # train, val, trainval or test
    image_paths: list  # one per image
    captions: list  # CAPTIONS_PER_IMAGE per image, in image order: caption j belongs to image j // CAPTIONS_PER_IMAGE
    anomalies: dict = field(default_factory=dict)  # what reading had to repair, by kind

    def summary(self):
        fixed = ", ".join(f"{kind} {n}" for kind, n in self.anomalies.items() if n) or "no anomalies"
        return f"{self.name} {self.part}: {len(self.image_paths)} images, {len(self.captions)} captions ({fixed})"


def _read_lines(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing caption file {path}")
    return Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: no byte-order mark on the first caption


def _read_precomp(folder, split):
    caps_path, names_path = (os.path.join(folder, f"{split}_{kind}.txt") for kind in ("caps", "filename"))
    captions, names = _read_lines(caps_path), [n.strip() for n in _read_lines(names_path)]
    per = CAPTIONS_PER_IMAGE
    if len(captions) == len(names) and len(names) % per == 0:  # one line per caption (test): each name repeats
        bad = next((i for i, n in enumerate(names) if n != names[i - i % per]), None)
        if bad is not None:
            raise ValueError(f"{names_path} line {bad + 1}: {names[bad]!r} breaks the group of five lines of "
                             f"{names[bad - bad % per]!r} (one filename line per caption expected)")
        names = names[::per]
    elif len(captions) != per * len(names):  # else one line per image (train_filename.txt)
        raise ValueError(f"{caps_path} has {len(captions)} lines but {names_path} has {len(names)}: expected "
                         f"{per} captions per filename line ({per * len(names)}) or one filename line per caption")
    return names, [captions[per * i:per * (i + 1)] for i in range(len(names))]


def released_split(n_images, seed, split):
    """Indices (in file order) of the training file's images in `split` ("train" or "val"), drawn as the authors'
    train.py draws them: random.seed(seed), one random.shuffle of the image groups in file order, the first
    int(0.8 * n) for training and the rest for validation. The shuffle depends only on n and the seed."""
    order = list(range(n_images))
    random.Random(seed).shuffle(order)
    cut = int(n_images * 0.8)  # the released expression, so the float rounding is theirs too
    return sorted(order[:cut] if split == "train" else order[cut:])


def _read_karpathy(path, split):
    wanted = {"train": ("train", "restval"), "val": ("val",), "trainval": ("train", "restval", "val"),
              "test": ("test",)}[split]
    try:
        entries = [e for e in json.loads(Path(path).read_text(encoding="utf-8"))["images"] if e["split"] in wanted]
        return [e["filename"] for e in entries], [[s["raw"] for s in e["sentences"]] for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a Karpathy-style caption file ({type(e).__name__}: {e})") from e


def load_split(name, root, split, seed=2):
    """Read split "train", "val", "trainval" or "test" of dataset `name` (rsitmd, rsicd, ucm, demo) under `root`;
    `seed` draws the precomp files' train/val split (the paper's 2)."""
    if split not in ("train", "val", "trainval", "test"):
        raise ValueError(f"split must be 'train', 'val', 'trainval' or 'test', got {split!r}")
    precomp, karpathy = os.path.join(root, f"{name}_precomp"), os.path.join(root, f"dataset_{name}.json")
    if os.path.isdir(precomp):
        names, groups = _read_precomp(precomp, "test" if split == "test" else "train")
        if split in ("train", "val"):  # drawn before any repair below, as the released code draws it on the raw file
            chosen = released_split(len(names), seed, split)
            names, groups = [names[i] for i in chosen], [groups[i] for i in chosen]
    elif os.path.isfile(karpathy):
        names, groups = _read_karpathy(karpathy, split)
    else:
        raise FileNotFoundError(f"dataset {name!r} not found under {root}: looked for the precomp folder {precomp} "
                                f"and the Karpathy JSON file {karpathy}. {SOURCES}")
    kept, captions = [], []
    anomalies = dict(empty_captions=0, images_dropped=0, images_padded=0, images_truncated=0)
    for image, caps in zip(names, groups):
        caps = [c.strip() for c in caps]
        good = [c for c in caps if c]
        anomalies["empty_captions"] += len(caps) - len(good)
        anomalies["images_dropped"] += not good  # RSITMD's train file has four images with only empty captions
        if good:  # exactly CAPTIONS_PER_IMAGE, as the metrics assume: pad with the image's own captions, or cut
            per = CAPTIONS_PER_IMAGE
            anomalies["images_padded"] += len(caps) < per
            anomalies["images_truncated"] += len(caps) > per
            captions += [c or good[i % len(good)] for i, c in enumerate((caps + good * per)[:per])]  # empty: a sibling
            kept.append(image)
    if not kept:
        raise ValueError(f"dataset {name!r} under {root} has no {split} images with captions")
    dirs = [os.path.join(root, f"{name}_images"), os.path.join(precomp, f"{name}_images"),
            os.path.join(precomp, "images"), os.path.join(root, "images")]
    folder = next((d for d in dirs if os.path.isfile(os.path.join(d, kept[0]))), None)
    if folder is None:
        raise FileNotFoundError(f"image {kept[0]} of {name} {split} not found; looked in {', '.join(dirs)}. {SOURCES}")
    missing = [n for n in kept if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {name} {split} are missing from {folder}, "
                                f"e.g. {', '.join(missing[:3])}")
    result = Split(name, split, [os.path.join(folder, n) for n in kept], captions, anomalies)
    if any(anomalies.values()):
        print(f"repaired while reading: {result.summary()}")
    return result


def prepare_dataset(name, root=None):
    """The (name, root) to read `name` from. The demo is first generated into `root` (default: the demo cache) unless
    it is there already, then read like RSITMD; any other dataset is read from `root` (default: data/)."""
    if name == "demo":
        root = root or DEMO_ROOT
        return make_demo(root), root
    return name, root or "data"


def open_image(path):
    """Decode an image file to an 8-bit RGB PIL image (16-bit, single-channel, palette and alpha files included)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16") or image.mode in ("I", "F"):
                a = np.asarray(image)
                if image.mode != "F" and a.min() >= 0 and a.max() <= 65535:
                    # 16-bit data: keep the high byte, a fixed map that keeps brightness comparable across images
                    # (as Pillow does for 16-bit RGB TIFFs); convert() would clip, a per-image stretch inflate noise.
                    a = (a.astype(np.uint32) >> 8).astype(np.uint8)
                else:  # float or 32-bit data have no full scale to divide by: use the actual range
                    a = a.astype(np.float64) - a.min()
                    a = (a * (255 / max(a.max(), 1e-12))).round().astype(np.uint8)
                image = Image.fromarray(a)
            if "A" in image.getbands() or "transparency" in image.info:
                # Composite onto black (the usual no-data value) rather than expose whatever lies under alpha 0.
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def cache_images(paths, resolution=224, workers=8, log_every=1000):
    """Decode every image once in CLIP's geometry (short side to `resolution`, bicubic; center crop) into a uint8
    tensor [N, 3, r, r] (RSITMD at 224: ~0.65 GB)."""
    def load(path):  # in a worker thread: PIL decodes and resizes outside the GIL
        image = TF.resize(open_image(path), resolution, TF.InterpolationMode.BICUBIC)
        return torch.from_numpy(np.array(TF.center_crop(image, resolution))).permute(2, 0, 1)
    out = torch.empty(len(paths), 3, resolution, resolution, dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, image in enumerate(pool.map(load, paths)):
            out[i] = image
            if log_every and (i + 1) % log_every == 0:
                print(f"decoded {i + 1}/{len(paths)} images", flush=True)
    return out


def normalise(images):
    """uint8 images [..., 3, r, r] on any device -> the floats CLIP's ToTensor + Normalize give."""
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (images.float() / 255 - mean) / std


# Demo dataset: synthetic scenes whose captions say what is drawn, so that retrieval can be learnt in minutes.
COLOURS = {"red": (200, 50, 40), "white": (235, 235, 230), "blue": (50, 80, 210), "yellow": (230, 200, 40)}
GROUNDS = {"meadow": (70, 140, 60), "farmland": (150, 110, 60), "desert": (215, 190, 130)}
POSITIONS = {"remote": ["left", "right", "top", "bottom"], "natural": ["left", "right"]}
# Scenes are drawn with the buildings on the left, then mirrored or transposed to their position.
MOVE = dict(right=Image.Transpose.FLIP_LEFT_RIGHT, top=Image.Transpose.TRANSPOSE, bottom=Image.Transpose.TRANSVERSE)


def _draw(domain, ground, water, road, colour, count, position, s, rng):
    image = Image.new("RGB", (s, s), GROUNDS[ground])
    draw, water_rgb = ImageDraw.Draw(image), (45, 100, 190)
    if domain == "remote":  # overhead view: buildings in one half, water and road in the other
        for y in range(0, s, 6) if ground == "farmland" else []:
            draw.rectangle((0, y, s, y + 2), (125, 90, 50))  # plough lines
        if water == "river":
            draw.rectangle((s * 5 // 8, 0, s * 3 // 4, s), water_rgb)
        elif water == "lake":
            draw.ellipse((s // 2, s // 4, s * 7 // 8, s * 3 // 4), water_rgb)
        if road:
            draw.rectangle((s // 2 - 2, 0, s // 2 + 1, s), (110, 110, 110))
        for slot in rng.permutation(4)[:count]:  # four non-overlapping slots in the left half
            x, y = (slot % 2) * s // 4 + s // 16, (slot // 2) * s // 2 + s // 8
            draw.rectangle((x + 2, y + 2, x + s // 8 + 2, y + s // 4 + 2), (40, 40, 40))  # shadow
            draw.rectangle((x, y, x + s // 8, y + s // 4), COLOURS[colour])
    else:  # side view: sky over the horizon, houses with roofs standing on it, water in the foreground
        horizon, w = s * 2 // 5, s // 9
        draw.rectangle((0, 0, s, horizon), (135, 190, 240))
        if water:
            draw.rectangle((0, s * 3 // 4, s, s) if water == "lake" else (0, s * 13 // 16, s, s * 7 // 8), water_rgb)
        if road:
            draw.polygon([(s * 3 // 4, horizon), (s * 3 // 4 + 3, horizon), (s, s), (s // 2, s)], (90, 90, 90))
        for x in range(2, 2 + count * (w + 2), w + 2):
            draw.rectangle((x, horizon - w, x + w, horizon + 2), COLOURS[colour])
            draw.polygon([(x - 1, horizon - w), (x + w + 1, horizon - w), (x + w // 2, horizon - w * 3 // 2)],
                         (120, 40, 30))  # roof
    image = image.transpose(MOVE[position]) if position in MOVE else image
    palette = (1.15, 1.05, 0.85) if domain == "natural" else 1.0  # natural scenes: warm, sunlit
    pixels = np.asarray(image) * palette + rng.integers(-6, 7, (s, s, 3))  # sensor-like noise
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def _captions(domain, ground, water, road, colour, count, position):
    n, be = ["one", "two", "three", "four"][count - 1], "is" if count == 1 else "are"
    things = f"{n} {colour} {'building' if domain == 'remote' else 'house'}{'s' if count > 1 else ''}"
    water, road = f"a {water}" if water else "no water", "a road" if road else "no road"
    if domain == "remote":  # terse overhead descriptions, like RSITMD's
        return [f"{things} on the {position} side of the {ground} .", f"there {be} {things} in a {ground} .",
                f"a {ground} with {road} and {things} on the {position} .", f"{things} {be} near {water} and {road} .",
                f"this {ground} area has {water} , {road} and {n} {colour} roofs ."]
    return [f"a photo of {things} on the {position} under a blue sky .", f"{things} standing in a {ground} .",
            f"a picture of a {ground} with {water} and {things} .", f"a {ground} landscape with {road} and {water} .",
            f"on the {position} there {be} {things} with brown roofs ."]


def make_demo(root, domain="remote", n_train=400, n_test=100, seed=0, size=64):
    """Write (once) a seeded synthetic dataset in the precomp layout under `root` and return its name for
    load_split: "demo" for the overhead "remote" domain, "demo_natural" for the side-view "natural" domain."""
    if domain not in POSITIONS:
        raise ValueError(f"domain must be one of {list(POSITIONS)}, got {domain!r}")
    name = "demo" if domain == "remote" else f"demo_{domain}"
    folder, image_dir = Path(root, f"{name}_precomp"), Path(root, f"{name}_images")
    marker, params = folder / "complete.json", json.dumps(dict(n_train=n_train, n_test=n_test, seed=seed, size=size))
    if marker.is_file() and marker.read_text() == params:
        return name
    marker.unlink(missing_ok=True)  # made with other parameters: regenerate, unmarked until complete
    folder.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, list(POSITIONS).index(domain)])
    for split, first, count in (("train", 0, n_train), ("test", n_train, n_test)):
        files, captions = [f"{name}_{i:05d}.png" for i in range(first, first + count)], []
        for file in files:
            scene = (domain, str(rng.choice(list(GROUNDS))), [None, "river", "lake"][rng.integers(3)],
                     bool(rng.integers(2)), str(rng.choice(list(COLOURS))), int(rng.integers(1, 5)),
                     str(rng.choice(POSITIONS[domain])))
            _draw(*scene, size, rng).save(image_dir / file)
            captions += _captions(*scene)
        repeat = 1 if split == "train" else CAPTIONS_PER_IMAGE  # precomp: test names repeat once per caption
        (folder / f"{split}_filename.txt").write_text("".join(f"{file}\n" * repeat for file in files))
        (folder / f"{split}_caps.txt").write_text("".join(f"{caption}\n" for caption in captions))
    marker.write_text(params)  # written last: an interrupted generation leaves no marker and is redone
    return name
