"""Dense pairwise losses with hand-written backward passes, for the terms that need the
gradient of every anchor–item pair: the triplet hinge over ``all`` negatives and InfoNCE.

Their cost is set by the ``A x P`` matrices they touch. Autograd over the same expressions
keeps half a dozen fresh ``A x P`` temporaries alive (each one a fresh allocation that the OS
must page in) and recomputes ``exp`` in backward. These functions compute the score matrix
themselves, mask it in place, keep what backward needs (the hinge's active set or the softmax
probabilities) and turn it into the score gradient in place; the two backward matmuls are the
only other ``A x P``-sized work. Layouts (``pool_dims``) as in
`vcl_dist.losses.pool.score_matrices`: 1 = anchors along rows, 0 = along columns of the
same matrix (the second direction when anchors and pool are the same batch).
"""

from __future__ import annotations

import torch

from .distances import squared_distances, squared_distances_normalized
from .negatives import INF, count_true


def _squared_distances(anchors: torch.Tensor, items: torch.Tensor, normalized: bool) -> torch.Tensor:
    return squared_distances_normalized(anchors, items) if normalized else squared_distances(anchors, items)


def _distance_backward(grad: torch.Tensor, anchors, items, normalized: bool):
    """Gradients of ``anchors`` and ``items`` from the gradient of their squared distances."""
    grad_anchors = grad @ items
    grad_items = grad.T @ anchors
    grad_anchors.mul_(-2.0)
    grad_items.mul_(-2.0)
    if not normalized:
        grad_anchors.addcmul_(anchors, grad.sum(1, keepdim=True), value=2.0)
        grad_items.addcmul_(items, grad.sum(0).unsqueeze(1), value=2.0)
    return grad_anchors, grad_items


def _once(ctx) -> None:
    # Backward turns saved tensors into the gradient in place: a second pass would be wrong.
    if getattr(ctx, "used", False):
        raise RuntimeError("this loss supports a single backward pass (no retain_graph reuse)")
    ctx.used = True


class _MeanHingeAllNegatives(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, items, invalid, positive, pool_dims, margin, normalized):
        distances = _squared_distances(anchors.detach(), items.detach(), normalized)
        d_ap = [distances.gather(dim, positive.unsqueeze(dim)) for dim in pool_dims]
        distances.masked_fill_(invalid, INF)  # never-negatives: hinge 0, no mask afterwards
        outputs, saved = [], []
        for index, (dim, d_positive) in enumerate(zip(pool_dims, d_ap)):
            last = index == len(pool_dims) - 1
            # The last layout may overwrite the distances: nothing reads them afterwards.
            hinges = distances.sub_(d_positive + margin).neg_() if last else (d_positive + margin) - distances
            hinges.relu_()
            counts = (invalid.shape[dim] - count_true(invalid, dim)).clamp_min_(1).to(hinges.dtype)
            outputs.append(hinges.sum(dim=dim) / counts)
            active = hinges.sign_()
            saved += [active, counts, active.sum(dim=dim)]
        ctx.pool_dims, ctx.normalized = pool_dims, normalized
        ctx.save_for_backward(anchors, items, positive, *saved)
        return torch.stack(outputs)

    @staticmethod
    def backward(ctx, grad):
        _once(ctx)
        anchors, items, positive, *saved = ctx.saved_tensors
        grad_distances = None
        for index, dim in enumerate(ctx.pool_dims):
            active, counts, active_counts = saved[3 * index : 3 * index + 3]
            coefficient = grad[index] / counts
            # d hinge / d d_an = −active; d hinge / d d_ap = +active, summed over negatives.
            term = active.mul_(-coefficient.unsqueeze(dim))
            grad_distances = term if grad_distances is None else grad_distances.add_(term)
            grad_distances.scatter_add_(dim, positive.unsqueeze(dim), (coefficient * active_counts).unsqueeze(dim))
        grad_anchors, grad_items = _distance_backward(grad_distances, anchors, items, ctx.normalized)
        return grad_anchors, grad_items, None, None, None, None, None


def mean_hinge_all_negatives(anchors, items, invalid, positive, pool_dims=(1,), margin=0.2, normalized=True) -> torch.Tensor:
    """``[len(pool_dims), A]``: each anchor's triplet hinge ``max(d_ap − d_an + margin, 0)``
    averaged over its valid negatives (``invalid`` marks never-negatives; anchors without any
    negative get 0), from ``anchors [A, D]`` and ``items [P, D]``."""
    return _MeanHingeAllNegatives.apply(anchors, items, invalid, positive, tuple(pool_dims), margin, normalized)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, items, scale, excluded, positive, pool_dims):
        logits = (anchors.detach() * scale.detach()) @ items.detach().T
        positive_logits = [logits.gather(dim, positive.unsqueeze(dim)).squeeze(dim) for dim in pool_dims]
        logits.masked_fill_(excluded, -INF)
        outputs, probabilities = [], []
        for index, (dim, own) in enumerate(zip(pool_dims, positive_logits)):
            # The positive is never excluded, so every max is finite.
            peak = logits.amax(dim=dim, keepdim=True)
            last = index == len(pool_dims) - 1
            weights = logits.sub_(peak).exp_() if last else (logits - peak).exp_()
            total = weights.sum(dim=dim, keepdim=True)
            outputs.append((peak + total.log()).squeeze(dim) - own)
            probabilities.append(weights.div_(total))
        ctx.pool_dims = pool_dims
        ctx.save_for_backward(anchors, items, scale, positive, *probabilities)
        return torch.stack(outputs)

    @staticmethod
    def backward(ctx, grad):
        _once(ctx)
        anchors, items, scale, positive, *probabilities = ctx.saved_tensors
        grad_logits = None
        for index, (dim, probs) in enumerate(zip(ctx.pool_dims, probabilities)):
            term = probs.mul_(grad[index].unsqueeze(dim))
            grad_logits = term if grad_logits is None else grad_logits.add_(term)
            grad_logits.scatter_add_(dim, positive.unsqueeze(dim), -grad[index].unsqueeze(dim))
        # logits = s · anchors @ itemsᵀ
        grad_anchors_unscaled = grad_logits @ items
        grad_items = (grad_logits.T @ anchors).mul_(scale)
        grad_scale = (grad_anchors_unscaled * anchors).sum()
        return grad_anchors_unscaled.mul_(scale), grad_items, grad_scale, None, None, None


def infonce_terms(anchors, items, scale, excluded, positive, pool_dims=(1,)) -> torch.Tensor:
    """``[len(pool_dims), A]``: each anchor's ``−log softmax(s · anchors @ itemsᵀ)`` at its own
    pair, over the entries not ``excluded`` (the own pair is never excluded)."""
    return _InfoNCE.apply(anchors, items, scale, excluded, positive, tuple(pool_dims))
