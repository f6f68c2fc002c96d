"""Exact top-k over the memory-mapped embeddings of an index: every row scored, memory bounded at any size."""
import numpy as np
import torch

SEARCH_ROWS = 32768  # embeddings per matrix product of a search: 64 MB in fp32 at dim 512, whatever the index size


def top_k(embeddings, query, k, step=SEARCH_ROWS):
    """Exact top-k (scores, rows) of the query against every embedding: one matrix product per slice of the
    memory-mapped rows and a running top-k, so memory stays bounded at any index size."""
    scores, rows = torch.empty(0), torch.empty(0, dtype=torch.long)
    for start in range(0, len(embeddings), step):
        block = torch.from_numpy(np.array(embeddings[start:start + step])).float() @ query.float()
        scores, rows = torch.cat([scores, block]), torch.cat([rows, torch.arange(start, start + len(block))])
        scores, best = scores.topk(min(k, len(scores)))
        rows = rows[best]
    return scores.tolist(), rows.tolist()
