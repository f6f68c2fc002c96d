"""OpenAI's released CLIP checkpoints: their URLs and SHA-256s, fetched once into a cache folder and checked there."""
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.parse
import urllib.request

DEFAULT_ROOT = "~/.cache/clip"
_BASE_URL = "https://openaipublic.azureedge.net/clip/models"


def _entry(sha256, filename):
    # The URL's path segment is the file's SHA-256.
    return f"{_BASE_URL}/{sha256}/{filename}", sha256


MODELS = {  # name -> (url, sha256)
    "ViT-B/32": _entry("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _entry("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _entry("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _entry("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                             "ViT-L-14-336px.pt"),
}


def available_models():
    """Names load() accepts besides a file path."""
    return list(MODELS)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, out):
    """Stream `url` into the open file `out` with a progress line on stderr; return the data's SHA-256."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                total_text = f"{total / 2**20:.1f}" if total else "?"
                print(f"\rDownloading {name}: {done / 2**20:.1f}/{total_text} MiB", end="", file=sys.stderr, flush=True)
    except (OSError, http.client.HTTPException) as e:  # urllib.error.URLError is an OSError
        raise ConnectionError(f"could not download {url}: {e}") from e
    finally:
        print(file=sys.stderr, flush=True)
    return digest.hexdigest()


def download(url, sha256, root=None):
    """Path of the file at `url` in the cache folder `root`, downloaded first unless a copy with this SHA-256 is there."""
    root = os.path.expanduser(root or DEFAULT_ROOT)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, os.path.basename(urllib.parse.urlparse(url).path))
    sha256 = sha256.lower()
    if os.path.isfile(path):
        if sha256_of(path) == sha256:
            return path
        print(f"{path} exists but its SHA-256 does not match; downloading it again", file=sys.stderr)
    # Written beside the target and renamed only once verified, so the cache never holds a partial or wrong file.
    fd, tmp_path = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _fetch(url, out)
        if actual != sha256:
            raise RuntimeError(f"downloaded {url} but its SHA-256 is {actual}, expected {sha256}; the file was discarded")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path
