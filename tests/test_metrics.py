"""retrieval_metrics against hand-worked cases, a brute-force loop written from the evaluation protocol, and the
released code's argsort ranking averaged over random orders of tied candidates."""
import itertools
from math import comb

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
from metrics import retrieval_metrics

KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
RULES = ("expected", "pessimistic", "optimistic")


def query_hits(own, wrong, ties):
    """P(rank < K) for K = 1, 5, 10 of one query, from the scores of its own and of its wrong candidates.

    Its rank is the number of wrong candidates placed before its first own one. Wrong candidates tied with its best
    own score go first (pessimistic), last (optimistic), or (expected) every placement of its tied own candidates
    among the tied items counts once: all orders of the tied items are equally likely.
    """
    best = max(own)
    above, tied = sum(w > best for w in wrong), sum(w == best for w in wrong)
    tied_own = sum(o == best for o in own)
    if ties == "pessimistic":
        ranks = [above + tied]
    elif ties == "optimistic":
        ranks = [above]
    else:
        ranks = [above + min(slots) for slots in itertools.combinations(range(tied + tied_own), tied_own)]
    return [sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)], tied > 0


def brute_force(similarity, captions_per_image, ties):
    """The protocol, one query at a time: each image against all captions, each caption against all images.
    captions_per_image: an int (caption j belongs to image j // it) or the image of each caption."""
    s = similarity.tolist()
    n_images, n_captions = len(s), len(s[0])
    owner = [j // captions_per_image for j in range(n_captions)] if isinstance(captions_per_image, int) \
        else list(captions_per_image)
    queries = {"i2t": [], "t2i": []}
    for i in range(n_images):
        own = [j for j in range(n_captions) if owner[j] == i]
        queries["i2t"].append(query_hits([s[i][j] for j in own], [s[i][j] for j in range(n_captions) if j not in own],
                                         ties))
    for j in range(n_captions):
        truth = owner[j]
        queries["t2i"].append(query_hits([s[truth][j]], [s[i][j] for i in range(n_images) if i != truth], ties))
    scores = {}
    for direction, results in queries.items():
        for n, k in enumerate((1, 5, 10)):
            scores[f"{direction}_R@{k}"] = 100.0 * sum(hits[n] for hits, _ in results) / len(results)
    scores["mR"] = sum(scores[key] for key in KEYS) / 6
    scores["tied_queries"] = sum(tied for results in queries.values() for _, tied in results)
    return scores


def assert_same(scores, expected):
    assert set(scores) == set(KEYS) | {"mR", "tied_queries"}
    assert scores["tied_queries"] == expected["tied_queries"]
    for key in (*KEYS, "mR"):
        assert isinstance(scores[key], float)
        assert scores[key] == pytest.approx(expected[key], abs=1e-9), key


def test_hand_worked_two_images_ten_captions():
    # Captions 0-4 belong to image 0, captions 5-9 to image 1.
    similarity = torch.tensor([
        [9., 1., 1., 1., 1., 0., 3., 0., 0., 0.],   # image 0
        [5., 5., 5., 5., 4., 4., 3., 3., 3., 3.],   # image 1
    ])
    # image -> text
    #   image 0: its best caption (0, score 9) is the top score: rank 0 -> counts for R@1, R@5, R@10.
    #   image 1: its best own caption is 5 (score 4); captions 0-3 (score 5) are higher and caption 4 (image 0's)
    #            ties at 4: rank 5 if the tie goes against it (misses R@5), 4 if for it; 4 or 5 with 1/2 each.
    # text -> image (column j: image 0 score vs image 1 score)
    #   caption 0: 9 vs 5, own image 0 is first -> rank 0.
    #   captions 1-4: 1 vs 5 or 4, image 1 is higher -> rank 1 (four captions).
    #   caption 5: 0 vs 4 -> rank 0; caption 6: 3 vs 3 tie -> rank 1 or 0; captions 7-9: 0 vs 3 -> rank 0.
    # Two queries (image 1, caption 6) have a tie at their truth.
    pessimistic = {"i2t_R@1": 50.0, "i2t_R@5": 50.0, "i2t_R@10": 100.0,   # image 1 at rank 5
                   "t2i_R@1": 50.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0,  # caption 6 at rank 1: 5 of 10 at rank 0
                   "mR": 75.0, "tied_queries": 2}
    optimistic = {"i2t_R@1": 50.0, "i2t_R@5": 100.0, "i2t_R@10": 100.0,   # image 1 at rank 4
                  "t2i_R@1": 60.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0,   # caption 6 at rank 0: 6 of 10
                  "mR": 85.0, "tied_queries": 2}
    expected = {"i2t_R@1": 50.0, "i2t_R@5": 75.0, "i2t_R@10": 100.0,     # image 1 within R@5 half of the time
                "t2i_R@1": 55.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0,     # caption 6 at rank 0 half of the time
                "mR": 80.0, "tied_queries": 2}
    for ties, values in (("pessimistic", pessimistic), ("optimistic", optimistic), ("expected", expected)):
        for chunk in (1, 1024):
            assert_same(retrieval_metrics(similarity, image_of_caption=5, ties=ties, chunk=chunk), values)
    assert retrieval_metrics(similarity) == retrieval_metrics(similarity, ties="expected")


@pytest.mark.parametrize("n_images, captions_per_image", [(1, 5), (3, 5), (12, 5), (40, 5), (1, 1), (9, 1), (60, 1)])
def test_matches_brute_force_on_random_and_tied_scores(n_images, captions_per_image):
    generator = torch.Generator().manual_seed(n_images * 10 + captions_per_image)
    shape = (n_images, n_images * captions_per_image)
    continuous = torch.randn(shape, generator=generator)
    # Few distinct integer values: many exact ties, including ties with the ground truth.
    tied = torch.randint(0, 4, shape, generator=generator).float()
    tied_int = torch.randint(-2, 3, shape, generator=generator)
    # A correlated matrix so that the recalls are not all near chance.
    truth = torch.arange(shape[1]) // captions_per_image == torch.arange(n_images)[:, None]
    informative = continuous + 2.0 * truth
    for similarity in (continuous, tied, tied_int, informative, informative.double()):
        for ties in RULES:
            expected = brute_force(similarity, captions_per_image, ties)
            assert_same(retrieval_metrics(similarity, captions_per_image, ties), expected)
            for chunk in (1, 7, n_images + 1):
                assert_same(retrieval_metrics(similarity, captions_per_image, ties, chunk=chunk), expected)


def test_chunking_and_non_contiguous_input_give_identical_results():
    torch.manual_seed(0)
    similarity = torch.randn(300, 30).t()  # 30 images x 300 captions, a non-contiguous view
    full = retrieval_metrics(similarity, image_of_caption=10, chunk=10_000)
    assert full == brute_force(similarity, 10, "expected")
    for chunk in (1, 3, 29, 30, 31, 299):
        assert retrieval_metrics(similarity, image_of_caption=10, chunk=chunk) == full


def test_without_ties_the_three_rules_agree_exactly():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(25, 125, generator=generator)
    for similarity in (scores, scores + 1.5 * (torch.arange(125) // 5 == torch.arange(25)[:, None])):
        results = [retrieval_metrics(similarity, ties=ties) for ties in RULES]
        assert results[0] == results[1] == results[2] == brute_force(similarity, 5, "pessimistic")
        assert results[0]["tied_queries"] == 0


def ucm_like(seed, n_images=40, n_classes=6, pool=4):
    """Scores with UCM's exact ties: captions drawn from a small pool per class (often word for word the caption of
    another image, so their columns are equal), some images sharing all five captions, a few duplicate images."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n_images) % n_classes
    caption_source = np.stack([c * pool + rng.integers(0, pool, 5) for c in classes])  # [images, 5] pool indices
    image_source = np.arange(n_images)
    for i in range(n_classes, n_images):
        if rng.random() < 0.3:  # the same five captions as the previous image of its class
            caption_source[i] = caption_source[i - n_classes]
        if rng.random() < 0.15:  # an identical image
            image_source[i] = image_source[i - n_classes]
    match = classes[:, None] == np.arange(n_classes * pool)[None, :] // pool
    base = rng.normal(size=(n_images, n_classes * pool)) + 1.5 * match
    base = np.round(base * 4) / 4  # a coarse grid: ties between different captions as well
    return base[image_source][:, caption_source.reshape(-1)].astype(np.float32)


def released_recalls(similarity, rng, captions_per_image=5):
    """One evaluation by the released code's rule, with the candidates relabelled at random first: each image sorts
    all captions (np.argsort, descending, stable) and takes the first position of one of its own; each caption sorts
    the images and takes the position of its image. Ties fall in the order of the random relabelling."""
    n_images, n_captions = similarity.shape
    captions = rng.permutation(n_captions)
    ranked = captions[np.argsort(-similarity[:, captions], axis=1, kind="stable")]
    image_ranks = (ranked // captions_per_image == np.arange(n_images)[:, None]).argmax(axis=1)
    images = rng.permutation(n_images)
    ranked = images[np.argsort(-similarity[images, :], axis=0, kind="stable")]
    caption_ranks = (ranked == np.arange(n_captions)[None, :] // captions_per_image).argmax(axis=0)
    return [100.0 * np.mean(ranks < k) for ranks in (image_ranks, caption_ranks) for k in (1, 5, 10)]


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_equals_the_released_code_averaged_over_tie_orders(seed):
    similarity = ucm_like(seed)
    rng = np.random.default_rng(100 + seed)
    trials = np.array([released_recalls(similarity, rng) for _ in range(2000)])
    mean, standard_error = trials.mean(axis=0), trials.std(axis=0, ddof=1) / np.sqrt(len(trials))
    scores = retrieval_metrics(torch.from_numpy(similarity))
    bounds = retrieval_metrics(torch.from_numpy(similarity), ties="pessimistic"), \
        retrieval_metrics(torch.from_numpy(similarity), ties="optimistic")
    # The construction must be tie-heavy: most queries tied, and the two bounds far apart.
    assert scores["tied_queries"] > 0.5 * sum(similarity.shape)
    assert bounds[1]["i2t_R@1"] - bounds[0]["i2t_R@1"] > 20 and bounds[1]["t2i_R@1"] - bounds[0]["t2i_R@1"] > 5
    for n, key in enumerate(KEYS):
        assert abs(scores[key] - mean[n]) <= 4 * standard_error[n] + 1e-9, (key, scores[key], mean[n])


def test_rules_are_ordered_optimistic_expected_pessimistic():
    generator = torch.Generator().manual_seed(5)
    cases = [torch.randint(0, 3, (30, 150), generator=generator).float(), torch.from_numpy(ucm_like(7)),
             torch.randint(0, 2, (12, 12), generator=generator).float()]
    for similarity in cases:
        captions_per_image = similarity.shape[1] // similarity.shape[0]
        low, mid, high = (retrieval_metrics(similarity, captions_per_image, ties) for ties in
                          ("pessimistic", "expected", "optimistic"))
        for key in (*KEYS, "mR"):
            assert low[key] <= mid[key] <= high[key], key
        assert low["mR"] < mid["mR"] < high["mR"]


@pytest.mark.parametrize("n_images", [7, 20])
def test_a_collapsed_model_scores_chance_expected_and_last_or_first_by_the_bounds(n_images):
    """All-equal scores: every order of the candidates is equally likely. A caption's image is at each of the N
    positions with probability 1/N; an image's five captions all miss the top K with probability
    C(5N - 5, K) / C(5N, K)."""
    similarity = torch.zeros(n_images, 5 * n_images)
    scores = retrieval_metrics(similarity)
    for k in (1, 5, 10):
        assert scores[f"t2i_R@{k}"] == pytest.approx(100.0 * min(k, n_images) / n_images, abs=1e-9)
        chance = 1 - comb(5 * n_images - 5, k) / comb(5 * n_images, k)
        assert scores[f"i2t_R@{k}"] == pytest.approx(100.0 * chance, abs=1e-9)
    assert scores["tied_queries"] == 6 * n_images
    # Pessimistic: every other candidate ranks first (a caption at rank N - 1, an image at 5N - 5); optimistic: rank 0.
    worst, best = retrieval_metrics(similarity, ties="pessimistic"), retrieval_metrics(similarity, ties="optimistic")
    for k in (1, 5, 10):
        assert worst[f"t2i_R@{k}"] == 100.0 * (n_images - 1 < k)
        assert worst[f"i2t_R@{k}"] == 100.0 * (5 * n_images - 5 < k)
        assert best[f"t2i_R@{k}"] == best[f"i2t_R@{k}"] == 100.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.randn(3, 14), image_of_caption=5)
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.randn(3, 3), image_of_caption=5)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.randn(15), image_of_caption=5)
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 15), image_of_caption=0)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 10), float("nan")), image_of_caption=5)
    with pytest.raises(ValueError, match="chunk"):
        retrieval_metrics(torch.randn(2, 10), image_of_caption=5, chunk=0)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(torch.randn(2, 10), image_of_caption=5, ties="random")


def test_tie_bounds_line_names_the_affected_queries_and_both_bounds():
    untied = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    assert metrics.tie_bounds(metrics.similarity_counts(untied)) == ""
    tied = ucm_like(0)
    scores = retrieval_metrics(tied)
    line = metrics.tie_bounds(metrics.similarity_counts(tied))
    low, high = (retrieval_metrics(tied, ties=rule)["mR"] for rule in ("pessimistic", "optimistic"))
    assert f"{scores['tied_queries']} of {sum(tied.shape)} queries" in line
    assert f"mR {low:.2f} if every tie went against the truth, {high:.2f} if every one went for it" in line
    assert low < scores["mR"] < high


# ---------------------------------------------------------------- any number of captions per image


def scores_from_chunk_counts(counts, ties):
    """The oracles' last step: {direction: [(above, tied, truths) per chunk]} -> the metrics."""
    scores, tied_queries = {}, 0
    for direction, chunks in counts.items():
        above, tied, truths = (torch.cat(c) for c in zip(*chunks))
        tied_queries += (tied > 0).sum().item()
        for k in (1, 5, 10):
            hits = metrics.hit_probability(above, tied, truths, k, ties).sum().item()
            scores[f"{direction}_R@{k}"] = 100.0 * hits / len(above)
    scores["mR"] = sum(scores.values()) / 6
    scores["tied_queries"] = tied_queries
    return scores


def todays_retrieval_metrics(similarity, captions_per_image=5, ties="expected", chunk=1024):
    """The implementation before image_of_caption (caption j of image j // captions_per_image), kept verbatim as the
    oracle: for five captions per image in order, the numbers must not move by one bit."""
    n_images, n_captions = similarity.shape
    counts = {"i2t": [], "t2i": []}
    for start in range(0, n_images, chunk):
        rows = similarity[start:start + chunk]
        images = torch.arange(start, start + len(rows), device=similarity.device)
        own_captions = images[:, None] * captions_per_image + torch.arange(captions_per_image, device=images.device)
        own_scores = rows.gather(1, own_captions)
        best_own = own_scores.max(dim=1, keepdim=True).values
        truths = (own_scores == best_own).sum(dim=1)
        counts["i2t"].append(((rows > best_own).sum(dim=1), (rows == best_own).sum(dim=1) - truths, truths))
    for start in range(0, n_captions, chunk):
        columns = similarity[:, start:start + chunk]
        captions = torch.arange(start, start + columns.shape[1], device=similarity.device)
        truth_score = columns[captions // captions_per_image, captions - start][None, :]
        tied = (columns == truth_score).sum(dim=0) - 1
        counts["t2i"].append(((columns > truth_score).sum(dim=0), tied, torch.ones_like(tied)))
    return scores_from_chunk_counts(counts, ties)


def mixed_owners(n_images, low, high, seed, shuffle=True):
    """The image of each caption: low..high captions per image (mixed counts), in a shuffled caption order."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(low, high + 1, (n_images,), generator=generator)
    owners = torch.repeat_interleave(torch.arange(n_images), counts)
    return owners[torch.randperm(len(owners), generator=generator)] if shuffle else owners


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_five_per_image_equals_todays_implementation_exactly(seed):
    generator = torch.Generator().manual_seed(seed)
    n_images = 37
    truth = torch.arange(5 * n_images) // 5 == torch.arange(n_images)[:, None]
    cases = [torch.randn(n_images, 5 * n_images, generator=generator) + 1.5 * truth,
             torch.randint(0, 3, (n_images, 5 * n_images), generator=generator).float(), torch.from_numpy(ucm_like(seed))]
    for similarity in cases:
        owners = (torch.arange(similarity.shape[1]) // 5).tolist()  # a list, as Split.image_of_caption holds it
        for ties in RULES:
            for chunk in (1, 8, 1024):
                today = todays_retrieval_metrics(similarity, 5, ties, chunk)
                assert retrieval_metrics(similarity, owners, ties, chunk) == today
                assert retrieval_metrics(similarity, 5, ties, chunk) == today
                assert retrieval_metrics(similarity, ties=ties, chunk=chunk) == today


@pytest.mark.parametrize("low, high", [(1, 7), (1, 1), (3, 3), (2, 6)])
def test_mixed_caption_counts_match_clip_benchmark_recall_at_k(low, high):
    """CLIP_benchmark's recall_at_k (open_clip's retrieval benchmark) on random scores without ties: an image query
    hits when one of its captions is in the top K, a caption query when its image is."""
    n_images = 40
    owners = mixed_owners(n_images, low, high, seed=low * 10 + high)
    similarity = torch.randn(n_images, len(owners), generator=torch.Generator().manual_seed(high))
    positive = torch.zeros(len(owners), n_images, dtype=torch.bool)  # [texts x images], as recall_at_k takes it
    positive[torch.arange(len(owners)), owners] = True
    ours = retrieval_metrics(similarity, owners, chunk=7)
    assert ours["tied_queries"] == 0
    for k in (1, 5, 10):
        t2i = (recall_at_k(similarity.t(), positive, k) > 0).float().mean().item()
        i2t = (recall_at_k(similarity, positive.t(), k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(100 * t2i, abs=1e-4)
        assert ours[f"i2t_R@{k}"] == pytest.approx(100 * i2t, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_caption_counts_with_ties_match_brute_force(seed):
    """The tie rules' closed forms hold for any number of captions per image (and captions in any order)."""
    owners = mixed_owners(15, 1, 7, seed)
    generator = torch.Generator().manual_seed(seed)
    for similarity in (torch.randint(0, 3, (15, len(owners)), generator=generator).float(),
                       torch.randn(15, len(owners), generator=generator)):
        for ties in RULES:
            expected = brute_force(similarity, owners.tolist(), ties)
            for chunk in (1, 4, 100):
                assert_same(retrieval_metrics(similarity, owners, ties, chunk=chunk), expected)


def test_caption_order_does_not_matter():
    owners = mixed_owners(20, 1, 6, seed=3, shuffle=False)
    similarity = torch.randint(0, 4, (20, len(owners)), generator=torch.Generator().manual_seed(3)).float()
    permutation = torch.randperm(len(owners), generator=torch.Generator().manual_seed(4))
    # Equal up to the order of the float sums over queries.
    assert_same(retrieval_metrics(similarity[:, permutation], owners[permutation]), retrieval_metrics(similarity, owners))


def test_bad_image_of_caption_raises():
    with pytest.raises(ValueError, match="names the image of 4 captions"):
        retrieval_metrics(torch.randn(2, 5), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="outside 0..1"):
        retrieval_metrics(torch.randn(2, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        retrieval_metrics(torch.randn(3, 3), [0, 0, 2])


# ---------------------------------------------------------------- blocks of queries, from the embeddings


def whole_matrix_retrieval_metrics(similarity, owners, ties):
    """The whole-matrix implementation that embedding_counts replaced, kept verbatim as the oracle: image queries
    by rows and caption queries by columns of the one [images x captions] matrix."""
    chunk, counts = 1024, {"i2t": [], "t2i": []}
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
    return scores_from_chunk_counts(counts, ties)


def planted_embeddings(seed, n_images=83, dim=32, grid=False):
    """(image embeddings, caption embeddings, image of each caption) with exact ties planted: 1 to 6 captions per
    image in a shuffled order, each caption near its image; the last image a copy of image 5 (the two are in
    different blocks), a caption of image 10 copied onto one of image 11, and one image with two equal captions.
    grid: components on a quarter grid, so that every product is exact in float32 in any order of its sums."""
    generator = torch.Generator().manual_seed(seed)
    owners = mixed_owners(n_images, 1, 6, seed)
    images = torch.randn(n_images, dim, generator=generator)
    captions = images[owners] + torch.randn(len(owners), dim, generator=generator)
    if grid:
        images, captions = (torch.round(x.clamp(-2, 2) * 4) / 4 for x in (images, captions))
    else:
        images, captions = F.normalize(images, dim=-1), F.normalize(captions, dim=-1)
    images[-1] = images[5]
    of = {i: (owners == i).nonzero().squeeze(1) for i in (10, 11)}
    captions[of[11][0]] = captions[of[10][0]]
    pair = next((owners == i).nonzero().squeeze(1)[:2] for i in range(n_images) if (owners == i).sum() > 1)
    captions[pair[1]] = captions[pair[0]]
    return images, captions, owners


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_embeddings_equal_the_whole_matrix_exactly(seed):
    """embedding_counts, which never holds the similarity matrix, gives the whole-matrix implementation's recalls
    bit for bit, on the product of the same embeddings, under every tie rule. Continuous embeddings: blocks of 16
    rows or more (a BLAS library takes other kernels for a few rows, which round differently; the blocks are as tall
    as each other, so they hold the whole product's rows); embeddings on a grid: any block."""
    for grid, chunks in ((False, (16, 25, 64, None)), (True, (1, 2, 7, 16, None))):
        image_features, caption_features, owners = planted_embeddings(seed, grid=grid)
        similarity = image_features @ caption_features.t()
        for ties in RULES:
            whole = whole_matrix_retrieval_metrics(similarity, owners, ties)
            for chunk in chunks:
                counts = metrics.embedding_counts(image_features, caption_features, owners, chunk)
                assert metrics.recalls(counts, ties) == whole, (grid, ties, chunk)
        assert whole["tied_queries"] >= 4 and whole["i2t_R@1"] > 10 and whole["t2i_R@1"] > 10


def test_blocks_are_equally_tall_and_cover_each_query_once():
    asked = []

    def rows_of(first, stop):
        asked.append((first, stop))
        return torch.arange(first, min(stop, 23))

    blocks = list(metrics.row_blocks(rows_of, 23, 5))
    assert torch.equal(torch.cat([rows for _, rows in blocks]), torch.arange(23))
    assert [start for start, _ in blocks] == [0, 5, 10, 15, 20] and all(stop - first == 5 for first, stop in asked)
    assert asked[-1] == (18, 23)
