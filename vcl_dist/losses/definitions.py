"""The losses as they are defined: a few lines of masked score-matrix code each (VSE++ style).

Read these first. They are the executable specification of ARCHITECTURE.md's losses for one
process holding the whole pool: every ``[N, P]`` matrix is materialised (``P``: the batch, then
any negative memory's rows), autograd does the backward pass, nothing is fused or gathered.
The classes in `.triplet`, `.vcrl`, `.infonce` and `.sigmoid` compute the
same numbers distributed and fast (mined negatives without a dense backward, fused kernels,
tiles, local anchors against a gathered pool, a ring), and the loss matrix
(``tests/support/loss_matrix.py``) holds them against these on random float64 inputs in every
way they run; ``tests/support/reference_losses.py`` checks these against one-anchor-at-a-time
loops.

Shapes: ``image``, ``text`` ``[N, D]`` (row i of each is a matching pair), ``labels`` ``[N]``
(``-1``: unlabeled), ``groups`` ``[N]`` (rows with equal groups show the same image). Every
loss is the mean over anchors of both directions (image→text, text→image) averaged, except the
sigmoid loss, whose terms are the (image, caption) pairs themselves: the sum over each image's
pairs, averaged over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def never_negative(labels: torch.Tensor, groups: torch.Tensor, pool_labels: torch.Tensor | None = None,
                   pool_groups: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, P]``: True where pool item j must never be pushed from anchor i — its own image
    group (its pair, other captions of its image) or, for a labelled anchor, the same label.
    The pool is the batch itself unless ``pool_labels``/``pool_groups`` say otherwise."""
    pool_labels = labels if pool_labels is None else pool_labels
    pool_groups = groups if pool_groups is None else pool_groups
    same_label = (labels[:, None] == pool_labels[None, :]) & (labels[:, None] >= 0)
    return (groups[:, None] == pool_groups[None, :]) | same_label


def with_memory(image, text, labels, groups, memory):
    """The pool the anchors are held against: the batch, then ``memory``'s rows if any —
    ``(image [M, D], text [M, D], labels [M], groups [M])`` of past batches, negatives only,
    without gradient (a negative memory)."""
    if memory is None:
        return image, text, labels, groups
    m_image, m_text, m_labels, m_groups = memory
    return (torch.cat([image, m_image.detach().to(image)]), torch.cat([text, m_text.detach().to(text)]),
            torch.cat([labels, m_labels.to(labels)]), torch.cat([groups, m_groups.to(groups)]))


def own_pairs(n: int, pool_rows: int, device) -> torch.Tensor:
    """``[N, P]``: True at each anchor's own pair (pool row i of anchor i)."""
    return torch.eye(n, pool_rows, dtype=torch.bool, device=device)


def hinge(d_pos: torch.Tensor, d_all: torch.Tensor, invalid: torch.Tensor, margin: float, negatives: str) -> torch.Tensor:
    """Per-anchor triplet hinge ``max(d(a,p)² − d(a,n)² + m, 0)`` from squared distances.

    ``d_pos`` ``[A]``, ``d_all`` ``[A, P]``, ``invalid`` ``[A, P]`` (never negatives). An anchor
    without a valid negative contributes 0.
    """
    inf = torch.finfo(d_all.dtype).max
    d_neg = d_all.masked_fill(invalid, inf)
    has_negative = ~invalid.all(dim=1)
    if negatives == "all":
        hinges = F.relu(d_pos[:, None] - d_all + margin).masked_fill(invalid, 0)
        return hinges.sum(1) / (~invalid).sum(1).clamp(min=1)
    if negatives == "hardest":
        chosen = d_neg.min(dim=1).values
    elif negatives == "semi_hard":  # the closest negative farther than the positive, else the hardest
        farther = d_neg.masked_fill(d_neg <= d_pos[:, None], inf).min(dim=1).values
        chosen = torch.where(farther < inf, farther, d_neg.min(dim=1).values)
    else:
        raise ValueError(f"negatives must be 'hardest', 'semi_hard' or 'all', got {negatives!r}")
    return torch.where(has_negative, F.relu(d_pos - chosen + margin), torch.zeros_like(d_pos))


def squared_distance_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every pair's squared Euclidean distance, ``[A, D] × [P, D] -> [A, P]``, by broadcasting (exact for identical
    rows).
    """
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def triplet_loss(image, text, labels, groups, margin: float = 0.2, negatives: str = "semi_hard",
                 normalize: bool = True, memory=None) -> torch.Tensor:
    """The triplet loss; with ``normalize`` on L2-normalised embeddings (``d² = 2 − 2·cos``).
    ``memory``: more negatives (see `with_memory`)."""
    image_pool, text_pool, pool_labels, pool_groups = with_memory(image, text, labels, groups, memory)
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        image_pool, text_pool = F.normalize(image_pool, dim=-1), F.normalize(text_pool, dim=-1)
    invalid = never_negative(labels, groups, pool_labels, pool_groups)
    d_i2t = squared_distance_matrix(image, text_pool)  # [image i, text j]
    d_t2i = squared_distance_matrix(text, image_pool)  # [text i, image j]
    d_pos = d_i2t.diagonal()  # the batch's own pairs come first in the pool
    i2t = hinge(d_pos, d_i2t, invalid, margin, negatives)
    t2i = hinge(d_pos, d_t2i, invalid, margin, negatives)
    return (i2t.mean() + t2i.mean()) / 2


def vcrl_loss(image, text, labels, groups, margin: float = 0.5, reg_lambda: float = 0.01, negatives: str = "semi_hard",
              class_embeddings: torch.Tensor | None = None, label_weight: float = 1.0, memory=None) -> torch.Tensor:
    """VCRL: the hinge on raw squared distances, plus ``λ(‖U‖²_F + ‖V‖²_F)/N``, plus, with a
    label tower (``class_embeddings`` ``[K, D]``), image→class and text→class hinges for each
    labelled anchor (unlabeled anchors add 0), weighted by ``label_weight``. ``memory``: more
    negatives of the hinge (see `with_memory`); the other terms are the batch's."""
    n = image.shape[0]
    loss = triplet_loss(image, text, labels, groups, margin, negatives, normalize=False, memory=memory)
    loss = loss + reg_lambda * (image.pow(2).sum() + text.pow(2).sum()) / n
    if class_embeddings is not None:
        labelled = labels >= 0
        own_class = F.one_hot(labels.clamp(min=0), class_embeddings.shape[0]).bool()
        for anchors in (image, text):
            d = squared_distance_matrix(anchors, class_embeddings)  # [N, K]
            d_pos = d.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
            terms = hinge(d_pos, d, own_class, margin, negatives)
            loss = loss + label_weight * (terms * labelled).sum() / (2 * n)
    return loss


def infonce_loss(image, text, labels, groups, scale: float, memory=None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over ``scale · cos``, label-aware: never-negatives other
    than the pair itself are left out of the softmax. ``memory``: more negatives (see
    `with_memory`)."""
    image_pool, text_pool, pool_labels, pool_groups = with_memory(image, text, labels, groups, memory)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_pool, text_pool = F.normalize(image_pool, dim=-1), F.normalize(text_pool, dim=-1)
    own = own_pairs(len(labels), len(pool_labels), image.device)
    excluded = never_negative(labels, groups, pool_labels, pool_groups) & ~own
    i2t = -F.log_softmax((scale * image @ text_pool.T).masked_fill(excluded, float("-inf")), dim=1)[own]
    t2i = -F.log_softmax((scale * text @ image_pool.T).masked_fill(excluded, float("-inf")), dim=1)[own]
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_loss(image, text, labels, groups, scale: float, bias: float, memory=None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, label-aware: for image ``i`` and caption ``j``,
    ``−log σ(z_ij · (scale · cos + bias))`` with ``z = +1`` for its own caption and ``−1`` for
    a negative; never-negatives other than the own caption are left out. The sum over each
    image's pairs, the mean over images. ``memory``: its captions are more negatives (see
    `with_memory`)."""
    _, text_pool, pool_labels, pool_groups = with_memory(image, text, labels, groups, memory)
    image, text_pool = F.normalize(image, dim=-1), F.normalize(text_pool, dim=-1)
    logits = scale * image @ text_pool.T + bias  # [image i, caption j]
    own = own_pairs(len(labels), len(pool_labels), image.device)
    z = torch.where(own, 1.0, -1.0).to(logits.dtype)
    valid = ~never_negative(labels, groups, pool_labels, pool_groups) | own
    return -(F.logsigmoid(z * logits) * valid).sum(1).mean()
