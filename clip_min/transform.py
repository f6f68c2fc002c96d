"""CLIP's image preprocessing: PIL image -> normalised float tensor [3, r, r], as OpenAI's CLIP does it."""
from torchvision import transforms

# Per-channel statistics of CLIP's training images; the released weights expect inputs normalised with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image):
    # Applied after resize and crop, as in the original; the order matters for palette images (which PIL
    # resizes with nearest neighbour) and 16-bit ones.
    return image.convert("RGB")


def transform(resolution):
    """Short side resized to `resolution` (bicubic), center crop to a square, RGB, [0, 1], normalised."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        to_rgb,  # a named function, not a lambda, so the transform pickles into DataLoader workers
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
