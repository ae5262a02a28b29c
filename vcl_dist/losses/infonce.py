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

from .fused import infonce_terms
from .hooks import PLAIN, StepHooks
from .memory import NegativeMemory
from .pool import build_pool, direction_inputs, enqueue_batch
from .sharded_memory import MemoryShard, infonce_with_memory, memory_log_sum_exp
from .tiled import check_chunk_size, infonce_terms_tiled


class InfoNCELoss(nn.Module):
    """``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``.

    Args:
        init_temperature: initial ``1/s`` (CLIP: 0.07).
        max_scale: upper clamp of ``s`` (CLIP: 100), which keeps training stable.
        gather: ``local`` | ``full``, as for `TripletLoss`.
        memory: an optional `NegativeMemory` of past global batches (extra negatives).
        chunk_size: tile the pool as `TripletLoss` does; None: dense.

    ``logit_scale`` is a parameter of this module: give it to the optimizer, and average its
    gradient over workers (it lives outside the DDP-wrapped model).
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, gather: str = "local",
                 memory: NegativeMemory | None = None, chunk_size: int | None = None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        self.gather, self.memory, self.chunk_size = gather, memory, check_chunk_size(chunk_size)

    def scale(self) -> torch.Tensor:
        """The logit scale ``s = exp(logit_scale)``, clamped to ``max_scale``: a scalar tensor."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def monitored(self) -> dict[str, torch.Tensor]:
        """What a tracker plots of this loss besides its value: the learned inverse temperature."""
        return {"logit_scale": self.scale().detach()}

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                hooks: StepHooks = PLAIN) -> torch.Tensor:
        """The symmetric InfoNCE loss of the global batch.

        Args:
            image_emb: ``[n, D]`` this worker's image embeddings (normalised here).
            text_emb: ``[n, D]`` this worker's caption embeddings, row i paired with image row i.
            labels: ``[n]`` class ids; negative for unlabelled rows.
            groups: ``[n]`` image ids: rows that share one are captions of one image.
            hooks: the step's timer and finiteness check (default: none).

        Returns:
            A scalar: this worker's share, whose mean over workers is the global batch's loss.
        """
        image_emb = nn.functional.normalize(image_emb, dim=-1)
        text_emb = nn.functional.normalize(text_emb, dim=-1)
        pool = build_pool(image_emb, text_emb, labels, groups, self.gather, self.memory, hooks)
        scale = self.scale().to(image_emb.dtype)
        if self.chunk_size:
            terms = [infonce_terms_tiled(anchors, items, scale, pool.positive, pool.never_negatives, self.chunk_size, pool_dims)
                     for anchors, items, pool_dims in direction_inputs(pool)]
        else:
            # The own pair stays in the softmax although it is no negative.
            excluded = pool.invalid.clone()
            excluded[torch.arange(len(pool.positive), device=excluded.device), pool.positive] = False
            terms = [infonce_terms(anchors, items, scale, excluded, pool.positive, pool_dims)
                     for anchors, items, pool_dims in direction_inputs(pool)]
        per_direction = torch.cat(terms)
        if pool.sharded_memory is not None:
            shard = MemoryShard(pool, pool.sharded_memory, self.chunk_size, normalized=True)
            remembered = memory_log_sum_exp(shard, scale.detach()).index_select(1, pool.positive)
            per_direction = torch.stack([
                infonce_with_memory(per_direction[k], scale * (anchors * items.index_select(0, pool.positive)).sum(1),
                                    remembered[k], anchors, scale)
                for k, (anchors, items) in enumerate(pool.directions)
            ])
        loss = pool.reduce(per_direction.mean(dim=0))
        enqueue_batch(pool, self.memory)
        return loss
