"""Retrieval losses: PE-RSITR's HMMC loss and two alternatives, picked by name through one entry point:

    total, terms = compute(name, image, text, image_aug=None, text_aug=None, logit_scale=None, image_ids=None,
                           margin=recipe.MARGIN, weights=(1.0, 1.0, 1.0))

name is one of LOSSES; embeddings are [B, D], any scale (every loss works on cosine similarities).
- "hmmc":    hardest-negative hinge on (image, text) + (image, image_aug) + (text, text_aug), summed over the batch.
- "vse_sum": hinge summed over all negatives, (image, text) only, summed over the batch.
- "infonce": CLIP's symmetric cross-entropy, averaged over the batch. logit_scale multiplies the cosines (CLIP's
             `logit_scale.exp()`): a float is a fixed temperature, a tensor is learned, None means 1 / 0.07.
terms: "it", "ii", "tt" -> the weighted terms that sum to total (weights: hmmc only); the others have only "it".
image_ids ([B] ints): pairs sharing an image id are not each other's negatives. None (default): only the diagonal
is positive, so two captions of one image are negatives, as in the released code.

Multi-GPU: the caller passes every embedding (and image_ids) through gather_with_grad, then calls the loss. Every
rank computes the same loss of the global batch (the single-process value); its backward sums the gradients of all
ranks, so local embeddings get world_size x their single-process gradient and DDP's average over the world_size
ranks gives exactly the single-process parameter gradient. Do not rescale the loss. (logit_scale is not gathered:
every rank already gets its full gradient, which DDP's average keeps.)
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import recipe

LOSSES = ("hmmc", "vse_sum", "infonce")


def _cosine(a, b):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must be two [B, D] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in (a, b))
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def _not_negative(n, image_ids, device):
    """[B, B] bool: True where a pair is not a negative (the diagonal, and same-image pairs when ids are given)."""
    if image_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    if image_ids.shape != (n,):
        raise ValueError(f"image_ids must have shape ({n},), got {tuple(image_ids.shape)}")
    image_ids = image_ids.to(device)
    return image_ids[:, None] == image_ids[None, :]


def _hinge_costs(a, b, margin, image_ids):
    """Hinge [m + S(a_i, b_j) - d]_+ against the row's (i2t) and the column's (t2i) positive, negatives only."""
    sim = _cosine(a, b)
    positive = sim.diag()
    not_negative = _not_negative(len(sim), image_ids, sim.device)
    rows = (margin + sim - positive[:, None]).clamp(min=0).masked_fill(not_negative, 0)
    cols = (margin + sim - positive[None, :]).clamp(min=0).masked_fill(not_negative, 0)
    return rows, cols


def hardest_negative_hinge(a, b, margin=recipe.MARGIN, image_ids=None):
    """VSE++ max-violation loss L(a, b): row i's positive is b_i, its negatives the other b_j, and vice versa.
    Used for (image, text) and for a clean view against its augmented view (rows clean, columns augmented).
    A row with no negative adds 0; ties for the hardest negative share its gradient equally (amax)."""
    rows, cols = _hinge_costs(a, b, margin, image_ids)
    return rows.amax(dim=1).sum() + cols.amax(dim=0).sum()


def hmmc(image, text, image_aug, text_aug, margin=recipe.MARGIN, weights=(1.0, 1.0, 1.0), image_ids=None):
    """Hybrid multi-modal contrastive loss: cross-modal term plus the two intra-modal clean-vs-augmented terms."""
    terms = {"it": weights[0] * hardest_negative_hinge(image, text, margin, image_ids),
             "ii": weights[1] * hardest_negative_hinge(image, image_aug, margin, image_ids),
             "tt": weights[2] * hardest_negative_hinge(text, text_aug, margin, image_ids)}
    return sum(terms.values()), terms


def vse_sum(image, text, margin=recipe.MARGIN, image_ids=None):
    """VSE0 hinge: every in-batch negative counts, not just the hardest."""
    rows, cols = _hinge_costs(image, text, margin, image_ids)
    return rows.sum() + cols.sum()


def infonce(image, text, logit_scale=None, image_ids=None):
    """CLIP's loss: mean of the image->text and text->image cross-entropies over scaled cosine similarities."""
    logits = (1 / 0.07 if logit_scale is None else logit_scale) * _cosine(image, text)
    same_image = _not_negative(len(logits), image_ids, logits.device)
    same_image.fill_diagonal_(False)  # the true pair stays the target; other captions of its image are ignored
    logits = logits.masked_fill(same_image, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def compute(name, image, text, image_aug=None, text_aug=None, logit_scale=None, image_ids=None, margin=recipe.MARGIN,
            weights=(1.0, 1.0, 1.0)):
    """The one entry point of the training loop; returns (total, terms)."""
    if name == "hmmc":
        if image_aug is None or text_aug is None:
            raise ValueError("the hmmc loss needs the augmented views image_aug and text_aug")
        return hmmc(image, text, image_aug, text_aug, margin=margin, weights=weights, image_ids=image_ids)
    if name == "vse_sum":
        loss = vse_sum(image, text, margin=margin, image_ids=image_ids)
    elif name == "infonce":
        loss = infonce(image, text, logit_scale=logit_scale, image_ids=image_ids)
    else:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
    return loss, {"it": loss}


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every rank computed the same global loss: sum their gradients (see the module docstring).
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(x):
    """Concatenate x ([B, ...], same B on every rank) across processes in rank order; identity on one process.
    Gradients flow back to the local slice. Integer tensors (image ids) are gathered without gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"gather_with_grad needs the same batch size on every rank, got {[int(s) for s in sizes]} "
                         "(use drop_last=True or a DistributedSampler)")
    return _GatherWithGrad.apply(x)
