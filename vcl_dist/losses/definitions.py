"""The losses as they are defined: a few lines of masked score-matrix code each (VSE++ style).

Read these first. They are the executable specification of ARCHITECTURE.md's losses for one
process holding the whole pool: every ``[N, N]`` matrix is materialised, autograd does the
backward pass, nothing is fused or gathered. The classes in :mod:`.triplet`, :mod:`.vcrl` and
:mod:`.infonce` compute the same numbers distributed and fast (mined negatives without a dense
backward, fused kernels, local anchors against a gathered pool), and ``tests/unit/losses/test_definitions.py``
checks them against these on random float64 inputs; ``tests/support/reference_losses.py`` checks these
against one-anchor-at-a-time loops.

Shapes: ``image``, ``text`` ``[N, D]`` (row i of each is a matching pair), ``labels`` ``[N]``
(``-1``: unlabeled), ``groups`` ``[N]`` (rows with equal groups show the same image). Every
loss is the mean over anchors of both directions (image→text, text→image) averaged, except the
sigmoid loss, whose terms are the (image, caption) pairs themselves: the sum over each image's
pairs, averaged over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def never_negative(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[N, N]``: True where item j must never be pushed from anchor i — its own image group
    (its pair, other captions of its image) or, for a labelled anchor, the same label."""
    same_label = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    return (groups[:, None] == groups[None, :]) | same_label


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
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def triplet_loss(image, text, labels, groups, margin: float = 0.2, negatives: str = "semi_hard",
                 normalize: bool = True) -> torch.Tensor:
    """The triplet loss; with ``normalize`` on L2-normalised embeddings (``d² = 2 − 2·cos``)."""
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    invalid = never_negative(labels, groups)
    d = squared_distance_matrix(image, text)  # [image i, text j]
    i2t = hinge(d.diagonal(), d, invalid, margin, negatives)
    t2i = hinge(d.diagonal(), d.T, invalid, margin, negatives)
    return (i2t.mean() + t2i.mean()) / 2


def vcrl_loss(image, text, labels, groups, margin: float = 0.5, reg_lambda: float = 0.01, negatives: str = "semi_hard",
              class_embeddings: torch.Tensor | None = None, label_weight: float = 1.0) -> torch.Tensor:
    """VCRL: the hinge on raw squared distances, plus ``λ(‖U‖²_F + ‖V‖²_F)/N``, plus, with a
    label tower (``class_embeddings`` ``[K, D]``), image→class and text→class hinges for each
    labelled anchor (unlabeled anchors add 0), weighted by ``label_weight``."""
    n = image.shape[0]
    loss = triplet_loss(image, text, labels, groups, margin, negatives, normalize=False)
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


def infonce_loss(image, text, labels, groups, scale: float) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over ``scale · cos``, label-aware: never-negatives other
    than the pair itself are left out of the softmax."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T  # [image i, text j]
    excluded = never_negative(labels, groups) & ~torch.eye(len(labels), dtype=torch.bool, device=image.device)
    i2t = -F.log_softmax(logits.masked_fill(excluded, float("-inf")), dim=1).diagonal()
    t2i = -F.log_softmax(logits.T.masked_fill(excluded, float("-inf")), dim=1).diagonal()
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_loss(image, text, labels, groups, scale: float, bias: float) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, label-aware: for image ``i`` and caption ``j``,
    ``−log σ(z_ij · (scale · cos + bias))`` with ``z = +1`` for its own caption and ``−1`` for
    a negative; never-negatives other than the own caption are left out. The sum over each
    image's pairs, the mean over images."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T + bias  # [image i, text j]
    own = torch.eye(len(labels), dtype=torch.bool, device=image.device)
    z = torch.where(own, 1.0, -1.0).to(logits.dtype)
    valid = ~never_negative(labels, groups) | own
    return -(F.logsigmoid(z * logits) * valid).sum(1).mean()
