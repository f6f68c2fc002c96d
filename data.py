"""Image-caption data: RSITMD, RSICD, UCM-Captions, the demo and any archive of image-caption pairs, read into
Splits; images decoded once into a memory-mapped cache.

Three on-disk layouts give the same Split:
  precomp (GaLR, AMFMN, PE-RSITR): <root>/<name>_precomp/{train,test}_caps.txt, one caption per line, five per
      image in image order, and {train,test}_filename.txt, one line per image (train) or per caption (test).
  Karpathy JSON: <root>/dataset_<name>.json = {"images": [{"filename", "split", "sentences": [{"raw"}]}]}.
  open_clip's CSV/TSV: --dataset path/to/pairs.csv (or .tsv), one row per image-caption pair, columns named by
      CsvOptions (open_clip's --csv-img-key filepath, --csv-caption-key title), an optional split column.
Precomp and Karpathy images are looked up in <root>/<name>_images/, <root>/<name>_precomp/<name>_images/,
<root>/<name>_precomp/images/ and <root>/images/; CSV paths are relative to the CSV file's folder, or absolute.
Splits: "train", "val", "test", and "trainval" (both of the first). The precomp train file holds train and val: they
are split as the authors' released code splits it (released_split); Karpathy JSON labels its own; a CSV may label
them (else val, and test, are drawn the same way).
An image has any number of captions (Split.image_of_caption); only the precomp layout of the paper's datasets is
padded or cut to five per image, as the released code reads it.

    python data.py DATASET [--data-root R] [--csv-img-key K ...]     # a report: counts, histogram, ties, errors
"""
import argparse
import csv
import hashlib
import io
import json
import os
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import recipe
from support import demo, released
from clip_min.transform import CLIP_MEAN, CLIP_STD

DEMO_ROOT = os.environ.get("PE_RSITR_CACHE", os.path.expanduser("~/.cache/pe-rsitr"))  # generated demo datasets
DECODE_CACHE_ENV = "PE_RSITR_DECODE_CACHE"  # a folder for decoded splits, or "off" [<DEMO_ROOT>/decoded]
# Part of every cache key: change it when the decoded pixels change.
DECODE_VERSION = "8bit-short-side-bicubic-center-crop-then-rgb-2"
CAPTIONS_PER_IMAGE = 5  # the precomp files of the paper's datasets; reading pads or cuts those images to five
ARCHIVE_SUFFIXES = (".csv", ".tsv")
SPLIT_VALUES = ("train", "val", "test")  # of a CSV's split column
TEST_SEED = 0  # a CSV without test rows: its test split is drawn with this seed, whatever the training seed
SOURCES = ("The precomp files (<name>_precomp/ plus the <name>_images/ folder) come with the GaLR and AMFMN "
           "repositories (github.com/xiaoyuan1996/GaLR, github.com/xiaoyuan1996/AMFMN); the Karpathy-style "
           "JSON files are named dataset_<name>.json (dataset_rsicd.json, ...); a .csv or .tsv of image-caption "
           "pairs is read as open_clip reads it.")


@dataclass
class CsvOptions:
    """How a CSV/TSV archive is read: open_clip's column names; the separator from the extension unless given."""
    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = None


@dataclass
class Split:
    name: str
    part: str  # train, val, trainval or test
    image_paths: list  # one per image
    captions: list  # grouped by image, in image order
    anomalies: dict = field(default_factory=dict)  # what reading had to repair or drop, by kind
    image_of_caption: list = None  # the image index of each caption [None: equal groups in image order]
    note: str = ""  # how the split was drawn, when the files did not say
    origins: list = None  # where each image is listed ("pairs.csv line 7"), for messages [None: its path says it]

    def __post_init__(self):
        if self.image_of_caption is None:
            per, left = divmod(len(self.captions), max(len(self.image_paths), 1))
            if left or not per:
                raise ValueError(f"{len(self.captions)} captions do not divide evenly among {len(self.image_paths)} "
                                 "images: pass image_of_caption")
            self.image_of_caption = [j // per for j in range(len(self.captions))]

    def captions_per_image(self):
        """Counter: number of captions -> number of images with that many."""
        return Counter(Counter(self.image_of_caption).values())

    def summary(self):
        fixed = ", ".join(f"{kind} {n}" for kind, n in self.anomalies.items() if n) or "no anomalies"
        counts = sorted(self.captions_per_image())
        per = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return (f"{self.name} {self.part}: {len(self.image_paths)} images, {len(self.captions)} captions ({per} per "
                f"image; {fixed})")


def is_archive(name):
    """True for a --dataset that names a CSV/TSV file of image-caption pairs."""
    return str(name).lower().endswith(ARCHIVE_SUFFIXES)


def dataset_label(name):
    """A short name for run folders: a CSV/TSV archive by its file name without extension."""
    return os.path.splitext(os.path.basename(name))[0] if is_archive(name) else name


# ---------------------------------------------------------------- reading text files


def _read_text(path):
    """The file's text; not UTF-8 is an error that names the file and the line of the first bad byte."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing caption file {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")  # -sig: no byte-order mark on the first caption
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                         "re-save the file as UTF-8") from None


def _read_lines(path):
    return _read_text(path).splitlines()


# ---------------------------------------------------------------- the three layouts


def _count_problem(captions, expected):
    """Why a caption file does not hold `expected` lines, in words."""
    if len(captions) > expected and not any(c.strip() for c in captions[expected:]):
        return f"its last {len(captions) - expected} line(s), from line {expected + 1}, are blank: remove them"
    if len(captions) < expected:
        return f"it is {expected - len(captions)} line(s) short"
    return f"it has {len(captions) - expected} line(s) too many"


def _read_precomp(folder, split):
    """(filenames, caption groups) of a precomp file pair; the names file holds one line per image or per caption."""
    caps_path, names_path = (os.path.join(folder, f"{split}_{kind}.txt") for kind in ("caps", "filename"))
    captions, names = _read_lines(caps_path), [n.strip() for n in _read_lines(names_path)]
    blank = next((i for i, n in enumerate(names) if not n), None)
    if blank is not None:
        last = all(not n for n in names[blank:])
        raise ValueError(f"{names_path} line {blank + 1}: " + ("blank line(s) at the end: remove them" if last else
                                                                "an empty filename"))
    per = CAPTIONS_PER_IMAGE
    # The layout the caption count is nearer to: one filename line per caption (test), or per image (train).
    per_caption = abs(len(captions) - len(names)) < abs(len(captions) - per * len(names))
    expected = len(names) if per_caption else per * len(names)
    if len(captions) != expected:
        layout = "one caption per filename line" if per_caption else f"{per} captions per filename line"
        raise ValueError(f"{caps_path} has {len(captions)} lines but {names_path} has {len(names)}: expected "
                         f"{expected} ({layout}); {_count_problem(captions, expected)}")
    if per_caption:  # each name repeats once per caption of its image
        bad = next((i for i, n in enumerate(names) if n != names[i - i % per]), None)
        if bad is not None or len(names) % per:
            bad = len(names) - 1 if bad is None else bad
            raise ValueError(f"{names_path} line {bad + 1}: {names[bad]!r} breaks the group of five lines of "
                             f"{names[bad - bad % per]!r} (one filename line per caption expected)")
        names = names[::per]
    return names, [captions[per * i:per * (i + 1)] for i in range(len(names))]


def _karpathy_problem(entry):
    """What is wrong with one image entry of a Karpathy-style file, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for key, kind in (("filename", str), ("split", str), ("sentences", list)):
        if not isinstance(entry.get(key), kind):
            return f"has no {key!r} {'string' if kind is str else 'list'}"
    if entry["split"] not in ("train", "restval", "val", "test"):
        return f"has the split {entry['split']!r} (train, restval, val or test expected)"
    bad = next((k for k, s in enumerate(entry["sentences"]) if not isinstance(s, dict)
                or not isinstance(s.get("raw"), str)), None)
    return None if bad is None else f"sentence {bad} has no 'raw' string"


def _read_karpathy(path, split):
    """(filenames, caption groups) of `split`, every sentence of each image (any number)."""
    wanted = {"train": ("train", "restval"), "val": ("val",), "trainval": ("train", "restval", "val"),
              "test": ("test",)}[split]
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy-style caption file: no top-level \"images\" list")
    for k, entry in enumerate(document["images"]):
        problem = _karpathy_problem(entry)
        if problem:
            raise ValueError(f"{path} is not a Karpathy-style caption file: images[{k}] {problem}")
    entries = [e for e in document["images"] if e["split"] in wanted]
    return [e["filename"] for e in entries], [[s["raw"] for s in e["sentences"]] for e in entries]


def _csv_rows(path, options):
    """(image path, split label, caption, line) per row of a CSV/TSV archive, every field checked."""
    separator = options.separator or ("\t" if path.lower().endswith(".tsv") else ",")
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=separator)
    columns, folder, rows, end = reader.fieldnames or [], os.path.dirname(os.path.abspath(path)), [], 1
    for key, flag in ((options.img_key, "--csv-img-key"), (options.caption_key, "--csv-caption-key")):
        if key not in columns:
            raise ValueError(f"{path}: no column {key!r} (columns found: {', '.join(map(repr, columns)) or 'none'}; "
                             f"{flag} names it, the separator is {separator!r}: --csv-separator changes it)")
    try:
        for row in reader:
            line, end = end + 1, reader.line_num  # a quoted caption may span lines: the row's first one
            image, caption = ((row.get(k) or "").strip() for k in (options.img_key, options.caption_key))
            label = (row.get("split") or "").strip() if "split" in columns else ""
            fields = len(columns) + len(row[None]) if None in row else sum(v is not None for v in row.values())
            if fields != len(columns):  # a wrong separator or an unclosed quote, more often than a real gap
                raise ValueError(f"{path} line {line}: {fields} fields, the header has {len(columns)}")
            problem = ("an empty caption" if not caption else "an empty image path" if not image else
                       f"the split {label!r} (train, val or test expected)" if "split" in columns
                       and label not in SPLIT_VALUES else None)
            if problem:
                raise ValueError(f"{path} line {line}: {problem}")
            rows.append((os.path.normpath(os.path.join(folder, image)), label, caption, line))
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"{path} holds no rows under its header")
    return rows


def _read_archive(path, options):
    """{image path: [split label, captions, first line, duplicate rows]} of a CSV/TSV archive, in first-appearance
    order (rows of one image need not be adjacent); a row repeating an image's caption word for word is dropped and
    counted; every image file checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"archive file not found: {path}")
    images = {}
    for image, label, caption, line in _csv_rows(path, options):
        entry = images.setdefault(image, [label, [], line, 0])
        if entry[0] != label:  # one image in two splits would leak test images into training
            raise ValueError(f"{path} line {line}: image {image} is in split {label!r} here but {entry[0]!r} at "
                             f"line {entry[2]}")
        if caption in entry[1]:  # the same pair twice would count twice in training and in the recalls
            entry[3] += 1
        else:
            entry[1].append(caption)
    for image, (_, _, line, _) in images.items():
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{path} line {line}: image {image} not found (paths are read relative to "
                                    f"the CSV file's folder, or absolute)")
        if os.path.getsize(image) == 0:
            raise ValueError(f"{path} line {line}: image {image} is an empty file (0 bytes)")
    return images


def _too_few_images(path, images, split):
    """The error for an archive with no `split` images: how many it has, how they are labelled, what it needs."""
    labels = Counter(entry[0] or "without a split label" for entry in images.values())
    return ValueError(f"{path} has no {split} images: its {len(images)} image(s) ("
                      f"{', '.join(f'{n} {label}' for label, n in labels.items())}) cannot make a training, a "
                      "validation and a test split. An archive needs 3 images at the least (test, then validation "
                      "are drawn, each a fifth of what is left, where its split column labels none), or rows "
                      "labelled train, val and test")


def _draw(paths, seed, part):
    """The images of `part` ("train" or "val": 80 / 20 %) drawn from `paths` as released_split draws them."""
    return [paths[i] for i in released.released_split(len(paths), seed, part)]


def _archive_parts(path, images, seed):
    """{part: image paths} and a note: the split column's labels; without val rows, val is drawn from the training
    images with `seed` (as for the precomp files); without test rows, test is drawn first, with TEST_SEED."""
    labelled = {label: [p for p, entry in images.items() if entry[0] == label] for label in ("", *SPLIT_VALUES)}
    pool, test, note = labelled[""] + labelled["train"], labelled["test"], ""
    if not test:
        pool, test = _draw(pool, TEST_SEED, "train"), _draw(pool, TEST_SEED, "val")
        note = (f"{path} has no test rows: the test split is {len(test)} of its images, drawn with the fixed seed "
                f"{TEST_SEED} ({100 - 100 * recipe.TRAIN_FRACTION:.0f}%, as validation is drawn)")
    val = labelled["val"]
    train, val = (pool, val) if val else (_draw(pool, seed, "train"), _draw(pool, seed, "val"))
    chosen = set(train + val)
    return dict(train=train, val=val, trainval=[p for p in images if p in chosen], test=test), note


# ---------------------------------------------------------------- one Split from any layout


def _five_per_image(groups, anomalies):
    """The precomp repair of the paper's datasets, as the released code reads them: exactly five captions per image,
    an empty one replaced by a sibling, fewer padded with the image's own, more cut; an image with none dropped."""
    per, fixed = CAPTIONS_PER_IMAGE, []
    for caps in groups:
        good = [c for c in caps if c]
        anomalies["empty_captions"] += len(caps) - len(good)
        anomalies["images_padded"] += bool(good) and len(caps) < per
        anomalies["images_truncated"] += bool(good) and len(caps) > per
        fixed.append([c or good[i % len(good)] for i, c in enumerate((caps + good * per)[:per])] if good else [])
    return fixed


def _non_empty(groups, anomalies):
    """Every non-empty caption of each image, none added or cut; empty ones dropped and counted."""
    kept = [[c for c in caps if c] for caps in groups]
    anomalies["empty_captions"] += sum(len(a) - len(b) for a, b in zip(groups, kept))
    return kept


def _image_folder(name, root, names, split):
    """The folder of a precomp or Karpathy dataset's images, every file in it checked."""
    precomp = os.path.join(root, f"{name}_precomp")
    dirs = [os.path.join(root, f"{name}_images"), os.path.join(precomp, f"{name}_images"),
            os.path.join(precomp, "images"), os.path.join(root, "images")]
    folder = next((d for d in dirs if os.path.isfile(os.path.join(d, names[0]))), None)
    if folder is None:
        raise FileNotFoundError(f"image {names[0]} of {name} {split} not found; looked in {', '.join(dirs)}. {SOURCES}")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {name} {split} are missing from {folder}, "
                                f"e.g. {', '.join(missing[:3])}")
    return folder


def _read_named(name, root, split, seed):
    """(image names, caption groups, anomalies) of a precomp or Karpathy dataset, its captions repaired."""
    precomp, karpathy = os.path.join(root, f"{name}_precomp"), os.path.join(root, f"dataset_{name}.json")
    anomalies = dict(empty_captions=0, images_dropped=0, images_padded=0, images_truncated=0)
    if os.path.isdir(precomp):
        names, groups = _read_precomp(precomp, "test" if split == "test" else "train")
        if split in ("train", "val"):  # drawn before any repair below, as the released code draws it on the raw file
            chosen = released.released_split(len(names), seed, split)
            names, groups = [names[i] for i in chosen], [groups[i] for i in chosen]
        groups = _five_per_image([[c.strip() for c in caps] for caps in groups], anomalies)
    elif os.path.isfile(karpathy):
        names, groups = _read_karpathy(karpathy, split)
        groups = _non_empty([[c.strip() for c in caps] for caps in groups], anomalies)
    else:
        raise FileNotFoundError(_misnamed_dataset(name) or f"dataset {name!r} not found under {root}: looked for the "
                                f"precomp folder {precomp} and the Karpathy JSON file {karpathy}. {SOURCES}")
    return names, groups, anomalies


def _misnamed_dataset(name):
    """What to pass instead of a --dataset that is a path (a folder, a Karpathy JSON file), or None."""
    path = os.path.normpath(name)
    folder, base = os.path.dirname(path) or ".", os.path.basename(path)
    if os.path.isfile(path) and base.startswith("dataset_") and base.endswith(".json"):
        return f"--dataset {name} is a file: name the dataset, --dataset {base[8:-5]} --data-root {folder}"
    if not os.path.isdir(path):
        return None
    if base.endswith("_precomp"):
        found = [(base[:-len("_precomp")], folder)]
    else:
        found = sorted((n[:-len("_precomp")], path) for n in os.listdir(path) if n.endswith("_precomp")) + sorted(
            (n[8:-5], path) for n in os.listdir(path) if n.startswith("dataset_") and n.endswith(".json"))
    way = (f"--dataset {found[0][0]} --data-root {found[0][1]}" if found else "its name with --data-root <the folder "
           "holding <name>_precomp/ or dataset_<name>.json>, or a .csv/.tsv file of image-caption pairs")
    return f"--dataset {name} is a folder: a dataset is named and looked up under --data-root; pass {way}"


def load_split(name, root, split, seed=recipe.SEED, csv=None):
    """Read split "train", "val", "trainval" or "test" of dataset `name` (rsitmd, rsicd, ucm, demo, any <name>
    under `root`, or the path of a .csv/.tsv archive read with CsvOptions `csv`); `seed` draws the validation split
    where the files do not label one (the paper's 2)."""
    if split not in ("train", "val", "trainval", "test"):
        raise ValueError(f"split must be 'train', 'val', 'trainval' or 'test', got {split!r}")
    note, origins = "", None
    if is_archive(name):
        images = _read_archive(name, csv or CsvOptions())
        parts, note = _archive_parts(name, images, seed)
        paths, groups = parts[split], [images[p][1] for p in parts[split]]
        if not paths:
            raise _too_few_images(name, images, split)
        anomalies = dict(images_dropped=0, duplicate_rows=sum(images[p][3] for p in paths))
        origins = [f"{name} line {images[p][2]}" for p in paths]
    else:
        names, groups, anomalies = _read_named(name, root, split, seed)
        paths = names
    keep = [i for i, caps in enumerate(groups) if caps]
    anomalies["images_dropped"] += len(groups) - len(keep)  # RSITMD's train file: four images, only empty captions
    if not keep:
        raise ValueError(f"dataset {name!r} under {root} has no {split} images with captions")
    paths, groups = [paths[i] for i in keep], [groups[i] for i in keep]
    if not is_archive(name):
        folder = _image_folder(name, root, paths, split)
        paths = [os.path.join(folder, n) for n in paths]
    result = Split(name, split, paths, [c for caps in groups for c in caps], anomalies,
                   [i for i, caps in enumerate(groups) for _ in caps], note, origins)
    if any(anomalies.values()):
        print(f"repaired while reading: {result.summary()}")
    if note and split == "test":
        print(note)
    return result


def prepare_dataset(name, root=None):
    """The (name, root) to read `name` from. The demo is first generated into `root` (default: the demo cache) unless
    it is there already, then read like RSITMD; any other dataset is read from `root` (default: data/); a CSV/TSV
    archive needs no root."""
    if not name:
        raise ValueError("the dataset's name is empty: name one (rsitmd, rsicd, ucm, demo, ...) or a .csv/.tsv file")
    if name == "demo":
        root = root or DEMO_ROOT
        return demo.make_demo(root), root
    return name, root or "data"


# ---------------------------------------------------------------- images


class UndecodableImage(ValueError):
    """An image file that cannot be decoded; `path` names it, for the message that says where it is listed."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path = path


def read_image(path):
    """Decode an image file to 8 bits per channel in its own mode (RGB, L, P, RGBA, LA, ...), as OpenAI's
    preprocessing receives it; 16-bit, 32-bit and float data become 8-bit greyscale (PIL would clip them)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise UndecodableImage(path, f"cannot decode image {path}: an empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()
            if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
                return image
            a = np.asarray(image)
            if image.mode != "F" and a.min() >= 0 and a.max() <= 65535:
                # 16-bit data: keep the high byte, a fixed map that keeps brightness comparable across images
                # (as Pillow does for 16-bit RGB TIFFs); convert() would clip, a per-image stretch inflate noise.
                a = (a.astype(np.uint32) >> 8).astype(np.uint8)
            else:  # float or 32-bit data have no full scale to divide by: use the actual range
                a = a.astype(np.float64) - a.min()
                a = (a * (255 / max(a.max(), 1e-12))).round().astype(np.uint8)
            return Image.fromarray(a)
    except (OSError, ValueError, SyntaxError) as e:
        raise UndecodableImage(path, f"cannot decode image {path}: {e}") from e


def open_image(path):
    """Decode an image file to an 8-bit RGB PIL image: the colour channels as stored, an alpha channel dropped (as
    OpenAI's preprocessing converts), palette and single-channel files expanded, 16-bit ones as read_image."""
    return read_image(path).convert("RGB")


def cache_images(paths, resolution=224, workers=8, log_every=1000, out=None):
    """Decode every image once in CLIP's geometry into a uint8 tensor [N, 3, r, r] (RSITMD at 224: ~0.65 GB), or
    into `out` (a numpy array of that shape, e.g. a memory map). OpenAI's order: short side to `resolution` (bicubic,
    in the file's own mode, as PIL resamples it: alpha premultiplied, a palette nearest-neighbour), center crop,
    then RGB."""
    def load(path):  # in a worker thread: PIL decodes and resizes outside the GIL
        image = TF.center_crop(TF.resize(read_image(path), resolution, TF.InterpolationMode.BICUBIC), resolution)
        return np.array(image.convert("RGB")).transpose(2, 0, 1)
    target = np.empty((len(paths), 3, resolution, resolution), np.uint8) if out is None else out
    step = 64 * max(1, workers)  # a bounded window: decoded images never pile up ahead of the copy
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), step):
            for i, image in enumerate(pool.map(load, paths[start:start + step]), start):
                target[i] = image
                if log_every and (i + 1) % log_every == 0:
                    print(f"decoded {i + 1}/{len(paths)} images", flush=True)
    return torch.from_numpy(target)


def decode_cache_folder(choice=None):
    """Where decoded splits are kept: `choice` (a folder), else $PE_RSITR_DECODE_CACHE, else <DEMO_ROOT>/decoded;
    None when the cache is off (choice False, or the variable set to "off")."""
    if choice is False:
        return None
    folder = choice or os.environ.get(DECODE_CACHE_ENV) or os.path.join(DEMO_ROOT, "decoded")
    return None if folder.lower() in ("off", "0", "none") else folder


def _cache_name(paths, resolution):
    """The cache file of these image files at this resolution: a hash of their paths, sizes and modification times,
    so that a changed, added or removed file makes another file."""
    digest = hashlib.sha256(f"{DECODE_VERSION} {resolution}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return f"{len(paths)}x{resolution}-{digest.hexdigest()[:24]}.npy"


def _read_cache(path, shape):
    """The memory-mapped array at `path`, or None when there is none of that shape. Mode "c" (copy-on-write): a
    writable view for torch.from_numpy that never writes the file and copies only a page written to."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError):  # absent, or not a numpy file
        return None
    return array if array.shape == shape and array.dtype == np.uint8 else None


def load_images(paths, resolution=224, workers=8, cache=None, log_every=1000):
    """cache_images with a disk cache: the split decoded once into one uint8 .npy file in the cache folder
    (decode_cache_folder(cache)), memory-mapped by every later call: the process holds no copy of the images, and
    the page cache shares one among runs. Written to a unique temporary name, then renamed: a file left half-written
    by a killed run is never read, two runs decoding at once each write their own. cache=False: decode in memory."""
    folder = decode_cache_folder(cache)
    if folder is None or not paths:
        return cache_images(paths, resolution, workers, log_every)
    path, shape = os.path.join(folder, _cache_name(paths, resolution)), (len(paths), 3, resolution, resolution)
    array = _read_cache(path, shape)
    if array is None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise OSError(f"the decode cache folder {folder} cannot be made ({e.strerror}): choose another with "
                          f"--decode-cache (or ${DECODE_CACHE_ENV}), or decode in memory with --no-decode-cache") from e
        tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            cache_images(paths, resolution, workers, log_every, out=out)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"decoded {len(paths)} images once into {path}", flush=True)
        array = _read_cache(path, shape)
    return torch.from_numpy(array)


def decode_split(split, resolution, workers=8, cache=None, log_every=1000):
    """load_images of a split; an image that cannot be decoded is said with where the split lists it."""
    try:
        return load_images(split.image_paths, resolution, workers, cache, log_every)
    except UndecodableImage as e:
        raise _listed(split, e) from None


def _listed(split, error):
    """An UndecodableImage's message led by where the split lists the image (an archive's file and line)."""
    where = dict(zip(split.image_paths, split.origins or [])).get(error.path)
    return UndecodableImage(error.path, f"{where}: {error}") if where else error


def normalise(images):
    """uint8 images [..., 3, r, r] on any device -> the floats CLIP's ToTensor + Normalize give. In place on one float
    copy: each temporary is a batch's size (128 images at 224 px: 77 MB), and three of them per batch fragment a heap
    that keeps freed memory (runtime.keep_freed_memory)."""
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return images.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


# ---------------------------------------------------------------- command-line options and the report


def add_arguments(parser, decode=True):
    """The archive options (open_clip's flag names) and, with `decode`, the decode cache's, for every command."""
    group = parser.add_argument_group("a .csv/.tsv --dataset of image-caption pairs, read as open_clip reads it")
    group.add_argument("--csv-img-key", help="the column of image paths [filepath]")
    group.add_argument("--csv-caption-key", help="the column of captions [title]")
    group.add_argument("--csv-separator", type=_csv_separator, help="[comma for .csv, tab for .tsv; \\t is a tab]")
    if decode:
        group = parser.add_argument_group("decoded images")
        group.add_argument("--decode-cache", metavar="DIR", help=f"folder of decoded splits, memory-mapped by later "
                           f"runs [${DECODE_CACHE_ENV}, else $PE_RSITR_CACHE/decoded or ~/.cache/pe-rsitr/decoded]")
        group.add_argument("--no-decode-cache", action="store_true", help="decode into memory, write no cache")


def _csv_separator(value):
    """--csv-separator's value, checked: one character, or \\t (a tab)."""
    if len(value) != 1 and value != "\\t":
        raise argparse.ArgumentTypeError(f"one character (\\t: a tab), got {value!r}")
    return value


def csv_options(args, saved=None):
    """CsvOptions from parsed arguments; those not given come from `saved` (a checkpoint's train.py arguments)."""
    saved, values = saved or {}, {}
    for key in ("img_key", "caption_key", "separator"):
        value = getattr(args, f"csv_{key}", None) or saved.get(f"csv_{key}")
        if value is not None:
            values[key] = "\t" if value == "\\t" else value
    return CsvOptions(**values)


def archive_argv(args):
    """The archive options given, as arguments to pass on to train.py."""
    return [a for key in ("img_key", "caption_key", "separator") if getattr(args, f"csv_{key}", None)
            for a in (f"--csv-{key.replace('_', '-')}", getattr(args, f"csv_{key}"))]


def decode_cache_choice(args):
    """load_images' `cache` from parsed arguments: False (off), a folder, or None (the default folder)."""
    return False if getattr(args, "no_decode_cache", False) else getattr(args, "decode_cache", None)


def split_report(split, context_length=77):
    """Lines on one split: counts, the histogram of captions per image, captions the context cuts, exact ties."""
    from clip_min.tokenizer import default_tokenizer
    tokenizer = default_tokenizer()
    histogram = ", ".join(f"{n}: {count}" for n, count in sorted(split.captions_per_image().items()))
    cut = sum(len(tokenizer.encode(c)) + 2 > context_length for c in split.captions)  # + start and end tokens
    images_of = {}
    for caption, image in zip(split.captions, split.image_of_caption):
        images_of.setdefault(caption, set()).add(image)
    shared = {c for c, images in images_of.items() if len(images) > 1}
    lines = [f"{split.part}: {len(split.image_paths)} images, {len(split.captions)} captions",
             f"  captions per image (captions: images): {histogram}",
             f"  captions longer than the {context_length}-token context (cut): {cut}",
             f"  identical captions shared by several images (exact ties): {len(shared)} texts, "
             f"{sum(c in shared for c in split.captions)} captions",
             "  dropped or repaired: " + (", ".join(f"{k} {n}" for k, n in split.anomalies.items() if n) or "none")]
    return lines


def read_header(path):
    """An image file's header read, no pixels decoded (cheap); an unreadable one is an UndecodableImage."""
    try:
        with Image.open(path):
            pass
    except (OSError, ValueError, SyntaxError) as e:
        raise UndecodableImage(path, f"cannot read image {path}: {e}") from None


def check_images(split, workers, headers_only=False):
    """Every image of a split decoded as training decodes it (headers_only: its header read); the first that
    cannot be is an error that says where the split lists it."""
    with ThreadPoolExecutor(workers) as pool:
        try:
            for _ in pool.map(read_header if headers_only else lambda path: read_image(path).size, split.image_paths):
                pass
        except UndecodableImage as e:
            raise _listed(split, e) from None


def main(argv=None):
    p = argparse.ArgumentParser(description="A report on a dataset: images and captions per split, captions per "
                                "image, captions the context cuts, exact ties, images dropped; every image decoded "
                                "as training decodes it. An error exits 1 with one line.")
    p.add_argument("dataset", help="rsitmd, rsicd, ucm, demo, a <name> under --data-root, or a .csv/.tsv file")
    p.add_argument("--data-root", help="[data; demo: its cache]")
    p.add_argument("--seed", type=int, default=recipe.SEED,
                   help="draws the validation split where the files label none [%(default)s]")
    p.add_argument("--headers-only", action="store_true", help="read each image's header only (fast; a damaged "
                   "image is then found when training decodes it) [decode every image]")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images [%(default)s]")
    add_arguments(p, decode=False)
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    name, root = prepare_dataset(args.dataset, args.data_root)
    splits = [load_split(name, root, part, args.seed, csv_options(args)) for part in ("train", "val", "test")]
    for split in splits:
        check_images(split, args.workers, args.headers_only)
    print(f"{args.dataset}:")
    for split in splits:
        print("\n".join(split_report(split)))
    both = set(splits[0].image_paths + splits[1].image_paths) & set(splits[2].image_paths)
    print(f"images in both training and test splits: {len(both)}")
    print("images: every header read, no pixels decoded (--headers-only); a damaged image is found when training "
          "decodes it" if args.headers_only else "images: every one decoded as training decodes it")


if __name__ == "__main__":
    from support import runtime
    runtime.run_command(main)
