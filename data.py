"""Remote sensing image-caption data: RSITMD, RSICD, UCM-Captions and the demo, read into Splits; images decoded.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import demo
import released
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
            chosen = released.released_split(len(names), seed, split)
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
        return demo.make_demo(root), root
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
