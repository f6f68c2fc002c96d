"""clip_min.transform against OpenAI's reference preprocessing (PyPI clip-anytorch, clip.clip._transform)."""
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
    from clip.clip import _transform as reference_transform

from clip_min.transform import CLIP_MEAN, CLIP_STD, transform

MODES = ["RGB", "L", "RGBA", "P", "I;16"]
SIZES = [(300, 217), (17, 500), (224, 224), (1, 1)]  # (width, height): landscape, tall and thin, square, 1 pixel


def make_image(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise, so both interpolation and per-pixel values matter.
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs * 7 + ys * 3) % 256
    channels = [(base + rng.integers(0, 64, base.shape) + 80 * c) % 256 for c in range(4)]
    rgba = np.stack(channels, axis=-1).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3])
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return Image.fromarray(rgba[..., 0])
    if mode == "P":
        return Image.fromarray(rgba[..., :3]).quantize(colors=32)
    if mode == "I;16":  # 16-bit grayscale, using the whole range
        wide = (base.astype(np.uint16) * 256 + rng.integers(0, 256, base.shape)).astype("<u2")
        return Image.frombytes("I;16", (width, height), wide.tobytes())
    raise AssertionError(mode)


@pytest.mark.parametrize("resolution", [224, 336])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_reference(mode, size, resolution):
    image = make_image(mode, *size, seed=10 * MODES.index(mode) + SIZES.index(size))
    assert image.mode == mode
    ours = transform(resolution)(image)
    expected = reference_transform(resolution)(image)
    assert ours.dtype == torch.float32 and ours.shape == (3, resolution, resolution)
    assert (ours - expected).abs().max().item() <= 1e-6


def test_constants_equal_reference():
    normalize = reference_transform(224).transforms[-1]
    assert tuple(normalize.mean) == CLIP_MEAN and tuple(normalize.std) == CLIP_STD


def test_input_image_is_left_unchanged():
    image = make_image("RGBA", 40, 30, seed=0)
    before = np.array(image).copy()
    transform(224)(image)
    assert image.mode == "RGBA" and np.array_equal(np.array(image), before)


def test_pickles_for_dataloader_workers():
    image = make_image("RGB", 50, 60, seed=1)
    restored = pickle.loads(pickle.dumps(transform(224)))
    assert torch.equal(restored(image), transform(224)(image))


@pytest.mark.parametrize("resolution", [0, -3, 2.5, "224", True])
def test_bad_resolution(resolution):
    with pytest.raises(ValueError, match="resolution"):
        transform(resolution)
