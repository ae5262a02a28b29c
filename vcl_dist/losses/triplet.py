"""The triplet hinge loss of a dual encoder over the global pool.

For image anchor ``i`` with positive text ``p = i`` and negative text ``n``::

    max(d(u_i, v_p)² − d(u_i, v_n)² + margin, 0)

and the same with text anchors against images. With L2-normalised embeddings (``normalize``,
the default) ``d² = 2 − 2·cos``; without, plain squared Euclidean distance.

Negatives of an anchor: every item of the pool (global batch, then memory) except items with
the same label (when both are labelled) and items of the same image group (its own pair, other
captions of the same image). ``negatives`` picks how those hinges become one number per
anchor (see `vcl_dist.losses.negatives`).

Reduction: the mean over all global anchors of the two directions' average, so the value does
not depend on how the batch is split across workers. Anchors with no valid negative count as 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .distances import (
    paired_squared_distances,
    paired_squared_distances_normalized,
    squared_distances,
    squared_distances_normalized,
)
from .fused import mean_hinge_all_negatives
from .hooks import PLAIN, StepHooks
from .memory import NegativeMemory
from .negatives import INF, MINED_MODES, NEGATIVE_SELECTION, hinge, mine_candidates
from .pool import Pool, build_pool, direction_inputs, enqueue_batch, positive_entries, score_matrices
from .sharded_memory import MemoryShard, mean_hinge_with_memory, memory_candidates, memory_hinge_statistics, merge_mined
from .tiled import check_chunk_size, mean_hinge_all_negatives_tiled, mine_candidates_tiled


def triplet_terms(distances: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, margin: float, negatives: str) -> torch.Tensor:
    """Per-anchor triplet loss ``[A]`` from anchor-to-pool squared distances ``[A, P]``."""
    d_ap = distances.gather(1, positive.unsqueeze(1)).squeeze(1)
    return NEGATIVE_SELECTION[negatives](d_ap, distances, valid, margin)


def bidirectional_triplet(pool: Pool, margin: float, negatives: str, normalized: bool, chunk_size: int | None = None) -> torch.Tensor:
    """Per-anchor ``[A]`` mean of the image→text and text→image triplet terms.

    Mined modes find their negative on a distance matrix computed without gradient, then
    recompute the two distances that matter from the embeddings: the backward pass costs
    ``O(A·D)`` instead of two ``[A, P]``-sized matmuls. The result and its gradient are those
    of the dense definition (the gradient of a min is the gradient at the argmin).
    ``chunk_size``: visit the pool in tiles of that many rows and never hold the whole
    distance matrix (`.tiled`); None: the dense path. A sharded memory adds its share
    through `.sharded_memory`.
    """
    distance_fn = squared_distances_normalized if normalized else squared_distances
    paired_fn = paired_squared_distances_normalized if normalized else paired_squared_distances
    shard = MemoryShard(pool, pool.sharded_memory, chunk_size, normalized) if pool.sharded_memory is not None else None
    # d(anchor, positive) is the same pair in both directions: one differentiable [A] vector.
    d_ap = paired_fn(pool.image_anchors, pool.text_pool.index_select(0, pool.positive))
    if negatives not in MINED_MODES:
        if chunk_size:
            terms = [mean_hinge_all_negatives_tiled(anchors, items, pool.positive, pool.never_negatives, margin, normalized,
                                                    chunk_size, pool_dims) for anchors, items, pool_dims in direction_inputs(pool)]
        else:
            terms = [mean_hinge_all_negatives(anchors, items, pool.invalid, pool.positive, pool_dims, margin, normalized)
                     for anchors, items, pool_dims in direction_inputs(pool)]
        per_direction = torch.cat(terms)
        if shard is not None:
            stats = memory_hinge_statistics(shard, margin).index_select(1, pool.positive)
            batch_valid = (pool.batch_rows - pool.never_negatives.counts()).to(per_direction.dtype)
            per_direction = torch.stack([
                mean_hinge_with_memory(per_direction[k], batch_valid, stats[k], anchors, d_ap, normalized)
                for k, (anchors, _) in enumerate(pool.directions)
            ])
        return per_direction.mean(dim=0)
    candidates = []
    if chunk_size:
        for anchors, items, pool_dims in direction_inputs(pool):
            candidates += mine_candidates_tiled(anchors.detach(), items.detach(), d_ap.detach(), pool.never_negatives,
                                                negatives, chunk_size, normalized, pool_dims)
    else:
        with torch.no_grad():
            for filled, pool_dims in score_matrices(pool, distance_fn):
                d_ap_rows = [positive_entries(filled, pool.positive, dim) for dim in pool_dims]
                filled.masked_fill_(pool.invalid, INF)
                candidates += [mine_candidates(filled, d, negatives, dim) for d, dim in zip(d_ap_rows, pool_dims)]
    if shard is None:
        chosen = []
        for (anchors, items), found in zip(pool.directions, candidates):
            index, has_negative = found.choose()
            chosen.append((items.index_select(0, index), has_negative))
    else:
        remembered, remembered_rows = memory_candidates(shard, negatives)
        chosen = [merge_mined(found, remembered[k], remembered_rows[k], pool.positive, items, pool.batch_rows)
                  for k, ((_, items), found) in enumerate(zip(pool.directions, candidates))]
    terms = [hinge(d_ap, paired_fn(anchors, negative_rows), has_negative, margin)
             for (anchors, _), (negative_rows, has_negative) in zip(pool.directions, chosen)]
    return 0.5 * (terms[0] + terms[1])


class TripletLoss(nn.Module):
    """Bidirectional image–text triplet loss over the pool gathered from every worker.

    ``forward(image_emb [n, D], text_emb [n, D], labels [n], groups [n]) -> scalar``

    Args:
        margin: the hinge margin ``m`` (on squared distances; at most 4 is meaningful for
            normalised embeddings).
        negatives: ``hardest`` | ``semi_hard`` | ``all`` (see `.negatives`).
        normalize: L2-normalise the embeddings first (``d² = 2 − 2·cos``).
        gather: ``local`` | ``full`` (see `.pool`).
        memory: an optional `NegativeMemory` of past global batches (extra negatives).
        chunk_size: compute over the pool in tiles of this many rows, holding at most
            ``[anchors × chunk_size]`` scores in forward and backward (`.tiled`); None:
            the dense ``[anchors × pool]`` path.

    On W workers with ``gather="local"``, each worker returns ``W · (Σ_local terms) / N``: the
    mean over workers is the global loss, and after DDP averages gradients they are exactly
    the gradients one process would get on the concatenated batch.
    """

    def __init__(self, margin: float = 0.2, negatives: str = "semi_hard", normalize: bool = True,
                 gather: str = "local", memory: NegativeMemory | None = None, chunk_size: int | None = None):
        super().__init__()
        if negatives not in NEGATIVE_SELECTION:
            raise ValueError(f"negatives must be one of {sorted(NEGATIVE_SELECTION)}, got {negatives!r}")
        self.margin, self.negatives, self.normalize, self.gather, self.memory = margin, negatives, normalize, gather, memory
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                hooks: StepHooks = PLAIN) -> torch.Tensor:
        """The bidirectional triplet loss of the global batch.

        Args:
            image_emb: ``[n, D]`` this worker's image embeddings.
            text_emb: ``[n, D]`` this worker's caption embeddings, row i paired with image row i.
            labels: ``[n]`` class ids; negative for unlabelled rows.
            groups: ``[n]`` image ids: rows that share one are captions of one image.
            hooks: the step's timer and finiteness check (default: none).

        Returns:
            A scalar: this worker's share, whose mean over workers is the global batch's loss. The
            share of anchors whose hinge is active is kept in ``self.violations``.
        """
        if self.normalize:
            image_emb = nn.functional.normalize(image_emb, dim=-1)
            text_emb = nn.functional.normalize(text_emb, dim=-1)
        pool = build_pool(image_emb, text_emb, labels, groups, self.gather, self.memory, hooks)
        per_anchor = bidirectional_triplet(pool, self.margin, self.negatives, self.normalize, self.chunk_size)
        self.violations = violation_fraction(per_anchor)
        loss = pool.reduce(per_anchor)
        enqueue_batch(pool, self.memory)
        return loss

    def monitored(self) -> dict[str, torch.Tensor]:
        """What a tracker plots of this loss besides its value (tensors, read only when logged)."""
        return {"margin_violation_fraction": self.violations} if hasattr(self, "violations") else {}


def violation_fraction(per_anchor: torch.Tensor) -> torch.Tensor:
    """The share of this worker's anchors whose margin some negative violates (a positive
    triplet term), detached: how much of the batch still teaches the model anything."""
    return (per_anchor.detach() > 0).float().mean()
