"""Losses against naive double loops written from the formulas, and multi-process gathering against one process."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import losses


# ---------------------------------------------------------------- naive references, one pair at a time

def naive_cosines(a, b):
    return [[(a[i] * b[j]).sum() / (a[i].norm() * b[j].norm()) for j in range(len(b))] for i in range(len(a))]


def is_negative(i, j, image_ids):
    return i != j and (image_ids is None or int(image_ids[i]) != int(image_ids[j]))


def naive_hinge(a, b, margin, image_ids, hardest):
    """L(a, b) = sum_i max_{j != i} [m + S_ij - S_ii]_+ + sum_j max_{i != j} [m + S_ij - S_jj]_+ (or sums)."""
    s, n = naive_cosines(a, b), len(a)
    total = a.sum() * 0
    for i in range(n):  # a_i against the b's
        violations = [(margin + s[i][j] - s[i][i]).clamp(min=0) for j in range(n) if is_negative(i, j, image_ids)]
        if violations:
            total = total + (torch.stack(violations).max() if hardest else sum(violations))
    for j in range(n):  # b_j against the a's
        violations = [(margin + s[i][j] - s[j][j]).clamp(min=0) for i in range(n) if is_negative(i, j, image_ids)]
        if violations:
            total = total + (torch.stack(violations).max() if hardest else sum(violations))
    return total


def naive_infonce(image, text, scale, image_ids):
    s, n = naive_cosines(image, text), len(image)
    total = image.sum() * 0
    for i in range(n):
        # image i -> texts, then text i -> images; same-image candidates other than the pair itself are left out.
        for scores in ([s[i][j] for j in range(n) if j == i or is_negative(i, j, image_ids)],
                       [s[j][i] for j in range(n) if j == i or is_negative(i, j, image_ids)]):
            total = total - scale * s[i][i] + torch.log(sum(torch.exp(scale * x) for x in scores))
    return total / (2 * n)


# ---------------------------------------------------------------- helpers

def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(loss, inputs):
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def assert_loss_and_grads_equal(loss, reference, inputs):
    torch.testing.assert_close(loss, reference.to(loss.dtype))
    for got, want in zip(grads_of(loss, inputs), grads_of(reference, inputs)):
        torch.testing.assert_close(got, want)


def grid_embeddings(n, dim, generator, duplicates):
    """Vectors with four entries +-1, so every cosine is an exact multiple of 1/4: ties are exact, not rounded."""
    out = torch.zeros(n, dim, dtype=torch.float64)
    for row in out:
        signs = torch.randint(0, 2, (4,), generator=generator).double() * 2 - 1
        row[torch.randperm(dim, generator=generator)[:4]] = signs
    for src, dst in duplicates:
        out[dst] = out[src]
    return out


def has_tied_hardest_negative(a, b, margin):
    sim = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()
    hinge = (margin + sim - sim.diag()[:, None]).clamp(min=0).fill_diagonal_(0)
    top = hinge.amax(dim=1, keepdim=True)
    return bool(((hinge == top) & (top > 0)).sum(dim=1).gt(1).any())


CASES = [  # (batch size, image ids or None, embeddings with exact ties?)
    (1, None, False), (2, None, False), (2, [4, 4], False), (7, None, False), (7, [0, 0, 1, 2, 2, 2, 3], False),
    (7, [5] * 7, False), (8, None, True), (8, [0, 0, 1, 1, 2, 3, 3, 3], True),
]


def make_case(batch, ids, tied, seed):
    generator = torch.Generator().manual_seed(seed)
    if tied:  # on the exact grid, with repeated rows: pair 0 = pair 1, image 2 = image 5, text 3 = text 6, ...
        duplicates = [[(0, 1), (2, 5)], [(0, 1), (3, 6)], [(2, 4)], [(3, 7)]]
        views = [grid_embeddings(batch, 8, generator, d) for d in duplicates]
    else:
        views = [torch.randn(batch, 6, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    return leaves(*views), None if ids is None else torch.tensor(ids)


# ---------------------------------------------------------------- single process

@pytest.mark.parametrize("batch, ids, tied", CASES)
@pytest.mark.parametrize("margin", [0.2, 0.7])
def test_hmmc_matches_naive(batch, ids, tied, margin):
    views, image_ids = make_case(batch, ids, tied, seed=batch + len(ids or ()) + int(10 * margin))
    image, text, image_aug, text_aug = views
    if tied:  # the tie cases must really contain ties for the hardest negative
        assert has_tied_hardest_negative(image, text, margin) or has_tied_hardest_negative(text, image, margin)
    weights = (1.0, 0.5, 2.0)
    total, terms = losses.hmmc(image, text, image_aug, text_aug, margin=margin, weights=weights, image_ids=image_ids)
    naive = {"it": naive_hinge(image, text, margin, image_ids, hardest=True),
             "ii": naive_hinge(image, image_aug, margin, image_ids, hardest=True),
             "tt": naive_hinge(text, text_aug, margin, image_ids, hardest=True)}
    assert set(terms) == {"it", "ii", "tt"}
    for key, weight in zip(("it", "ii", "tt"), weights):
        assert_loss_and_grads_equal(terms[key], weight * naive[key], views)
    assert_loss_and_grads_equal(total, sum(w * naive[k] for k, w in zip(("it", "ii", "tt"), weights)), views)
    if batch > 1 and ids is None:
        assert total > 0


@pytest.mark.parametrize("batch, ids, tied", CASES)
def test_vse_sum_and_infonce_match_naive(batch, ids, tied):
    views, image_ids = make_case(batch, ids, tied, seed=100 + batch)
    image, text = views[:2]
    total, terms = losses.compute("vse_sum", image, text, image_ids=image_ids, margin=0.3)
    assert terms.keys() == {"it"}
    assert_loss_and_grads_equal(total, naive_hinge(image, text, 0.3, image_ids, hardest=False), [image, text])
    # Fixed temperature: the default 1 / 0.07, and a float.
    total, _ = losses.compute("infonce", image, text, image_ids=image_ids)
    assert_loss_and_grads_equal(total, naive_infonce(image, text, 1 / 0.07, image_ids), [image, text])
    total, _ = losses.compute("infonce", image, text, logit_scale=3.0, image_ids=image_ids)
    assert_loss_and_grads_equal(total, naive_infonce(image, text, 3.0, image_ids), [image, text])
    # Learnable: a log-scale parameter, exponentiated by the caller as CLIP does; its gradient must agree too.
    log_scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    total, _ = losses.compute("infonce", image, text, logit_scale=log_scale.exp(), image_ids=image_ids)
    reference = naive_infonce(image, text, log_scale.exp(), image_ids)
    assert_loss_and_grads_equal(total, reference, [image, text, log_scale])


def test_compute_dispatch_and_errors():
    views, _ = make_case(5, None, False, seed=3)
    total, terms = losses.compute("hmmc", *views)
    reference, reference_terms = losses.hmmc(*views)
    torch.testing.assert_close(total, reference)
    assert terms.keys() == reference_terms.keys()
    assert set(losses.LOSSES) == {"hmmc", "vse_sum", "infonce"}
    with pytest.raises(ValueError, match="unknown loss"):
        losses.compute("triplet", *views)
    with pytest.raises(ValueError, match="augmented"):
        losses.compute("hmmc", views[0], views[1])
    with pytest.raises(ValueError, match="shape"):
        losses.compute("vse_sum", views[0], views[1][:4])
    with pytest.raises(ValueError, match="shape"):
        losses.compute("infonce", views[0], views[1][:, :3])
    with pytest.raises(ValueError, match="image_ids"):
        losses.compute("hmmc", *views, image_ids=torch.arange(4))


def test_half_precision_inputs_are_computed_in_float32():
    views, _ = make_case(6, None, False, seed=4)
    half = [v.detach().half() for v in views]
    for name in losses.LOSSES:
        total, _ = losses.compute(name, *half)
        reference, _ = losses.compute(name, *[h.double() for h in half])
        assert total.dtype == torch.float32
        torch.testing.assert_close(total.double(), reference, rtol=1e-5, atol=1e-5)


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4)
    assert losses.gather_with_grad(x) is x


# ---------------------------------------------------------------- two processes (gloo on CPU)

WORLD, LOCAL_BATCH = 2, 3


class TinyEncoder(torch.nn.Module):
    """A projection, plus CLIP's learnable log logit scale when the loss uses one (DDP wants no unused parameter)."""

    def __init__(self, learn_scale):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5, dtype=torch.float64)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64)) if learn_scale else None

    def forward(self, x):
        return self.proj(x), None if self.log_scale is None else self.log_scale.exp()


def run_loss(model, inputs, name, image_ids, gather):
    """Encode the four views in one forward pass, optionally gather them, and return (loss, terms, embeddings)."""
    n = inputs.shape[1]
    embeddings, scale = model(inputs.reshape(4 * n, -1))
    embeddings.retain_grad()
    views = list(embeddings.view(4, n, -1))
    if gather:
        views = [losses.gather_with_grad(v) for v in views]
        image_ids = None if image_ids is None else losses.gather_with_grad(image_ids)
    total, terms = losses.compute(name, *views, logit_scale=scale, image_ids=image_ids)
    return total, terms, embeddings


def distributed_worker(rank, store):
    # torch._dynamo must be imported before the process group exists: DDP's constructor imports it otherwise, and
    # imported while a group lives it keeps gloo threads running after destroy_process_group, one of which can
    # still be finishing the last all_gather at interpreter exit and abort the worker (SIGABRT, "terminate called
    # without an active exception"). train.py gets it early through torchvision.
    import torch._dynamo  # noqa: F401
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # identical data and weights on every rank
        inputs = torch.randn(4, WORLD * LOCAL_BATCH, 6, dtype=torch.float64)
        all_ids = torch.tensor([0, 1, 1, 1, 2, 2])  # image 1's captions straddle the two ranks
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for name in losses.LOSSES:
            encoder = TinyEncoder(learn_scale=name == "infonce")
            for ids in (None, all_ids):
                # Single process on the concatenated batch.
                single = copy.deepcopy(encoder)
                ref_total, ref_terms, ref_embeddings = run_loss(single, inputs, name, ids, gather=False)
                ref_total.backward()
                # Each rank holds a slice; DDP averages the parameter gradients.
                model = DistributedDataParallel(copy.deepcopy(encoder))
                total, terms, embeddings = run_loss(model, inputs[:, mine], name,
                                                    None if ids is None else ids[mine], gather=True)
                total.backward()
                # Convention: the loss on every rank is the single-process loss of the global batch, ...
                torch.testing.assert_close(total, ref_total)
                for key in ref_terms:
                    torch.testing.assert_close(terms[key], ref_terms[key])
                # ... local embeddings receive world_size x their single-process gradient, ...
                ref_local_grad = ref_embeddings.grad.view(4, WORLD * LOCAL_BATCH, -1)[:, mine]
                torch.testing.assert_close(embeddings.grad.view(4, LOCAL_BATCH, -1), WORLD * ref_local_grad)
                # ... so that DDP's average gives exactly the single-process parameter gradients.
                for (pname, p), q in zip(model.module.named_parameters(), single.parameters()):
                    torch.testing.assert_close(p.grad, q.grad, msg=f"{name} {pname}")
        gathered = losses.gather_with_grad(torch.arange(3) + 10 * rank)
        assert gathered.tolist() == [0, 1, 2, 10, 11, 12]
        with pytest.raises(ValueError, match="same batch size"):
            losses.gather_with_grad(torch.randn(3 - rank, 5))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_and_ddp_gradients_equal_single_process(tmp_path):
    # A file store, not a TCP port: a port found free can be taken by another program before the workers bind it.
    mp.spawn(distributed_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
