"""InfoNCE (CLIP's symmetric contrastive loss) with a learnable, clamped temperature.

For image anchor ``i``: ``−log softmax_j(s · cos(u_i, v_j))[i]`` over its positive and its
valid negatives, and the same for text anchors; ``s = exp(logit_scale)``, clamped to at most
``max_scale`` (CLIP: 100). Label-aware: items with the anchor's label and other captions of
its image are left out of the softmax (they are not negatives), exactly as for the triplet
losses. Reduction: the mean over global anchors of the two directions' average.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .memory import NegativeMemory
from .pool import build_pool, enqueue_batch, pair_scores, positive_entries


def infonce_terms(logits: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, pool_dim: int = 1) -> torch.Tensor:
    """Per-anchor ``[A]`` cross-entropy of the positive among itself and the valid negatives
    (layouts as in :func:`~vcl_dist.losses.pool.pair_scores`)."""
    keep = valid.scatter(pool_dim, positive.unsqueeze(pool_dim), True)
    masked = logits.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(masked, dim=pool_dim) - positive_entries(logits, positive, pool_dim)


class InfoNCELoss(nn.Module):
    """``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``.

    Args:
        init_temperature: initial ``1/s`` (CLIP: 0.07).
        max_scale: upper clamp of ``s`` (CLIP: 100), which keeps training stable.
        gather, memory: as for :class:`~vcl_dist.losses.TripletLoss`.

    ``logit_scale`` is a parameter of this module: give it to the optimizer, and average its
    gradient over workers (it lives outside the DDP-wrapped model).
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, gather: str = "local",
                 memory: NegativeMemory | None = None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        self.gather, self.memory = gather, memory

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, image_emb, text_emb, labels, groups) -> torch.Tensor:
        image_emb = nn.functional.normalize(image_emb, dim=-1)
        text_emb = nn.functional.normalize(text_emb, dim=-1)
        pool = build_pool(image_emb, text_emb, labels, groups, self.gather, self.memory)
        scale = self.scale().to(image_emb.dtype)
        (image_to_text, dim_i2t), (text_to_image, dim_t2i) = pair_scores(pool, lambda a, b: scale * (a @ b.T))
        per_anchor = 0.5 * (
            infonce_terms(image_to_text, pool.positive, pool.valid, dim_i2t)
            + infonce_terms(text_to_image, pool.positive, pool.valid, dim_t2i)
        )
        loss = pool.reduce(per_anchor)
        enqueue_batch(pool, self.memory)
        return loss
