"""Speed of retrieve.py: indexing throughput and exact-search latency, on this machine.

    python -m benchmarks.bench_search            # tiny CLIP and ViT-B/32 (random weights); 10k, 100k and 1M entries
    python -m benchmarks.bench_search --sizes 10000 --images 8
    python -m benchmarks.bench_search --search-only --ten-million --threads 1   # also 10M entries, if they fit

Indexing: retrieve.encode_files (decode, CLIP's preprocessing, encoding, the chunk saved) over generated 512 x 512
PNGs, in the precision runtime.default_amp picks. Search: exact.top_k over synthetic unit fp16 embeddings (dim 512)
memory-mapped from a temporary .npy, after one warm-up pass (the page cache holds them, as on a serving machine),
for one query and for batches of 4, 8 and 16 in one pass (fast pass in fp32, and in bf16 where the CPU multiplies
bf16 natively), beside the time one pass takes to copy those bytes out of memory: the bound for any exact search that
reads every embedding. Prints numbers only.
"""
import argparse
import datetime
import functools
import os
import shutil
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
from support import demo, runtime


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


def write_embeddings(path, n, dim):
    """n random unit rows in fp16, written a slice at a time (1M entries are 1 GB)."""
    out = np.lib.format.open_memmap(path, "w+", np.float16, (n, dim))
    rng = np.random.default_rng(0)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()


def fits_in_memory(n, dim, folder):
    """Whether n embeddings fit in the page cache (with room to spare) and on the disk of `folder`."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    size = n * dim * 2
    return 1.5 * size < available and 1.2 * size < shutil.disk_usage(folder).free


def searching(n, folder, rounds=5, dim=512, k=10, batches=(4, 8, 16)):
    """Median times over n memory-mapped fp16 embeddings of one read of their bytes (copied out of the page
    cache, a slice at a time), a top-k for one query, and one pass answering each batch of queries (fast pass in
    fp32, and from exact.BF16_QUERIES on also in bf16 where the CPU has bf16 units), measured in turns so that the
    load of a shared machine falls on all alike."""
    path = os.path.join(folder, f"embeddings-{n}.npy")
    write_embeddings(path, n, dim)
    embeddings = np.load(path, mmap_mode="r")
    queries = torch.nn.functional.normalize(torch.randn(max(batches), dim), dim=1)
    buffer = np.empty((exact.SEARCH_ROWS, dim), np.float16)

    def read_once():
        for start in range(0, n, exact.SEARCH_ROWS):
            block = embeddings[start:start + exact.SEARCH_ROWS]
            np.copyto(buffer[:len(block)], block)

    tasks = {"read": read_once, "one query": lambda: exact.top_k(embeddings, queries[0], k, norm=1.0)}
    for batch in batches:
        for bf16 in [False] + [True] * (runtime.cpu_has_native_bf16() and batch >= exact.BF16_QUERIES):
            tasks[batch, bf16] = functools.partial(exact.top_k, embeddings, queries[:batch], k, norm=1.0, bf16=bf16)
    times = {name: [] for name in tasks}
    for turn in range(rounds + 1):  # the first turn warms the page cache and the allocator
        for name, task in tasks.items():
            started = time.perf_counter()
            task()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    read, single = median.pop("read"), median.pop("one query")
    print(f"search {n:>10,} entries ({n * dim * 2 / 1e9:5.2f} GB): read {read * 1e3:8.1f} ms | top-{k} of one query "
          f"{single * 1e3:8.1f} ms ({single / read:4.2f}x read)", flush=True)
    for (batch, bf16), took in median.items():
        print(f"       {batch:3d} queries in one pass, {'bf16' if bf16 else 'fp32'} fast pass: {took * 1e3:8.1f} ms "
              f"({took / read:4.2f}x read, {took / read / batch:4.2f}x per query)", flush=True)
    os.remove(path)


def model_timings(n_images, folder, device, amp):
    for name, config in (("tiny", demo.MINI_CLIP), ("ViT-B/32", clip_min.CLIPConfig())):
        indexing(name, config, n_images, folder, device, amp)
    with torch.no_grad():
        model = random_model(clip_min.CLIPConfig(), amp)
        retrieve.embed_text(model, "warm-up", device, amp)
        started = time.perf_counter()
        for _ in range(10):
            retrieve.embed_text(model, "a bridge over a river next to a dense residential area", device, amp)
    print(f"query  ViT-B/32 text encoding: {(time.perf_counter() - started) * 100:.1f} ms per query")


def main(argv=None):
    p = argparse.ArgumentParser(description="Indexing throughput and exact-search latency of retrieve.py.")
    p.add_argument("--images", type=int, default=16, help="images per model for the indexing throughput")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ten-million", action="store_true", help="also 10M entries (10 GB) if memory and disk allow")
    p.add_argument("--search-only", action="store_true", help="skip the indexing and text-encoding timings")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    runtime.keep_freed_memory()
    print(f"{datetime.date.today()}, CPU: {cpu_name()} ({os.cpu_count()} cores), {args.threads} torch threads, "
          f"torch {torch.__version__}")
    amp = runtime.default_amp(device)
    with tempfile.TemporaryDirectory() as folder:
        if not args.search_only:
            model_timings(args.images, folder, device, amp)
        for n in args.sizes + ([10_000_000] if args.ten_million else []):
            if fits_in_memory(n, 512, folder):
                searching(n, folder)
            else:
                print(f"search {n:>10,} entries: skipped, more than the free memory or disk holds")

if __name__ == "__main__":
    main()
