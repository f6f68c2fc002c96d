"""retrieval_metrics against a hand-worked case and a brute-force loop written from the evaluation protocol."""
import pytest
import torch

from evaluate import retrieval_metrics

KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


def brute_force(similarity, captions_per_image):
    """The protocol, one query at a time. A rank is the number of wrong candidates scoring at least as high."""
    s = similarity.tolist()
    n_images, n_captions = len(s), len(s[0])
    image_ranks = []
    for i in range(n_images):
        own = range(i * captions_per_image, (i + 1) * captions_per_image)
        # An image's rank is the best (smallest) rank among its ground-truth captions.
        image_ranks.append(min(sum(1 for k in range(n_captions) if k not in own and s[i][k] >= s[i][j]) for j in own))
    caption_ranks = []
    for j in range(n_captions):
        truth = j // captions_per_image
        caption_ranks.append(sum(1 for i in range(n_images) if i != truth and s[i][j] >= s[truth][j]))
    metrics = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", caption_ranks)):
        for k in (1, 5, 10):
            metrics[f"{direction}_R@{k}"] = 100.0 * sum(1 for r in ranks if r < k) / len(ranks)
    metrics["mR"] = sum(metrics[key] for key in KEYS) / 6
    return metrics


def assert_same(metrics, expected):
    assert set(metrics) == set(KEYS) | {"mR"}
    for key, value in expected.items():
        assert isinstance(metrics[key], float)
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_hand_worked_two_images_ten_captions():
    # Captions 0-4 belong to image 0, captions 5-9 to image 1.
    similarity = torch.tensor([
        [9., 1., 1., 1., 1., 0., 3., 0., 0., 0.],   # image 0
        [5., 5., 5., 5., 4., 4., 3., 3., 3., 3.],   # image 1
    ])
    # image -> text
    #   image 0: its best caption (0, score 9) is the top score: rank 0 -> counts for R@1, R@5, R@10.
    #   image 1: its best own caption is 5 (score 4); captions 0-3 (score 5) are higher and caption 4 (image 0's)
    #            ties at 4, and ties count against: rank 5 -> misses R@1 and R@5, counts for R@10.
    #   i2t: R@1 = 1/2 = 50, R@5 = 50, R@10 = 100.
    # text -> image (column j: image 0 score vs image 1 score)
    #   caption 0: 9 vs 5, own image 0 is first -> rank 0.
    #   captions 1-4: 1 vs 5 or 4, image 1 is higher -> rank 1 (four captions).
    #   caption 5: 0 vs 4 -> rank 0; caption 6: 3 vs 3 tie -> rank 1; captions 7-9: 0 vs 3 -> rank 0.
    #   t2i: R@1 = 5/10 = 50, R@5 = R@10 = 100 (every rank is 0 or 1).
    # mR = (50 + 50 + 100 + 50 + 100 + 100) / 6 = 75.
    expected = {"i2t_R@1": 50.0, "i2t_R@5": 50.0, "i2t_R@10": 100.0,
                "t2i_R@1": 50.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0, "mR": 75.0}
    assert_same(retrieval_metrics(similarity, captions_per_image=5), expected)
    assert_same(retrieval_metrics(similarity, captions_per_image=5, chunk=1), expected)


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
        expected = brute_force(similarity, captions_per_image)
        assert_same(retrieval_metrics(similarity, captions_per_image), expected)
        for chunk in (1, 2, 7, n_images + 1):
            assert_same(retrieval_metrics(similarity, captions_per_image, chunk=chunk), expected)


def test_chunking_and_non_contiguous_input_give_identical_results():
    torch.manual_seed(0)
    similarity = torch.randn(300, 30).t()  # 30 images x 300 captions, a non-contiguous view
    full = retrieval_metrics(similarity, captions_per_image=10, chunk=10_000)
    assert full == brute_force(similarity, 10)
    for chunk in (1, 3, 29, 30, 31, 299):
        assert retrieval_metrics(similarity, captions_per_image=10, chunk=chunk) == full


def test_a_collapsed_model_scores_no_better_than_last():
    """All-equal scores must not look like perfect retrieval: every truth ties with every wrong candidate."""
    metrics = retrieval_metrics(torch.zeros(20, 100), captions_per_image=5)
    assert all(metrics[key] == 0.0 for key in KEYS)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.randn(3, 14), captions_per_image=5)
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(torch.randn(3, 3), captions_per_image=5)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.randn(15), captions_per_image=5)
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(3, 15), captions_per_image=0)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 10), float("nan")), captions_per_image=5)
    with pytest.raises(ValueError, match="chunk"):
        retrieval_metrics(torch.randn(2, 10), captions_per_image=5, chunk=0)
