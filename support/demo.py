"""The demo dataset: synthetic scenes whose captions say what is drawn, so that retrieval can be learnt in minutes on a
CPU. Written once in the precomp layout of RSITMD (data.py reads it like the real datasets): the overhead "remote"
domain is the demo, the side-view "natural" domain is what miniature.py pretrains the bundled mini CLIP on.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import clip_min

# The demo's CLIP: miniature.py pretrains it into assets/mini-clip.pt; without that file the demo starts from it with
# random weights. heads = width // 64; the text width stays above the MRS-Adapter's bottleneck of 64. The 49408 x 128
# token embedding is most of its parameters; the towers are small enough to train on a CPU in minutes.
MINI_CLIP = clip_min.CLIPConfig(embed_dim=128, image_resolution=64, patch_size=16, vision_width=192, vision_layers=4,
                                text_width=128, text_layers=3)

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
        names, captions = [], []  # precomp: the train names one line per image, the test names one per caption
        for file in (f"{name}_{i:05d}.png" for i in range(first, first + count)):
            scene = (domain, str(rng.choice(list(GROUNDS))), [None, "river", "lake"][rng.integers(3)],
                     bool(rng.integers(2)), str(rng.choice(list(COLOURS))), int(rng.integers(1, 5)),
                     str(rng.choice(POSITIONS[domain])))
            _draw(*scene, size, rng).save(image_dir / file)
            captions += _captions(*scene)
            names += [file] * (1 if split == "train" else len(_captions(*scene)))
        (folder / f"{split}_filename.txt").write_text("".join(f"{file}\n" for file in names))
        (folder / f"{split}_caps.txt").write_text("".join(f"{caption}\n" for caption in captions))
    marker.write_text(params)  # written last: an interrupted generation leaves no marker and is redone
    return name
