"""Measure what a train.py epoch holds as the archive grows, and the decode cache, on generated archives: the peak
anonymous memory (RssAnon) and wall time of one train.py --epochs 1 on a CSV archive of 3,000 and of 12,000 images (a
first run that decodes into the cache, a second, identical run that memory-maps it, and a run without the cache), then
the decode time the cache saves table.py on the demo. Prints numbers; docs/data.md holds a run's.

    python -m benchmarks.archive_bench [--root /tmp/pe-rsitr-archive] [--sizes 3000 12000]

The images (256 x 256 JPEG: noise and shapes, 1 to 5 captions each) are generated once under --root and reused.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

import clip_min

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small CLIP at 224 px: decoding and memory, not the model, are what is measured.
SMALL = clip_min.CLIPConfig(embed_dim=64, image_resolution=224, patch_size=32, vision_width=128, vision_layers=1,
                            text_width=128, text_layers=1)
COLOURS = ["red", "green", "blue", "yellow", "white"]
TRAIN_IMAGES = 500  # the training split: fixed, so the step count is too; val and test grow with the archive


def make_image(path, k):
    rng = np.random.default_rng(k)
    image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, 200, 2)
        draw.rectangle((int(x), int(y), int(x) + 50, int(y) + 40), COLOURS[k % 5])
    image.save(path, quality=90)


def generate(root, n):
    """images/00000.jpg ... and pairs-<n>.csv (split column: TRAIN_IMAGES train, then one val in four, the rest test);
    images already there are kept, so the larger archive reuses the smaller one's files."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    paths = [os.path.join(root, "images", f"{k:05d}.jpg") for k in range(n)]
    todo = [(p, k) for k, p in enumerate(paths) if not os.path.isfile(p)]
    started = time.time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda a: make_image(*a), todo))
    if todo:
        print(f"generated {len(todo)} images in {time.time() - started:.0f} s", flush=True)
    csv = os.path.join(root, f"pairs-{n}.csv")
    with open(csv, "w") as f:
        f.write("filepath,title,split\n")
        for k in range(n):
            part = "train" if k < TRAIN_IMAGES else "val" if k % 4 == 0 else "test"
            for c in range(1 + k % 5):
                f.write(f"images/{k:05d}.jpg,\"scene {k % 97}, {COLOURS[k % 5]} shapes, view {c}\",{part}\n")
    return csv


def sampled(command, env):
    """(wall seconds, peak RssAnon MB, peak VmRSS MB, output) of a subprocess, its /proc status read every 20 ms."""
    started, peak = time.time(), {"RssAnon": 0, "VmRSS": 0}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(status) as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    output = proc.communicate()[0]
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return time.time() - started, peak["RssAnon"] / 1024, peak["VmRSS"] / 1024, output


def train_runs(root, n, clip, env):
    csv, cache = generate(root, n), os.path.join(root, "decoded")
    shutil.rmtree(cache, ignore_errors=True)
    base = [sys.executable, "train.py", "--dataset", csv, "--clip", clip, "--epochs", "1", "--batch-size", "64",
            "--amp", "off", "--workers", "2", "--log-every", "1000"]
    rows = []
    for label, extra in (("first (decodes)", ["--decode-cache", cache]), ("second (maps)", ["--decode-cache", cache]),
                         ("no cache", ["--no-decode-cache"])):
        out = os.path.join(root, "runs", f"{n}-{label.split()[0]}")
        shutil.rmtree(out, ignore_errors=True)
        wall, anon, rss, _ = sampled(base + extra + ["--out", out], env)
        rows.append((n, label, wall, anon, rss))
        print(f"{n} images, {label}: {wall:.1f} s, peak RssAnon {anon:.0f} MB, peak VmRSS {rss:.0f} MB", flush=True)
    return rows


def table_runs(root, env):
    """table.py on the demo, its main rows for one epoch (three cells, each reading the demo's three splits), with
    a fresh cache and without one; and how many splits were decoded into the cache."""
    results = {}
    for label, extra in (("cache", ["--decode-cache", os.path.join(root, "demo-decoded")]),
                         ("no cache", ["--no-decode-cache"])):
        shutil.rmtree(os.path.join(root, "demo-decoded"), ignore_errors=True)
        out = os.path.join(root, "table", label.replace(" ", "-"))
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "table.py", "--datasets", "demo", "--epochs", "1", "--out", out, "--amp", "off",
                   "--workers", "2", *extra]
        wall, _, _, _ = sampled(command, env)
        logs = [os.path.join(d, "log.txt") for d, _, files in os.walk(out) if "log.txt" in files]
        decoded = sum(open(p).read().count("once into") for p in logs)
        results[label] = (wall, decoded)
        print(f"table.py on the demo ({len(logs)} cells), {label}: {wall:.1f} s, {decoded} splits decoded into "
              "the cache", flush=True)
    return results


def demo_decode_seconds(env_root):
    """Seconds to decode the demo's three splits once (what each table cell after the first no longer does)."""
    import data
    from support import demo, runtime
    name, root = data.prepare_dataset("demo", env_root)
    resolution = clip_min.load(runtime.DEMO_CLIP)[0].visual.input_resolution if os.path.isfile(runtime.DEMO_CLIP) \
        else demo.MINI_CLIP.image_resolution
    started = time.time()
    for part in ("train", "val", "test"):
        data.cache_images(data.load_split(name, root, part).image_paths, resolution, workers=2, log_every=0)
    return time.time() - started


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join("/tmp", "pe-rsitr-archive"))
    p.add_argument("--sizes", type=int, nargs="+", default=[3000, 12000])
    args = p.parse_args()
    os.makedirs(args.root, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")
    print(f"{time.strftime('%Y-%m-%d')}, CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    clip = os.path.join(args.root, "small-clip-224.pt")
    torch.manual_seed(0)
    torch.save(clip_min.CLIP(SMALL).state_dict(), clip)
    env = {**os.environ, "PE_RSITR_CACHE": os.path.join(args.root, "cache"), "CUDA_VISIBLE_DEVICES": ""}
    for n in sorted(args.sizes):
        train_runs(args.root, n, clip, env)
    table = table_runs(args.root, env)
    os.environ["PE_RSITR_CACHE"] = env["PE_RSITR_CACHE"]
    once = demo_decode_seconds(env["PE_RSITR_CACHE"])
    cells = 3
    print(f"demo: decoding its three splits takes {once:.1f} s; with the cache table.py decoded "
          f"{table['cache'][1]} splits instead of {3 * cells}: {(cells - 1) * once:.1f} s of decoding saved (wall "
          f"{table['cache'][0]:.0f} s with the cache, {table['no cache'][0]:.0f} s without)")


if __name__ == "__main__":
    main()
