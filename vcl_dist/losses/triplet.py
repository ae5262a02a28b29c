"""The triplet hinge loss of a dual encoder over the global batch.

For image anchor ``i`` with positive text ``p = i`` and negative text ``n``::

    max(d(u_i, v_p)² − d(u_i, v_n)² + margin, 0)

and the same with text anchors against images. With L2-normalised embeddings (``normalize``,
the default) ``d² = 2 − 2·cos``; without, plain squared Euclidean distance.

Negatives of an anchor: every item of the global batch except items with the same label
(when both are labelled) and items of the same image group (its own pair, other captions of
the same image). ``negatives`` picks how those hinges become one number per anchor (see
:mod:`vcl_dist.losses.negatives`).

Reduction: the mean over all global anchors of the two directions' average, so the value is
independent of how the batch is split across workers. Anchors with no valid negative count
as 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .gather import distributed_world, gather_no_grad, gather_sizes, gather_with_grad
from .negatives import NEGATIVE_SELECTION


def squared_distances(anchors: torch.Tensor, pool: torch.Tensor, normalized: bool) -> torch.Tensor:
    """``[A, D] x [N, D] -> [A, N]`` squared Euclidean distances, from one matmul."""
    dot = anchors @ pool.T
    if normalized:
        return 2.0 - 2.0 * dot
    return anchors.pow(2).sum(1, keepdim=True) + pool.pow(2).sum(1).unsqueeze(0) - 2.0 * dot


def negative_mask(anchor_labels, anchor_groups, pool_labels, pool_groups) -> torch.Tensor:
    """``[A, N]`` True where a pool item may be pushed away from the anchor.

    Labels < 0 mean "unlabeled" and never match; groups identify the image a row shows.
    """
    same_group = anchor_groups.unsqueeze(1) == pool_groups.unsqueeze(0)
    same_label = (anchor_labels.unsqueeze(1) == pool_labels.unsqueeze(0)) & (anchor_labels.unsqueeze(1) >= 0)
    return ~(same_group | same_label)


def directional_triplet(anchors, pool, positive_index, valid, margin, negatives, normalized) -> torch.Tensor:
    """Per-anchor loss ``[A]`` of ``anchors [A, D]`` against ``pool [N, D]``; anchor ``a``'s
    positive is ``pool[positive_index[a]]``."""
    d_an = squared_distances(anchors, pool, normalized)
    d_ap = d_an.gather(1, positive_index.unsqueeze(1)).squeeze(1)
    return NEGATIVE_SELECTION[negatives](d_ap, d_an, valid, margin)


class TripletLoss(nn.Module):
    """Bidirectional image–text triplet loss over the batch gathered from every worker.

    ``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``

    On W workers, each one computes the rows of its own n anchors against the global pool of
    N = Σn items and returns ``W · (Σ_local loss) / N``: the mean of the returned values over
    workers is the global loss, and after DDP averages gradients (÷W) they are the gradients
    of the global loss, exactly as one process on the concatenated batch would get them.
    """

    def __init__(self, margin: float = 0.2, negatives: str = "semi_hard", normalize: bool = True):
        super().__init__()
        if negatives not in NEGATIVE_SELECTION:
            raise ValueError(f"negatives must be one of {sorted(NEGATIVE_SELECTION)}, got {negatives!r}")
        self.margin = margin
        self.negatives = negatives
        self.normalize = normalize

    def forward(self, image_emb, text_emb, labels, groups) -> torch.Tensor:
        if self.normalize:
            image_emb = nn.functional.normalize(image_emb, dim=-1)
            text_emb = nn.functional.normalize(text_emb, dim=-1)
        rank, world = distributed_world()
        sizes = gather_sizes(image_emb.shape[0], image_emb.device)
        offset, total = sum(sizes[:rank]), sum(sizes)

        all_images = gather_with_grad(image_emb, sizes)
        all_texts = gather_with_grad(text_emb, sizes)
        all_labels = gather_no_grad(labels, sizes)
        all_groups = gather_no_grad(groups, sizes)

        positive = torch.arange(offset, offset + image_emb.shape[0], device=image_emb.device)
        valid = negative_mask(labels, groups, all_labels, all_groups)
        image_to_text = directional_triplet(image_emb, all_texts, positive, valid, self.margin, self.negatives, self.normalize)
        text_to_image = directional_triplet(text_emb, all_images, positive, valid, self.margin, self.negatives, self.normalize)
        return world * (image_to_text.sum() + text_to_image.sum()) / (2 * total)
