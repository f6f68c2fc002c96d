"""The index on disk: manifest.json (the model, every file's size and mtime, every entry's file and tile) and the fp16
L2-normalised embeddings it names, one row per entry; pending/ holds the encoded chunks of a run not yet finished.
Writers replace the manifest last, so that a reader sees the old index or the new one, never a mix (docs/search.md).
"""
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time

import numpy as np

import data

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MANIFEST, PENDING = "manifest.json", "pending"  # pending/: chunks of a run that has not finished
KEY = "key.json"  # in pending/<hash of the key>/: the model and tiling its chunks were encoded with
TAKES = "index takes a folder of images or a dataset name (rsitmd, rsicd, ucm, demo)"


def write_atomically(path, write):
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(folder, damaged_ok=False):
    """The index's manifest; None where there is none (or, with damaged_ok, an unreadable one: a rebuild)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if damaged_ok:
            return None
        raise ValueError(f"{path} is damaged ({e}): index again with --rebuild") from None


def pending_folder(index_dir, key, only=False):
    """The folder of the chunks encoded for `key` (the model and tiling), made if missing. Shard processes, on
    several machines too, make it at once: a folder per key (no process ever clears another's), its key file written
    under a name of its own and moved into place. only: the folders of other keys (stale chunks of another model
    or tiling) are removed, as a plain run does."""
    root, name = os.path.join(index_dir, PENDING), hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for other in [os.path.join(root, n) for n in os.listdir(root) if only and n != name]:
        if os.path.isdir(other):
            shutil.rmtree(other)
        else:
            os.remove(other)
    if not os.path.isfile(os.path.join(folder, KEY)):
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:  # a name of its own
            f.write(key)
        os.replace(f.name, os.path.join(folder, KEY))
    return folder


def chunk_name():
    """A chunk's file name, unique across the processes and machines that write one folder."""
    return f"chunk-{time.time_ns()}-{socket.gethostname()}-{os.getpid()}.npz"


def pending_chunks(folder, wanted):
    """(rows, skipped, load) of each chunk saved in `folder` by this run, an interrupted one or a shard: the rows of
    files wanted(path, stat) only, each file from the first chunk that holds it; the files it could not decode;
    load() reads the embeddings of those rows."""
    taken = set()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".npz")):
        path = os.path.join(folder, name)
        with np.load(path) as chunk:
            meta = json.loads(str(chunk["meta"]))
        keep = [p not in taken and wanted(p, meta["files"][p]) for p, _ in meta["rows"]]
        taken |= set(meta["files"])

        def load(path=path, keep=np.array(keep, bool)):
            with np.load(path) as chunk:
                return chunk["embeddings"][keep]
        yield [row for row, k in zip(meta["rows"], keep) if k], meta.get("skipped", {}), load


def pending_in_order(chunks, position, dim):
    """One (entries, embeddings) of the chunks' rows in the order of position[path] (a file's tiles in their own
    order), whichever chunks, shards and runs encoded them: the index one process would write. Each chunk's
    embeddings go straight to their rows (memory: the new embeddings once)."""
    rows = [row for chunk_rows, _, _ in chunks for row in chunk_rows]
    order = sorted(range(len(rows)), key=lambda n: position[rows[n][0]])  # stable: tiles keep their order
    target = np.empty(len(rows), np.int64)
    target[order] = np.arange(len(rows))
    out, start = np.empty((len(rows), dim), np.float16), 0
    for chunk_rows, _, load in chunks:
        out[target[start:start + len(chunk_rows)]] = load()
        start += len(chunk_rows)
    return [rows[n] for n in order], out


def kept_row_numbers(manifest, kept):
    """The rows (increasing) of the old index's entries whose files are in `kept`, the unchanged ones."""
    return np.fromiter((i for i, (path, _) in enumerate(manifest["entries"]) if path in kept), np.int64)


def kept_rows(manifest, embeddings, rows, step=65536):
    """(entries, embeddings) of the old index's rows `rows`, a bounded slice at a time."""
    for i in range(0, len(rows), step):
        yield [manifest["entries"][r] for r in rows[i:i + step]], embeddings[rows[i:i + step]]


def write_index(folder, manifest, parts, rows, before_manifest=None):
    """The embeddings file first, its `rows` written part by part (parts: (entries, embeddings), read as they come),
    then before_manifest(manifest, embeddings) writes what else the manifest will name, then the manifest naming
    them replaces the old one in one os.replace: a reader sees the old index or the new one, never a mix. Files no
    manifest names any more are removed last."""
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
    named = {manifest["embeddings"], *((manifest.get("ann") or {}).get(n) for n in ("file", "ids"))}
    for name in os.listdir(folder):
        if name.startswith(("embeddings-", "ann-")) and name not in named:
            os.remove(os.path.join(folder, name))


def load_index(folder):
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no index in {folder} (make one: python retrieve.py index {folder} SOURCE)")
    return manifest, np.load(named_file(folder, manifest["embeddings"]), mmap_mode="r")


def named_file(folder, name):
    """The path of a file the manifest names, refused in one line when it has gone."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{path}, named by {os.path.join(folder, MANIFEST)}, is missing: index again with --rebuild")
    return path


def scan(source, data_root, index_dir):
    """({path: [size, mtime_ns]}, {path: why skipped}) of the images under folder `source` (recursively), or of
    every split of dataset `source` (data.prepare_dataset's names, under --data-root). What is not a readable regular
    file (a dangling symlink, a file without read permission, a device) is skipped, not fatal."""
    if os.path.isdir(source):
        paths, skip = [], os.path.abspath(index_dir)
        for folder, dirs, files in os.walk(os.path.abspath(source)):
            dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != skip)
            paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    elif data.is_archive(source):
        folder = os.path.dirname(os.path.abspath(source))
        raise ValueError(f"{source} is a CSV/TSV archive: {TAKES}; pass the folder its images lie in, e.g. {folder}")
    elif os.path.exists(source):
        raise ValueError(f"{source} is a file: {TAKES}")
    elif os.sep in source:  # a path, not a dataset's name
        raise FileNotFoundError(f"no folder {source}")
    else:
        name, root = data.prepare_dataset(source, data_root)
        paths = sorted({os.path.abspath(p) for part in ("trainval", "test")
                        for p in data.load_split(name, root, part).image_paths})
    found, skipped = {}, {}
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as e:
            skipped[path] = "a dangling symlink" if e.errno == errno.ENOENT and os.path.islink(path) else e.strerror
            continue
        if not stat.S_ISREG(info.st_mode) or not os.access(path, os.R_OK):
            skipped[path] = "not a regular file" if not stat.S_ISREG(info.st_mode) else "no permission to read it"
        else:
            found[path] = [info.st_size, info.st_mtime_ns]
    return found, skipped
