"""Approximate search through FAISS (optional: requirements-ann.txt): an index beside the exact embeddings, chosen by
the number of entries and a memory budget, trained on a sample, filled in slices, then updated by each generation
(the dropped rows removed, the new ones added), memory-mapped for search; its candidates are re-ranked exactly from
the stored rows (docs/search.md).
"""
import os
import sys

import numpy as np
import torch

from search import store

INSTALL = "pip install -r requirements-ann.txt"
SMALL, MEDIUM = 100_000, 1_000_000  # below SMALL: HNSW over the full vectors; below MEDIUM: IVF-Flat; then IVF-PQ
FILL_ROWS = 65536  # embeddings read and added per step: 128 MB in fp32 at dim 512, whatever the index size
TRAIN_PER_LIST = 40  # training points per inverted list (FAISS's k-means asks for at least 39)
RETRAIN_GROWTH = 4  # retrain once the archive holds this many times the entries the index was trained on
CANDIDATES_PER_RESULT, MIN_CANDIDATES = 20, 1000  # how many FAISS hits are re-ranked exactly for a top-k
NPROBE_PER_LIST, MIN_NPROBE = 64, 16  # inverted lists visited per query: nlist / 64, at least 16
FLAT_LISTS = 2 ** 14  # list centres compared one by one (a few ms at most); beyond, through an HNSW graph
QUANTIZER_EF = 512  # the graph's search breadth: list centres are nearly equidistant, narrower searches miss the best
DEFAULT_MEMORY = 4 * 2 ** 30  # bytes the approximate index may take in memory, unless --memory says otherwise


def import_faiss(why):
    """The faiss module, or a one-line refusal naming the optional requirements file."""
    try:
        import faiss
    except ImportError:
        raise SystemExit(f"{why} needs FAISS, an optional dependency: {INSTALL}") from None
    return faiss


def choose_factory(rows, dim, memory):
    """A FAISS index_factory string for `rows` vectors within `memory` bytes, as autofaiss chooses: the full vectors
    with an HNSW graph or inverted lists while they are few and fit, else product-quantised codes in inverted lists
    (the biggest codes that fit, at most one byte per 8 dimensions), their list centres searched through an HNSW
    graph once there are too many to compare with all of them."""
    nlist = 2 ** max(4, round(np.log2(np.sqrt(max(rows, 1)))))  # ~sqrt(N) lists of ~sqrt(N) entries
    if rows < SMALL and rows * (4 * dim + 256) <= memory:  # the vectors and 64 graph links each
        return "HNSW32,Flat"
    if rows < MEDIUM and rows * (4 * dim + 8) <= memory:
        return f"IVF{nlist},Flat"
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist > FLAT_LISTS else "")
    for m in (dim // 8, dim // 16, dim // 32, dim // 64):
        if m and dim % m == 0 and rows * (m + 8) <= memory:
            return f"{coarse},PQ{m}np"  # np: no polysemous training (minutes, for a filter not used)
    raise ValueError(f"--memory {memory / 2 ** 30:g} GB is too little for an approximate index of {rows} entries")


def sample(embeddings, count, seed=0):
    """`count` rows spread over the whole archive, in fp32, read in order from the memory map."""
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), min(count, len(embeddings)), replace=False))
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def trained(faiss, factory, embeddings):
    """An empty index of type `factory`, trained on a sample of the embeddings."""
    # L2 on unit rows ranks as the inner product does, and k-means centroids, the HNSW graphs and the product
    # quantiser's residuals are all made for L2 (under the inner product, centroids of unequal norms mislead them)
    made = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_L2)
    if not made.is_trained:
        ivf = faiss.extract_index_ivf(made)
        ivf.cp.spherical = True  # unit centres: a centre near the origin would be near everything and draw huge lists
        made.train(sample(embeddings, max(TRAIN_PER_LIST * ivf.nlist, 256 * TRAIN_PER_LIST)))  # PQ: 256 each
    return made


def add_rows(made, embeddings, first, ids, step=FILL_ROWS):
    """Rows first, first + 1, ... of the embeddings added under FAISS ids `ids` (None: FAISS's own, which count from
    the entries it holds), a slice at a time."""
    for start in range(first, len(embeddings), step):
        block = np.ascontiguousarray(embeddings[start:start + step], dtype=np.float32)
        if ids is None:
            made.add(block)
        else:
            made.add_with_ids(block, ids[start - first:start - first + len(block)])


def fill(made, embeddings, ids):
    """Every row added in order under `ids` (None: FAISS's own, the rows), whatever the index held."""
    made.reset()
    add_rows(made, embeddings, 0, ids)


def update(made, old_ids, kept, embeddings):
    """The previous generation's inverted lists brought to the new one without adding its kept rows again: the
    entries of the rows not kept removed, the rows after the kept ones added under ids above every earlier one (ids
    then grow with the row, as top_k's look-up needs); the ids of the new generation's rows."""
    gone = np.ones(len(old_ids), bool)
    gone[kept] = False
    if gone.any():
        made.remove_ids(np.ascontiguousarray(old_ids[gone]))  # one pass over every list: there is no direct map
    fresh = old_ids.max(initial=-1) + 1 + np.arange(len(embeddings) - len(kept))
    add_rows(made, embeddings, len(kept), fresh)
    return np.concatenate([old_ids[kept], fresh])


def build(folder, manifest, embeddings, previous, memory=None, kept=None):
    """Write the approximate index of the new generation's embeddings (ann-G.faiss; with inverted lists, the FAISS
    id of each row in ann-G.ids.npy) and name it in the manifest, before the manifest replaces the old one. The
    previous index's training is kept until the archive has grown RETRAIN_GROWTH-fold since it was trained; then
    (or without one) the type is chosen anew and trained. kept: the previous generation's rows (increasing) that
    are the first rows of `embeddings`, the others being new: a kept index of inverted lists is then updated, not
    filled again."""
    faiss = import_faiss("--ann")
    memory = memory or (previous or {}).get("memory") or DEFAULT_MEMORY
    reused = bool(previous) and len(embeddings) < RETRAIN_GROWTH * previous["trained_on"]
    if reused:
        made = faiss.read_index(store.named_file(folder, previous["file"]))
        factory, trained_on = previous["type"], previous["trained_on"]
    else:
        factory, trained_on = choose_factory(len(embeddings), embeddings.shape[1], memory), len(embeddings)
        made = trained(faiss, factory, embeddings)
    if "IVF" in factory and "HNSW" in factory:  # entries go to their nearest list, not to a near one
        faiss.ParameterSpace().set_index_parameter(made, "quantizer_efSearch", QUANTIZER_EF)
    if reused and kept is not None and "IVF" in factory:
        ids = update(made, previous_ids(folder, previous, made), np.asarray(kept, np.int64), embeddings)
    else:  # HNSW32,Flat can neither remove entries nor take ids: chosen under SMALL rows, it is filled again
        ids = np.arange(len(embeddings)) if "IVF" in factory else None
        fill(made, embeddings, ids)
    generation = manifest["generation"]
    record = {"file": f"ann-{generation}.faiss", "ids": None if ids is None else f"ann-{generation}.ids.npy",
              "type": factory, "trained_on": trained_on, "memory": memory}
    path = os.path.join(folder, record["file"])
    faiss.write_index(made, path + ".tmp")
    os.replace(path + ".tmp", path)
    if record["ids"]:
        store.write_atomically(os.path.join(folder, record["ids"]), lambda f: np.save(f, ids))
    manifest["ann"] = record


def previous_ids(folder, previous, made):
    """The FAISS id of each row of the previous generation: its ids file, or the rows themselves (an index written
    before there were ids files)."""
    if previous.get("ids"):
        return np.load(store.named_file(folder, previous["ids"]))
    return np.arange(made.ntotal)


def load(folder, manifest):
    """(FAISS index, ids) of the index's approximate index, ready to search: the index memory-mapped where its type
    allows (inverted lists), the FAISS id of each row memory-mapped (None: the ids are the rows). None when it has
    none, or (said on stderr) when FAISS is not installed: search is then exact."""
    if not manifest.get("ann"):
        return None
    try:
        faiss = import_faiss("approximate search")
    except SystemExit as e:
        print(f"note: {e.code}; searching exactly", file=sys.stderr, flush=True)
        return None
    record = manifest["ann"]
    made = faiss.read_index(store.named_file(folder, record["file"]), faiss.IO_FLAG_MMAP)
    if "IVF" in record["type"]:
        nlist = faiss.extract_index_ivf(made).nlist
        set_nprobe(faiss, made, min(nlist, max(MIN_NPROBE, nlist // NPROBE_PER_LIST)))
    return made, record.get("ids") and np.load(store.named_file(folder, record["ids"]), mmap_mode="r")


def set_nprobe(faiss, made, nprobe):
    """Inverted lists visited per query; an HNSW coarse quantiser searches twice as many list centres for them."""
    faiss.ParameterSpace().set_index_parameter(made, "nprobe", nprobe)
    if isinstance(faiss.downcast_index(faiss.extract_index_ivf(made).quantizer), faiss.IndexHNSW):
        faiss.ParameterSpace().set_index_parameter(made, "quantizer_efSearch", max(QUANTIZER_EF, 2 * nprobe))


def top_k(approximate, embeddings, query, k):
    """(scores, rows) of the k best of FAISS's candidates (approximate: load's pair), scored exactly: fp32 products
    with their stored rows."""
    made, ids = approximate
    query = query.float()
    wanted = min(len(embeddings), max(CANDIDATES_PER_RESULT * k, MIN_CANDIDATES))
    found = made.search(query.numpy()[None], wanted)[1][0]
    found = found[found >= 0]  # -1: fewer hits than asked
    rows = np.unique(found if ids is None else np.searchsorted(ids, found))  # ids grow with the row
    scores = torch.from_numpy(np.array(embeddings[rows])).float() @ query
    scores, best = scores.topk(min(k, len(rows)))
    return scores.tolist(), rows[best.numpy()].tolist()
