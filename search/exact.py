"""Exact top-k over the memory-mapped fp16 embeddings of an index, at about the cost of reading them once.

Converting every row to fp32 before its product costs more than reading it, so a fast pass scores each slice
approximately: fp16 products (fp32 accumulation) for a few queries, fp32 products of cache-sized converted blocks
for a batch (bf16 products where the CPU multiplies bf16 natively: faster, within a wider margin). The rows of a
slice whose approximate score could reach the running k-th best are scored again exactly (the stored fp16 row
against the query, accumulated in fp64 and rounded to fp32) and only exact scores rank, equal scores by lower row
first. Memory stays bounded by one slice whatever the index size."""
import queue
import threading
import warnings

import torch

SEARCH_ROWS = 65536  # rows per slice: 64 MB of fp16 at dim 512, whose candidates are settled before the next slice
BLOCK_ROWS = 1024  # rows converted to fp32 at a time for a batch: 2 MB at dim 512, read back from cache, not memory
BATCH_QUERIES = 4  # from this many queries on, one fp32 product per block beats one fp16 product per query
BF16_QUERIES = 6  # and bf16 products beat fp32 ones (where the CPU has bf16 units), despite two conversions a block
# |approximate - exact| <= MARGIN * (largest row norm) * |query|: fp16 rounding of the unit query and of the score
# (2^-11 each) and fp32 accumulation (D * 2^-24, below 2^-11 up to D = 8192), with room to spare.
MARGIN = 2.0 ** -9
# The same bound for a batch in bf16: rounding of the row, of the unit query and of the score (2^-8 each: 8
# significant bits), fp32 accumulation as above and flushed subnormal products (under 2^-126 each): below 2^-6.3.
BF16_MARGIN = 2.0 ** -6


def as_tensor(embeddings):
    """A zero-copy tensor over the rows (a read-only memmap: torch warns that writing would be undefined; no
    search writes)."""
    if isinstance(embeddings, torch.Tensor):
        return embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(embeddings)


def largest_norm(rows, step=SEARCH_ROWS):
    """The largest L2 norm among the rows: one more pass, for callers that cannot bound it."""
    norms = [torch.linalg.vector_norm(rows[s:s + step].float(), dim=1).max().item() for s in range(0, len(rows), step)]
    return max(norms, default=0.0)


def approximate(chunk, units, bf16=False):
    """Scores [Q, rows] of the unit queries against a slice, within MARGIN (BF16_MARGIN for a batch in bf16) * the
    rows' largest norm of exact."""
    if len(units) < BATCH_QUERIES:
        return torch.stack([chunk @ unit for unit in units.to(chunk.dtype)]).float()
    dtype = torch.bfloat16 if bf16 else torch.float32
    wide, narrow = torch.empty(BLOCK_ROWS, chunk.shape[1]), torch.empty(BLOCK_ROWS, chunk.shape[1], dtype=dtype)
    units, out = units.to(dtype), torch.empty(len(chunk), len(units), dtype=dtype)
    for start in range(0, len(chunk), BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, len(chunk))
        rows = wide[:end - start].copy_(chunk[start:end])
        if bf16:  # through fp32: torch converts fp16 to bf16 directly several times slower
            rows = narrow[:end - start].copy_(rows)
        torch.mm(rows, units.T, out=out[start:end])
    return out.T.float()


def settle(best, chunk, start, approx, query, k, margin):
    """The running exact top-k (scores, rows) of one query, merged with the rows of a slice that may enter it."""
    scores, rows = best
    floor = scores[-1] - margin if len(scores) == k else float("-inf")  # rows below cannot reach the k-th best
    picked = torch.nonzero(approx >= floor).squeeze(1)
    if len(picked) > k:  # the slice's own k-th best bounds them too (k rows score at least its score - margin)
        floor = max(floor, approx.topk(min(k, len(approx))).values[-1] - 2 * margin)
        picked = torch.nonzero(approx >= floor).squeeze(1)
    exact = (chunk[picked].double() @ query.double()).float()
    scores, rows = torch.cat([scores, exact]), torch.cat([rows, picked + start])  # earlier slices first
    order = torch.sort(scores, descending=True, stable=True).indices[:k]  # stable: equal scores keep the lower row
    return scores[order], rows[order]


def top_k(embeddings, query, k, step=SEARCH_ROWS, norm=None, bf16=False):
    """Exact top-k (scores, rows) of a query [D] against every embedding; for queries [Q, D], one (scores, rows) per
    query from a single pass. `norm` bounds the rows' L2 norms (the index stores unit rows: 1); None measures it.
    bf16: the fast pass of BF16_QUERIES or more in bf16, for CPUs that multiply bf16 natively
    (runtime.cpu_has_native_bf16)."""
    rows16, queries = as_tensor(embeddings), query.reshape(-1, query.shape[-1]).float()
    k, bf16 = min(k, len(rows16)), bf16 and len(queries) >= BF16_QUERIES
    lengths = torch.linalg.vector_norm(queries, dim=1).clamp_min(1e-30)[:, None]
    bound = largest_norm(rows16, step) if norm is None else norm
    margins = (BF16_MARGIN if bf16 else MARGIN) * bound * lengths[:, 0]
    best = [(torch.empty(0), torch.empty(0, dtype=torch.long))] * len(queries)
    for start in range(0, len(rows16) if k else 0, step):
        chunk = rows16[start:start + step]
        approx = approximate(chunk, queries / lengths, bf16) * lengths
        best = [settle(best[i], chunk, start, approx[i], queries[i], k, margins[i]) for i in range(len(queries))]
    found = [(scores.tolist(), rows.tolist()) for scores, rows in best]
    return found[0] if query.dim() == 1 else found


def gathering(embeddings, norm=None, bf16=False):
    """top_k(query, k) for concurrent callers: one thread scans, and the queries that arrived while it scanned are
    answered together by the next pass (each caller waits for its own answer)."""
    waiting = queue.Queue()  # (query, k, where its answer goes)

    def scan_forever():
        while True:
            batch = [waiting.get()]
            while not waiting.empty():
                batch.append(waiting.get())
            try:
                found = top_k(embeddings, torch.stack([q.float() for q, _, _ in batch]), max(k for _, k, _ in batch),
                              norm=norm, bf16=bf16)
                found = [(scores[:k], rows[:k]) for (_, k, _), (scores, rows) in zip(batch, found)]
            except Exception as error:  # every caller gets it, rather than waiting for ever
                found = [error] * len(batch)
            for (_, _, answer), hits in zip(batch, found):
                answer.put(hits)

    def scan(query, k):
        answer = queue.Queue()
        waiting.put((query, k, answer))
        hits = answer.get()
        if isinstance(hits, Exception):
            raise hits
        return hits

    threading.Thread(target=scan_forever, daemon=True).start()
    return scan
