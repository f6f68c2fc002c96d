"""The recall protocol of image-text retrieval: cosine similarities of a split, R@1/5/10 in both directions and mR as
the field's code computes them, with exactly tied scores counted exactly.

    similarity = metrics.similarity(model, images, tokens, device)      # [images x captions]
    print(metrics.format_metrics(metrics.retrieval_metrics(similarity, split.image_of_caption)))
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


def retrieval_metrics(similarity, image_of_caption=None, ties="expected", chunk=1024):
    """Recall@1/5/10 in both directions and their mean, in percent, from an [images x captions] similarity matrix.

    image_of_caption: the image index of each caption (a list or LongTensor; any number of captions per image, in
    any order), or an int k for k captions per image in image order, or None for an equal number in image order.
    Image -> text: an image's rank is the best rank among its own captions. Text -> image: each caption ranks all
    images. R@K = 100 * fraction of queries with rank < K.
    Exactly tied scores (identical captions or images) are ordered by `ties`: "expected" averages R@K over all
    orders of the tied candidates (exact, no sampling; what the released code gives on average over arbitrary
    argsort orders), "pessimistic" puts every tied wrong candidate first (a collapsed model gets rank N - 1) and
    "optimistic" puts them last. "tied_queries" counts the queries (both directions) whose truth ties with a wrong
    candidate: only those differ between the rules. Queries are processed `chunk` at a time (memory O(chunk x N)).
    """
    similarity = torch.as_tensor(similarity)
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be a 2-D [images x captions] matrix, got shape {tuple(similarity.shape)}")
    owners = caption_owners(image_of_caption, *similarity.shape, device=similarity.device)
    if torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if ties not in ("expected", "pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'expected', 'pessimistic' or 'optimistic', got {ties!r}")

    counts = {"i2t": [], "t2i": []}  # per chunk: (above, tied, truths) of each query
    for start in range(0, similarity.shape[0], chunk):
        rows = similarity[start:start + chunk]
        own = owners[None, :] == torch.arange(start, start + len(rows), device=similarity.device)[:, None]
        lowest = -torch.inf if rows.is_floating_point() else torch.iinfo(rows.dtype).min
        best_own = torch.where(own, rows, lowest).amax(dim=1, keepdim=True)  # a mask: any number per image
        at_best = rows == best_own
        truths = (at_best & own).sum(dim=1)
        counts["i2t"].append(((rows > best_own).sum(dim=1), at_best.sum(dim=1) - truths, truths))
    for start in range(0, similarity.shape[1], chunk):
        columns = similarity[:, start:start + chunk]
        captions = torch.arange(start, start + columns.shape[1], device=similarity.device)
        truth_score = columns[owners[captions], captions - start][None, :]
        tied = (columns == truth_score).sum(dim=0) - 1  # the truth itself is not a tied wrong candidate
        counts["t2i"].append(((columns > truth_score).sum(dim=0), tied, torch.ones_like(tied)))

    metrics, tied_queries = {}, 0
    for direction, chunks in counts.items():
        above, tied, truths = (torch.cat(c) for c in zip(*chunks))
        tied_queries += (tied > 0).sum().item()
        for k in (1, 5, 10):
            hits = hit_probability(above, tied, truths, k, ties).sum().item()
            metrics[f"{direction}_R@{k}"] = 100.0 * hits / len(above)
    metrics["mR"] = sum(metrics.values()) / 6
    metrics["tied_queries"] = tied_queries
    return metrics


def tie_bounds(similarity, metrics, image_of_caption=None):
    """A line with the pessimistic and optimistic mR when exact ties touch the truth of some query, else ''."""
    if not metrics["tied_queries"]:
        return ""
    low, high = (retrieval_metrics(similarity, image_of_caption, ties=rule)["mR"]
                 for rule in ("pessimistic", "optimistic"))
    return (f"exact ties touch the truth of {metrics['tied_queries']} of {sum(similarity.shape)} queries: mR "
            f"{low:.2f} if every tie went against the truth, {high:.2f} if every one went for it")


def similarity(model, images, tokens, device, amp="off", batch_size=128, progress_seconds=10.0):
    """Cosine similarities [images x captions] of a split; images: uint8 [N, 3, r, r], tokens: [captions, ctx].
    A progress line at most every `progress_seconds` (a large split on a CPU takes minutes)."""
    features, said_at = {"images": [], "captions": []}, time.time()
    with torch.no_grad(), runtime.autocast(device.type, amp):
        for kind, inputs in (("images", images), ("captions", tokens)):
            for i in range(0, len(inputs), batch_size):
                if kind == "images":
                    embeddings = model.encode_image(data.normalise(inputs[i:i + batch_size].to(device)))
                else:
                    embeddings = model.encode_text(clip_min.trim(inputs[i:i + batch_size]).to(device))
                features[kind].append(F.normalize(embeddings.float(), dim=-1))
                if time.time() - said_at >= progress_seconds:
                    print(f"encoded {min(i + batch_size, len(inputs))}/{len(inputs)} {kind}", flush=True)
                    said_at = time.time()
    return torch.cat(features["images"]) @ torch.cat(features["captions"]).t()


def format_metrics(m):
    """The paper's layout: image->text R@1/5/10 | text->image R@1/5/10 | mR."""
    return (f"i2t R@1/5/10 {m['i2t_R@1']:.2f}/{m['i2t_R@5']:.2f}/{m['i2t_R@10']:.2f} | "
            f"t2i R@1/5/10 {m['t2i_R@1']:.2f}/{m['t2i_R@5']:.2f}/{m['t2i_R@10']:.2f} | mR {m['mR']:.2f}")
