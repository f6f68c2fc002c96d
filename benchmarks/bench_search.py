"""Speed of retrieve.py: indexing throughput and exact-search latency, on this machine.

    python bench_search.py                       # tiny CLIP and ViT-B/32 (random weights); 10k, 100k and 1M entries
    python bench_search.py --sizes 10000 --images 8

Indexing: retrieve.encode_files (decode, CLIP's preprocessing, encoding, the chunk saved) over generated 512 x 512
PNGs, in the precision runtime.default_amp picks. Search: exact.top_k over synthetic fp16 embeddings (dim 512)
memory-mapped from a temporary .npy, after one warm-up pass (the page cache holds them, as on a serving machine),
beside the time one pass takes to copy those bytes out of memory: the bound for any exact search that reads every
embedding. Prints numbers only.
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import adapter
import clip_min
import retrieve
from search import exact
from support import runtime


def cpu_name():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def random_model(config, amp):
    """A random CLIP as retrieve.load_model prepares one (frozen weights stored in the autocast precision)."""
    torch.manual_seed(0)
    model = adapter.apply(clip_min.CLIP(config), "zeroshot").eval()
    runtime.keep_frozen_weights_in(model, amp)
    return model


def indexing(label, config, n_images, folder, device, amp):
    """Images per second through retrieve.encode_files, after a one-image warm-up."""
    model = random_model(config, amp)
    rng = np.random.default_rng(0)
    paths, name = [], label.replace("/", "")
    for i in range(n_images + 1):
        paths.append(os.path.join(folder, f"{name}-{i}.png"))
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(paths[-1])
    found = {p: [0, 0] for p in paths}
    pending = os.path.join(folder, f"pending-{name}")
    os.makedirs(pending)
    retrieve.encode_files(model, paths[:1], found, None, pending, device, amp, workers=2)
    started = time.perf_counter()
    retrieve.encode_files(model, paths[1:], found, None, pending, device, amp, workers=2)
    rate = n_images / (time.perf_counter() - started)
    print(f"index  {label:9s} {n_images:4d} images of 512x512: {rate:7.1f} images/s", flush=True)


def searching(n, folder, repeats=5, dim=512, k=10):
    """Median top-k latency over n memory-mapped fp16 embeddings, and one copy of their bytes out of memory."""
    path = os.path.join(folder, f"embeddings-{n}.npy")
    out = np.lib.format.open_memmap(path, "w+", np.float16, (n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 65536):  # written a slice at a time: 1M entries are 1 GB
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    del out
    embeddings, query = np.load(path, mmap_mode="r"), torch.nn.functional.normalize(torch.randn(dim), dim=0)
    buffer = np.empty((exact.SEARCH_ROWS, dim), np.float16)

    def read_once():
        for start in range(0, n, exact.SEARCH_ROWS):
            block = embeddings[start:start + exact.SEARCH_ROWS]
            np.copyto(buffer[:len(block)], block)

    timings = {}
    for name, task in (("read", read_once), ("search", lambda: exact.top_k(embeddings, query, k))):
        task()  # warm-up: page cache and allocator
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            task()
            times.append(time.perf_counter() - started)
        timings[name] = statistics.median(times)
    gigabytes = n * dim * 2 / 1e9
    print(f"search {n:>9,} entries ({gigabytes:.2f} GB fp16): top-{k} {timings['search'] * 1e3:8.1f} ms; one read "
          f"of the embeddings {timings['read'] * 1e3:7.1f} ms ({gigabytes / timings['read']:.1f} GB/s)", flush=True)
    os.remove(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Indexing throughput and exact-search latency of retrieve.py.")
    p.add_argument("--images", type=int, default=16, help="images per model for the indexing throughput")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    runtime.keep_freed_memory()
    print(f"CPU: {cpu_name()}, {args.threads} torch threads, torch {torch.__version__}")
    amp = runtime.default_amp(device)
    with tempfile.TemporaryDirectory() as folder:
        for name, config in (("tiny", runtime.TINY_CLIP), ("ViT-B/32", clip_min.CLIPConfig())):
            indexing(name, config, args.images, folder, device, amp)
        with torch.no_grad():
            model = random_model(clip_min.CLIPConfig(), amp)
            retrieve.embed_text(model, "warm-up", device, amp)
            started = time.perf_counter()
            for _ in range(10):
                retrieve.embed_text(model, "a bridge over a river next to a dense residential area", device, amp)
        print(f"query  ViT-B/32 text encoding: {(time.perf_counter() - started) * 100:.1f} ms per query")
        for n in args.sizes:
            searching(n, folder)


if __name__ == "__main__":
    main()
