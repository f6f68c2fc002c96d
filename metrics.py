"""The recall protocol of image-text retrieval: cosine similarities of a split, R@1/5/10 in both directions and mR as
the field's code computes them, with exactly tied scores counted exactly.

    images_emb, captions_emb = metrics.split_embeddings(model, images, tokens, device)
    counts = metrics.embedding_counts(images_emb, captions_emb, split.image_of_caption)  # a block of queries at a time
    print(metrics.format_metrics(metrics.recalls(counts)))
    print(metrics.tie_bounds(counts))  # the other tie rules' mR, when ties touch a truth
"""
import time

import torch
import torch.nn.functional as F

import clip_min
import data
from support import runtime


def hit_probability(above, tied, truths, k, ties="expected"):
    """P(rank < k) per query: `above` wrong candidates score strictly higher than its best truth, `tied` wrong ones
    equal it, and `truths` of its own candidates reach that score (so the first of them is its rank)."""
    if ties == "pessimistic":  # every tied wrong candidate ranked first
        return (above + tied < k).double()
    if ties == "optimistic":  # every tied wrong candidate ranked after the truths
        return (above < k).double()
    # Tied items in uniformly random order: the rank misses k when none of the first m = k - above tied slots holds a
    # truth, probability C(tied, m) / C(tied + truths, m) = prod_{i<m} (tied - i) / (tied + truths - i).
    slots = (k - above).clamp(0, k)[:, None]
    i = torch.arange(k, device=above.device)
    # Past i = tied the product is already 0; the clamp only keeps the factors after that finite.
    ratios = (tied[:, None] - i).double() / (tied[:, None] + truths[:, None] - i).clamp(min=1)
    return 1 - torch.where(i < slots, ratios, 1.0).prod(dim=1)


def caption_owners(image_of_caption, n_images, n_captions, device=None):
    """The image index of each caption as a LongTensor, checked: an int k means k captions per image in image order
    (caption j of image j // k), None an equal number per image in image order; every image needs one caption."""
    if image_of_caption is None or isinstance(image_of_caption, int):
        per = image_of_caption if image_of_caption is not None else \
            n_captions // n_images if n_images and n_captions % n_images == 0 else 0
        if per < 1 or n_images == 0 or n_captions != n_images * per:
            raise ValueError(f"similarity has {n_captions} captions for {n_images} images; expected images x "
                             f"captions per image = {n_images} x {per} = {n_images * per}, or pass image_of_caption")
        return torch.arange(n_captions, device=device) // per
    owners = torch.as_tensor(image_of_caption, dtype=torch.long, device=device).flatten()
    if len(owners) != n_captions:
        raise ValueError(f"image_of_caption names the image of {len(owners)} captions; similarity has {n_captions}")
    if n_captions and (owners.min() < 0 or owners.max() >= n_images):
        raise ValueError(f"image_of_caption holds image indices outside 0..{n_images - 1}")
    uncaptioned = (torch.bincount(owners, minlength=n_images) == 0).sum().item()
    if uncaptioned or n_images == 0:
        raise ValueError(f"{uncaptioned} of {n_images} images have no caption: an image query needs a truth")
    return owners


# Similarities per block of image queries: 32 MB in float32, a whole test split of the paper's datasets in one block.
BLOCK_SIMILARITIES = 2 ** 23


def row_blocks(rows_of, n_images, chunk):
    """(start, similarity rows start..start + chunk) per block of image queries, from rows_of(first, stop). Every
    block is computed `chunk` rows tall (the last one overlaps the one before and keeps its new rows): BLAS libraries
    pick a kernel by shape, and a shorter block would round its products differently (an image duplicated across
    blocks would no longer tie with itself)."""
    for start in range(0, n_images, chunk):
        first = max(0, min(start, n_images - chunk))
        yield start, rows_of(first, first + chunk)[start - first:]


def count_true(mask, dim):
    """The True entries of a boolean block along dim. Summing a boolean block first copies it into the sum's dtype
    (int64 by default, and in count_nonzero: 8 bytes an entry); int32 holds any count here, in half that."""
    return mask.sum(dim=dim, dtype=torch.int32)


def image_query_counts(rows, start, owners, truth_score):
    """(above, tied, truths) of the image queries start..start + len(rows) (hit_probability's terms); writes the
    truth score of each of their captions (its similarity with its own image) into truth_score."""
    if torch.isnan(rows).any():
        raise ValueError("similarity contains NaN")
    captions = torch.nonzero((owners >= start) & (owners < start + len(rows))).squeeze(1)
    local = owners[captions] - start
    own = truth_score[captions] = rows[local, captions]
    best_own = own.new_empty(len(rows)).scatter_reduce_(0, local, own, "amax", include_self=False)
    truths = torch.bincount(local[own == best_own[local]], minlength=len(rows))
    above, at_best = (count_true(rows > best_own[:, None], dim=1), count_true(rows == best_own[:, None], dim=1))
    return torch.stack((above, at_best - truths, truths))


def counts_by_blocks(rows_of, n_images, n_captions, image_of_caption, chunk, device):
    """(above, tied, truths) of every query in both directions, from the similarity rows rows_of(first, stop), one
    block of image queries at a time, in two passes: the image queries and each caption's truth score, then per
    caption the images that score above and level with its truth. Memory O(chunk x captions). The outputs are
    allocated once and nothing else outlives a block, so that a heap which keeps freed memory
    (runtime.keep_freed_memory) can give one block's memory to the next."""
    owners = caption_owners(image_of_caption, n_images, n_captions, device=device)
    chunk = max(1, BLOCK_SIMILARITIES // n_captions) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    image_queries, truth_score = torch.empty(3, n_images, dtype=torch.long, device=device), None
    for start, rows in row_blocks(rows_of, n_images, chunk):
        if truth_score is None:  # the first block tells the scores' dtype
            truth_score = rows.new_empty(n_captions)
        image_queries[:, start:start + len(rows)] = image_query_counts(rows, start, owners, truth_score)
    above = torch.zeros(n_captions, dtype=torch.long, device=device)
    level = torch.zeros_like(above)  # the truth itself included
    for _, rows in row_blocks(rows_of, n_images, chunk):
        above += count_true(rows > truth_score, dim=0)
        level += count_true(rows == truth_score, dim=0)
    return {"i2t": tuple(image_queries), "t2i": (above, level - 1, torch.ones_like(above))}


def embedding_counts(image_features, caption_features, image_of_caption=None, chunk=None):
    """The counts recalls() turns into R@K, from a split's embeddings [images, d] and [captions, d]: the cosine
    similarities image_features @ caption_features.T computed `chunk` image rows at a time [BLOCK_SIMILARITIES per
    block] and dropped, never the whole matrix. image_of_caption as in retrieval_metrics."""
    return counts_by_blocks(lambda first, stop: image_features[first:stop] @ caption_features.t(),
                            len(image_features), len(caption_features), image_of_caption, chunk, image_features.device)


def similarity_counts(similarity, image_of_caption=None, chunk=None):
    """The counts recalls() turns into R@K, from an [images x captions] similarity matrix."""
    similarity = torch.as_tensor(similarity)
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be a 2-D [images x captions] matrix, got shape {tuple(similarity.shape)}")
    return counts_by_blocks(lambda first, stop: similarity[first:stop], *similarity.shape, image_of_caption, chunk,
                            similarity.device)


def recalls(counts, ties="expected"):
    """Recall@1/5/10 in both directions and their mean mR, in percent, and tied_queries, from the counts of
    embedding_counts or similarity_counts; ties as in retrieval_metrics."""
    if ties not in ("expected", "pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'expected', 'pessimistic' or 'optimistic', got {ties!r}")
    metrics, tied_queries = {}, 0
    for direction, (above, tied, truths) in counts.items():
        tied_queries += (tied > 0).sum().item()
        for k in (1, 5, 10):
            hits = hit_probability(above, tied, truths, k, ties).sum().item()
            metrics[f"{direction}_R@{k}"] = 100.0 * hits / len(above)
    metrics["mR"] = sum(metrics.values()) / 6
    metrics["tied_queries"] = tied_queries
    return metrics


def retrieval_metrics(similarity, image_of_caption=None, ties="expected", chunk=None):
    """Recall@1/5/10 in both directions and their mean, in percent, from an [images x captions] similarity matrix
    (from a split's embeddings without the matrix: embedding_counts, then recalls).

    image_of_caption: the image index of each caption (a list or LongTensor; any number of captions per image, in
    any order), or an int k for k captions per image in image order, or None for an equal number in image order.
    Image -> text: an image's rank is the best rank among its own captions. Text -> image: each caption ranks all
    images. R@K = 100 * fraction of queries with rank < K.
    Exactly tied scores (identical captions or images) are ordered by `ties`: "expected" averages R@K over all
    orders of the tied candidates (exact, no sampling; what the released code gives on average over arbitrary
    argsort orders), "pessimistic" puts every tied wrong candidate first (a collapsed model gets rank N - 1) and
    "optimistic" puts them last. "tied_queries" counts the queries (both directions) whose truth ties with a wrong
    candidate: only those differ between the rules. Image queries are processed `chunk` at a time.
    """
    return recalls(similarity_counts(similarity, image_of_caption, chunk), ties)


def tie_bounds(counts):
    """A line with the pessimistic and optimistic mR when exact ties touch the truth of some query, else ''."""
    low, high = (recalls(counts, rule) for rule in ("pessimistic", "optimistic"))
    if not low["tied_queries"]:
        return ""
    queries = sum(len(above) for above, _, _ in counts.values())
    return (f"exact ties touch the truth of {low['tied_queries']} of {queries} queries: mR {low['mR']:.2f} if every "
            f"tie went against the truth, {high['mR']:.2f} if every one went for it")


def split_embeddings(model, images, tokens, device, amp="off", batch_size=128, progress_seconds=10.0):
    """L2-normalised float32 embeddings of a split on `device`: (images [N, d], captions [captions, d]); images: uint8
    [N, 3, r, r], tokens: [captions, ctx] of any integer dtype. A progress line at most every `progress_seconds` (a
    large split on a CPU takes minutes)."""
    features, said_at = {}, time.time()
    with torch.no_grad(), runtime.autocast(device.type, amp):
        for kind, inputs in (("images", images), ("captions", tokens)):
            for i in range(0, len(inputs), batch_size):
                if kind == "images":
                    embeddings = model.encode_image(data.normalise(inputs[i:i + batch_size].to(device)))
                else:
                    embeddings = model.encode_text(clip_min.trim(inputs[i:i + batch_size].long()).to(device))
                if i == 0:  # filled in place: nothing else outlives a batch (a heap that keeps freed memory grows less)
                    features[kind] = torch.empty(len(inputs), embeddings.shape[1], device=device)
                features[kind][i:i + batch_size] = F.normalize(embeddings.float(), dim=-1)
                if time.time() - said_at >= progress_seconds:
                    print(f"encoded {min(i + batch_size, len(inputs))}/{len(inputs)} {kind}", flush=True)
                    said_at = time.time()
    return features["images"], features["captions"]


def similarity(model, images, tokens, device, **options):
    """The whole [images x captions] cosine similarity matrix of a small split (options: split_embeddings')."""
    image_features, caption_features = split_embeddings(model, images, tokens, device, **options)
    return image_features @ caption_features.t()


def format_metrics(m):
    """The paper's layout: image->text R@1/5/10 | text->image R@1/5/10 | mR."""
    return (f"i2t R@1/5/10 {m['i2t_R@1']:.2f}/{m['i2t_R@5']:.2f}/{m['i2t_R@10']:.2f} | "
            f"t2i R@1/5/10 {m['t2i_R@1']:.2f}/{m['t2i_R@5']:.2f}/{m['t2i_R@10']:.2f} | mR {m['mR']:.2f}")
