"""The pairwise sigmoid loss (SigLIP; Zhai et al., 2023), with an all-gather or a ring exchange.

Every (image, caption) pair of the pool is its own binary problem: for image anchor ``i`` and
caption ``j``, ``−log σ(z_ij · (s · cos(u_i, v_j) + b))`` with ``z_ij = +1`` for the anchor's
own caption and ``−1`` for a negative; pairs that share a label or an image (other captions of
the anchor's image) are left out, as the other losses leave them out of the negatives. ``s =
exp(logit_scale)`` (clamped like InfoNCE's) and ``b = logit_bias`` are learnable. There is no
softmax, so no row needs the whole pool at once. Reduction: the sum over each anchor's pairs,
then the mean over the global image anchors (big_vision's and open_clip's normalisation).

Exchanges (``loss.gather``): ``local`` and ``full`` as for the other losses (the gathered pool,
gradient through the gather); ``ring``: each worker keeps its images and passes the captions'
embeddings round the ring of workers, one peer's block at a time (`.ring`), so it never
holds more than two blocks of captions and one ``[n_local, n_peer]`` score tile.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .gather import distributed_world, gather_sizes
from .hooks import PLAIN, StepHooks
from .memory import NegativeMemory
from .pool import build_pool, check_shapes, enqueue_batch
from .ring import ring_sigmoid_terms
from .sigmoid_terms import sigmoid_terms
from .tiled import check_chunk_size


class SigmoidLoss(nn.Module):
    """``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``.

    Args:
        init_scale: initial ``s`` (SigLIP: 10); ``logit_scale`` holds its log.
        init_bias: initial ``b`` (SigLIP: −10, so that the many negatives start near σ ≈ 0).
        max_scale: upper clamp of ``s`` (as InfoNCE's).
        gather: ``local``, ``full`` or ``ring``.
        memory: a replicated negative memory (``local``/``full`` only): its captions are more
            negatives of every image anchor.
        chunk_size: score tiles of this many captions in forward and backward.

    ``logit_scale`` and ``logit_bias`` are parameters of this module: give them to the
    optimizer, and average their gradients over workers (they live outside the DDP model).
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, max_scale: float = 100.0,
                 gather: str = "local", memory: NegativeMemory | None = None, chunk_size: int | None = None):
        super().__init__()
        if gather not in ("local", "full", "ring"):
            raise ValueError(f"gather must be 'local', 'full' or 'ring', got {gather!r}")
        if memory is not None and (memory.sharded or gather == "ring"):
            raise ValueError("the sigmoid loss takes a replicated negative memory with gather local or full only")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.max_log_scale = math.log(max_scale)
        self.gather, self.memory, self.chunk_size = gather, memory, check_chunk_size(chunk_size)

    def scale(self) -> torch.Tensor:
        """The logit scale ``s = exp(logit_scale)``, clamped to ``max_scale``: a scalar tensor."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def monitored(self) -> dict[str, torch.Tensor]:
        """What a tracker plots of this loss besides its value: the learned scale and bias."""
        return {"logit_scale": self.scale().detach(), "logit_bias": self.logit_bias.detach()}

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                hooks: StepHooks = PLAIN) -> torch.Tensor:
        """The pairwise sigmoid loss of the global batch.

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
        scale, bias = self.scale().to(image_emb.dtype), self.logit_bias.to(image_emb.dtype)
        rank, world = distributed_world()
        if self.gather == "ring" and world > 1:
            check_shapes(image_emb, text_emb)
            hooks.check_finite("image embeddings", image_emb.detach())
            hooks.check_finite("text embeddings", text_emb.detach())
            with hooks.phase("gather"):
                sizes = gather_sizes(image_emb.shape[0])
            per_anchor = ring_sigmoid_terms(image_emb, text_emb, labels, groups, scale, bias, sizes, self.chunk_size)
            return per_anchor.sum() * (world / sum(sizes))
        pool = build_pool(image_emb, text_emb, labels, groups, "full" if self.gather == "full" else "local", self.memory,
                          hooks)
        per_anchor = sigmoid_terms(pool.image_anchors, pool.text_pool, scale, bias, pool.positive, pool.never_negatives,
                                   self.chunk_size)
        loss = pool.reduce(per_anchor)
        enqueue_batch(pool, self.memory)
        return loss


__all__ = ["SigmoidLoss"]
