"""Approximate search (search/ann.py) on generated clustered embeddings: build time, size on disk, recall@10 against
the exact top-10, query latency and the memory of a process serving the index, on this machine.

    python -m benchmarks.bench_ann --rows 1000000                  # about 1 GB of embeddings under --folder
    python -m benchmarks.bench_ann --rows 10000000 --nprobe 64 128 256
    python -m benchmarks.bench_ann --rows 1000000 --reuse --update 0.01  # an incremental run against a refill

The embeddings: a mixture of --clusters gaussian clusters on the unit sphere, each spread along a few directions of
its own (embeddings of real archives lie near low-dimensional pieces, not in uniform noise), fp16 rows written in
slices as retrieve.py stores them. Queries: stored rows moved a little off the data. The exact top-10 by brute
force over every row; the approximate results are ann.top_k's (FAISS candidates re-ranked from the stored rows), in
a fresh process that memory-maps the index and the embeddings as `retrieve.py serve` does. Prints numbers only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.bench_search import cpu_name
from search import ann

SERVE = """
import json, sys, time
import numpy as np, torch, faiss
from search import ann
folder, nprobes, candidates = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
manifest = json.load(open(folder + "/manifest.json"))
embeddings = np.load(folder + "/" + manifest["embeddings"], mmap_mode="r")
approximate = ann.load(folder, manifest)
queries, truth = np.load(folder + "/queries.npy"), np.load(folder + "/truth.npy")
for nprobe, ann.MIN_CANDIDATES in [(n, c) for n in nprobes + [None] for c in candidates or [ann.MIN_CANDIDATES]]:
    if nprobe:
        ann.set_nprobe(faiss, approximate[0], nprobe)
    else:
        approximate = ann.load(folder, manifest)  # its own nprobe
    ann.top_k(approximate, embeddings, torch.from_numpy(queries[0]), 10)  # warm-up
    hits, times = 0, []
    for query, best in zip(queries, truth):
        started = time.perf_counter()
        rows = ann.top_k(approximate, embeddings, torch.from_numpy(query), 10)[1]
        times.append(time.perf_counter() - started)
        hits += len(set(rows) & set(best.tolist()))
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    reranked = max(ann.MIN_CANDIDATES, 10 * ann.CANDIDATES_PER_RESULT)
    print(json.dumps({"nprobe": nprobe or "default", "candidates": reranked, "recall@10": hits / truth.size,
                      "median_ms": 1000 * float(np.median(times)), "p99_ms": 1000 * float(np.quantile(times, .99)),
                      "rss": status["VmRSS"].strip(), "rss_anon": status["RssAnon"].strip(),
                      "rss_file": status["RssFile"].strip()}), flush=True)
"""


def generate(path, rows, dim, clusters, rank=16, step=65536, seed=0):
    """fp16 unit rows [rows, dim], cluster after cluster: centre + a gaussian along `rank` directions of its own
    (decaying spreads) + a little isotropic noise, normalised; written in slices of `step` rows."""
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, "w+", np.float16, (rows, dim))
    sizes = rng.multinomial(rows, rng.dirichlet(np.full(clusters, 5.0)))  # clusters of unequal sizes
    spreads = (0.8 ** np.arange(rank)).astype(np.float32)
    spreads *= 0.6 / np.sqrt((spreads ** 2).sum())
    position, pending = 0, []
    for size in sizes:
        centre = rng.standard_normal(dim).astype(np.float32)
        directions = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
        points = centre / np.linalg.norm(centre) + (rng.standard_normal((size, rank)).astype(np.float32) * spreads
                                                    ) @ directions
        points += 0.05 * rng.standard_normal((size, dim)).astype(np.float32) / np.sqrt(dim)
        pending.append(points / np.linalg.norm(points, axis=1, keepdims=True))
        if sum(map(len, pending)) >= step or position + sum(map(len, pending)) == rows:
            block = np.concatenate(pending)
            out[position:position + len(block)] = block
            position, pending = position + len(block), []
    out.flush()


def near_queries(embeddings, count, noise=0.2, seed=1):
    """Stored rows moved off the data by isotropic noise of length about `noise` (theirs: 1), normalised."""
    queries = ann.sample(embeddings, count, seed)
    queries += noise * np.random.default_rng(seed).standard_normal(queries.shape).astype(np.float32) / np.sqrt(
        queries.shape[1])
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact_top(embeddings, queries, k, step=65536):
    """The exact top-k rows of every query: fp32 products over every stored row, a slice at a time."""
    queries = torch.from_numpy(queries)
    scores, rows = torch.full((len(queries), 0), -2.0), torch.empty((len(queries), 0), dtype=torch.long)
    for start in range(0, len(embeddings), step):
        block = queries @ torch.from_numpy(np.array(embeddings[start:start + step])).float().T
        scores = torch.cat([scores, block], 1)
        rows = torch.cat([rows, torch.arange(start, start + block.shape[1]).expand(len(queries), -1)], 1)
        scores, best = scores.topk(min(k, scores.shape[1]), dim=1)
        rows = rows.gather(1, best)
    return rows.numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=4096)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--noise", type=float, default=0.2, help="how far the queries lie from stored rows (theirs: 1)")
    p.add_argument("--memory", type=float, help="GB for the approximate index [ann.DEFAULT_MEMORY]")
    p.add_argument("--nprobe", type=int, nargs="*", default=[], help="also measure at these nprobe")
    p.add_argument("--candidates", type=int, nargs="*", default=[], help="also measure re-ranking these many")
    p.add_argument("--reuse", action="store_true", help="measure the index a previous run built in --folder")
    p.add_argument("--folder", default="/tmp/bench-ann", help="where the embeddings and the index are written")
    p.add_argument("--update", type=float, metavar="FRACTION", help="instead of searching, time an incremental run "
                   "that drops this fraction of the rows and adds as many, against filling the index again")
    args = p.parse_args()
    folder = os.path.join(args.folder, str(args.rows))
    os.makedirs(folder, exist_ok=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {args.rows} rows, dim {args.dim},"
          f" {args.clusters} clusters", flush=True)
    path = os.path.join(folder, "embeddings-1.npy")
    if not os.path.exists(path):
        started = time.time()
        generate(path + ".tmp.npy", args.rows, args.dim, args.clusters)
        os.replace(path + ".tmp.npy", path)
        print(f"generated in {time.time() - started:.0f} s", flush=True)
    embeddings = np.load(path, mmap_mode="r")
    if not (args.reuse and os.path.exists(os.path.join(folder, "manifest.json"))):
        build(folder, embeddings, args.memory)
    if args.update:
        return update(folder, embeddings, args.update, args.noise)
    queries = near_queries(embeddings, args.queries, args.noise)
    started = time.time()
    np.save(os.path.join(folder, "truth.npy"), exact_top(embeddings, queries, 10))
    np.save(os.path.join(folder, "queries.npy"), queries)
    print(f"exact top-10 of {args.queries} queries by brute force in {time.time() - started:.0f} s", flush=True)
    subprocess.run([sys.executable, "-c", SERVE, folder, json.dumps(args.nprobe), json.dumps(args.candidates)],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(folder, embeddings, memory):
    """The approximate index as retrieve.py index --ann builds it, and a manifest naming it."""
    manifest = {"generation": 1, "embeddings": "embeddings-1.npy"}
    started = time.time()
    ann.build(folder, manifest, embeddings, None, memory and int(memory * 2 ** 30))
    size = os.path.getsize(os.path.join(folder, manifest["ann"]["file"]))
    print(f"built {manifest['ann']['type']} in {time.time() - started:.0f} s; {size / 2 ** 20:.0f} MiB on disk "
          f"(the embeddings: {embeddings.nbytes / 2 ** 20:.0f} MiB)", flush=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def update(folder, embeddings, fraction, noise, step=65536):
    """The next generation as retrieve.py index writes it (the kept rows in order, then the new ones: here rows near
    stored ones), its approximate index updated from the built one, then filled again from its training; the times
    (each reads the built index and writes the new one)."""
    with open(os.path.join(folder, "manifest.json")) as f:
        previous = json.load(f)["ann"]
    count = int(fraction * len(embeddings))
    kept = np.sort(np.random.default_rng(2).choice(len(embeddings), len(embeddings) - count, replace=False))
    new = np.lib.format.open_memmap(os.path.join(folder, "embeddings-2.npy"), "w+", np.float16,
                                    (len(embeddings), embeddings.shape[1]))
    for start in range(0, len(kept), step):
        new[start:min(start + step, len(kept))] = embeddings[kept[start:start + step]]
    new[len(kept):] = near_queries(embeddings, count, noise, seed=2)
    new.flush()
    for label, rows in (("updated (the dropped rows removed, the new ones added)", kept),
                        ("filled again (every row added)", None)):
        started = time.time()
        ann.build(folder, {"generation": 2}, new, previous, kept=rows)
        print(f"{count} rows dropped and {count} added to {previous['type']} of {len(embeddings)} rows: {label} in "
              f"{time.time() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
