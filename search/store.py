"""The index on disk: manifest.json (the model, every file's size and mtime, every entry's file and tile) and the fp16
L2-normalised embeddings it names, one row per entry; pending/ holds the encoded chunks of a run not yet finished.
Writers replace the manifest last, so that a reader sees the old index or the new one, never a mix (docs/search.md).
"""
import json
import os
import shutil

import numpy as np

import data

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MANIFEST, PENDING = "manifest.json", "pending"  # pending/: chunks of a run that has not finished


def write_atomically(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def pending_chunks(folder, key, wanted):
    """(rows, embeddings) saved by a run with the same model and tiling that did not finish, the rows of files
    wanted(path, stat) only; chunks of another model or tiling are removed."""
    if (read_manifest(folder) or {}).get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        write_atomically(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps({"key": key}).encode()))
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".npz")):
        with np.load(os.path.join(folder, name)) as chunk:
            meta = json.loads(str(chunk["meta"]))
            keep = np.array([wanted(p, meta["files"][p]) for p, _ in meta["rows"]], bool)
            yield [row for row, k in zip(meta["rows"], keep) if k], chunk["embeddings"][keep]


def kept_rows(manifest, embeddings, kept, step=65536):
    """(rows, embeddings) of the old index's entries whose files are unchanged, a bounded slice at a time."""
    rows = [i for i, (path, _) in enumerate(manifest["entries"]) if path in kept]
    for i in range(0, len(rows), step):
        yield [manifest["entries"][r] for r in rows[i:i + step]], embeddings[rows[i:i + step]]


def write_index(folder, manifest, parts, before_manifest=None):
    """The embeddings file first (then before_manifest(manifest, embeddings) writes what else the manifest will
    name), then the manifest naming it replaces the old one in one os.replace: a reader sees the old index or the
    new one, never a mix. Files no manifest names any more are removed last."""
    parts = list(parts)
    rows = sum(len(e) for _, e in parts)
    path = os.path.join(folder, manifest["embeddings"])
    out = np.lib.format.open_memmap(path + ".tmp", "w+", np.float16, (rows, manifest["dim"]))
    position = 0
    for entries, embeddings in parts:
        out[position:position + len(embeddings)] = embeddings
        position += len(embeddings)
        manifest["entries"] += entries
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    if before_manifest:
        before_manifest(manifest, np.load(path, mmap_mode="r"))
    write_atomically(os.path.join(folder, MANIFEST), lambda f: f.write(json.dumps(manifest).encode()))
    shutil.rmtree(os.path.join(folder, PENDING), ignore_errors=True)
    named = {manifest["embeddings"], (manifest.get("ann") or {}).get("file")}
    for name in os.listdir(folder):
        if name.startswith(("embeddings-", "ann-")) and name not in named:
            os.remove(os.path.join(folder, name))


def load_index(folder):
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no index in {folder} (make one: python retrieve.py index {folder} SOURCE)")
    return manifest, np.load(os.path.join(folder, manifest["embeddings"]), mmap_mode="r")


def scan(source, data_root, index_dir):
    """path -> [size, mtime_ns] of the images under folder `source` (recursively), or of every split of dataset
    `source` (data.prepare_dataset's names, under --data-root)."""
    if os.path.isdir(source):
        paths, skip = [], os.path.abspath(index_dir)
        for folder, dirs, files in os.walk(os.path.abspath(source)):
            dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != skip)
            paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    elif os.sep in source or os.path.exists(source):  # a path, not a dataset's name
        raise FileNotFoundError(f"no folder {source}")
    else:
        name, root = data.prepare_dataset(source, data_root)
        paths = sorted({os.path.abspath(p) for part in ("trainval", "test")
                        for p in data.load_split(name, root, part).image_paths})
    return {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}
