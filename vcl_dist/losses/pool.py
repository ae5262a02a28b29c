"""The anchors and the negative pool that every loss works on, over all workers.

``build_pool`` gathers the global batch with gradient (`.gather`), appends the negative
memory (a replicated one; a sharded one stays apart, see `.sharded_memory`), and says
for every anchor which pool row is its positive and which rows may serve as negatives. The
losses then only compute per-anchor terms and ``reduce`` them.

Gather variants:

- ``local`` (default): anchors are this worker's ``n`` rows; the pool is the global batch of
  ``N`` rows. Compute and memory per worker: ``O(n·N)``. The returned loss is scaled by
  ``W / N`` so that, after DDP averages gradients, they are the global loss's gradients.
- ``full``: every worker computes the whole ``N x N`` problem (anchors = the global batch)
  and returns the global loss itself: ``W`` times the compute and memory of ``local`` for the
  same result. Useful only for checking, or when W is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .gather import distributed_world, gather_no_grad, gather_sizes, gather_with_grad
from .hooks import PLAIN, StepHooks
from .memory import NegativeMemory

GATHER_MODES = ("local", "full")


@dataclass
class Pool:
    """One step's anchors and the pool they are scored against: the gathered global batch, then memory rows (shapes
    in the field comments).
    """
    image_anchors: torch.Tensor  # [A, D]
    text_anchors: torch.Tensor  # [A, D]
    anchor_labels: torch.Tensor  # [A]
    image_pool: torch.Tensor  # [P, D]: the global batch, then memory rows
    text_pool: torch.Tensor  # [P, D]
    pool_labels: torch.Tensor  # [P]
    never_negatives: NeverNegatives  # which pool rows may not be an anchor's negative
    positive: torch.Tensor  # [A] pool row of each anchor's own pair
    weight: float  # multiplies the sum of per-anchor terms: W/N (local) or 1/N (full)
    batch_rows: int  # N: pool rows that belong to the global batch (the rest is memory)
    # The anchors are the global batch itself (one worker, or ``full``): the text->image
    # scores are then the transpose of the image->text ones, for the batch part.
    anchors_are_batch: bool
    global_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # for the memory
    # A sharded memory in use: its rows are not in the pool; the losses add its share through
    # collectives (`.sharded_memory`). Pool rows from ``batch_rows`` on would be its rows.
    sharded_memory: NegativeMemory | None = None

    @cached_property
    def invalid(self) -> torch.Tensor:
        """``[A, P]`` bool: never a negative of the anchor (same image or label). The dense
        paths only: the tiled ones (`.tiled`) build it a tile at a time."""
        return self.never_negatives.tile(0, self.image_pool.shape[0])

    @property
    def directions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(anchors, items)`` of the image→text direction, then of the text→image one."""
        return [(self.image_anchors, self.text_pool), (self.text_anchors, self.image_pool)]

    def reduce(self, per_anchor: torch.Tensor) -> torch.Tensor:
        """The worker's share of the global mean over anchors (see the module docstring)."""
        return per_anchor.sum() * self.weight


class NeverNegatives:
    """Which pool items must not be pushed away from an anchor: the same image group (its own
    pair, other captions of its image) or the anchor's label (labels < 0 mean "unlabeled" and
    never match). ``tile(start, stop)`` is the ``[A, stop − start]`` bool mask of pool rows
    ``start:stop``, built from the label and group vectors, so no ``[A, P]`` mask need exist.

    The masks are ``A x P`` in all, so the common cases take one comparison instead of four,
    decided once for the whole pool: with no labels at all, the mask is "same group"; with
    every item labelled and every group inside one label (captions of one image share its
    class), it is "same label".
    """

    def __init__(self, anchor_labels, anchor_groups, pool_labels, pool_groups):
        self.anchor_labels, self.anchor_groups = anchor_labels, anchor_groups
        self.pool_labels, self.pool_groups = pool_labels, pool_groups
        anchors_labelled, pool_labelled = anchor_labels >= 0, pool_labels >= 0
        if not anchors_labelled.any() and not pool_labelled.any():
            self.rule = "group"
        elif anchors_labelled.all() and pool_labelled.all() and _groups_within_labels(
            torch.cat([anchor_labels, pool_labels]), torch.cat([anchor_groups, pool_groups])
        ):
            self.rule = "label"
        else:
            self.rule = "group or label"

    def tile(self, start: int, stop: int) -> torch.Tensor:
        """``[A, stop − start]`` bool: which pool rows in ``[start, stop)`` may not be each anchor's negative."""
        if self.rule == "label":
            return self.anchor_labels.unsqueeze(1) == self.pool_labels[start:stop].unsqueeze(0)
        invalid = self.anchor_groups.unsqueeze(1) == self.pool_groups[start:stop].unsqueeze(0)
        if self.rule == "group":
            return invalid
        same_label = self.anchor_labels.unsqueeze(1) == self.pool_labels[start:stop].unsqueeze(0)
        same_label &= (self.anchor_labels >= 0).unsqueeze(1)
        return invalid.logical_or_(same_label)


    def counts(self) -> torch.Tensor:
        """``[A]`` int64: each anchor's never-negatives in the whole pool, from sorted keys
        (``O((A + P) log P)``), without any ``[A, P]`` comparison."""
        if self.rule == "label":
            return _matches(self.anchor_labels, self.pool_labels)
        same_group = _matches(self.anchor_groups, self.pool_groups)
        if self.rule == "group":
            return same_group
        # |same group ∪ same label| = |same group| + |same label| − |both|, for labelled anchors.
        groups = torch.unique(torch.cat([self.anchor_groups, self.pool_groups]), return_inverse=True)[1]
        labels = torch.unique(torch.cat([self.anchor_labels, self.pool_labels]), return_inverse=True)[1]
        pairs = groups * (int(labels.max()) + 1) + labels
        count = self.anchor_labels.shape[0]
        both = _matches(pairs[:count], pairs[count:])
        same_label = _matches(self.anchor_labels, self.pool_labels)
        return same_group + torch.where(self.anchor_labels >= 0, same_label - both, 0)


def _matches(anchor_keys: torch.Tensor, pool_keys: torch.Tensor) -> torch.Tensor:
    """``[A]``: how many pool keys equal each anchor's key."""
    values, counts = torch.unique(pool_keys, return_counts=True)
    at = torch.searchsorted(values, anchor_keys).clamp_max_(values.shape[0] - 1)
    return torch.where(values[at] == anchor_keys, counts[at], 0)


def never_negative(anchor_labels, anchor_groups, pool_labels, pool_groups) -> torch.Tensor:
    """The whole ``[A, P]`` mask of `NeverNegatives`."""
    return NeverNegatives(anchor_labels, anchor_groups, pool_labels, pool_groups).tile(0, pool_labels.shape[0])


def _groups_within_labels(labels: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether every image group carries a single label (then same group implies same label)."""
    pairs = torch.unique(torch.stack([groups, labels]), dim=1)
    return pairs.shape[1] == torch.unique(groups).shape[0]


def check_shapes(image_emb, text_emb) -> None:
    """Both embeddings ``[n, D]`` of one shape, or a one-line ValueError."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [n, D], got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")


def build_pool(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
               gather: str = "local", memory: NegativeMemory | None = None,
               hooks: StepHooks = PLAIN) -> Pool:
    """Gather every worker's rows (with gradient) and add the memory: the pool a loss scores against.

    Args:
        image_emb: ``[n, D]`` this worker's image embeddings.
        text_emb: ``[n, D]`` this worker's caption embeddings.
        labels: ``[n]`` class ids (negative: unlabelled).
        groups: ``[n]`` image ids.
        gather: ``local`` (this worker's anchors) or ``full`` (every worker's anchors on every worker).
        memory: past global batches to add as negatives, or None.
        hooks: the step's timer and finiteness check.

    Returns:
        The `Pool`: anchors ``[A, D]`` (A = n, or the global N with ``full``) and pool rows ``[P, D]``.
    """
    if gather not in GATHER_MODES:
        raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
    check_shapes(image_emb, text_emb)
    rank, world = distributed_world()
    with hooks.phase("gather"):
        sizes = gather_sizes(image_emb.shape[0])
        all_images, all_texts = gather_with_grad(image_emb, sizes), gather_with_grad(text_emb, sizes)
        all_labels, all_groups = gather_no_grad(labels, sizes), gather_no_grad(groups, sizes)
    offset, total = sum(sizes[:rank]), sum(sizes)
    hooks.check_finite("image embeddings", all_images.detach())
    hooks.check_finite("text embeddings", all_texts.detach())

    if gather == "full" or world == 1:
        anchors = (all_images, all_texts, all_labels, all_groups)
        positive = torch.arange(total, device=image_emb.device)
        weight = 1.0 / total
    else:
        anchors = (image_emb, text_emb, labels, groups)
        positive = torch.arange(offset, offset + image_emb.shape[0], device=image_emb.device)
        weight = world / total

    pool_images, pool_texts, pool_labels, pool_groups = all_images, all_texts, all_labels, all_groups
    remembered = memory.negatives() if memory is not None and not memory.sharded else None
    if remembered is not None:
        mem_images, mem_texts, mem_labels, mem_groups = remembered
        pool_images = torch.cat([pool_images, mem_images.to(pool_images)])
        pool_texts = torch.cat([pool_texts, mem_texts.to(pool_texts)])
        pool_labels = torch.cat([pool_labels, mem_labels.to(pool_labels.device)])
        pool_groups = torch.cat([pool_groups, mem_groups.to(pool_groups.device)])

    return Pool(
        image_anchors=anchors[0], text_anchors=anchors[1], anchor_labels=anchors[2],
        image_pool=pool_images, text_pool=pool_texts, pool_labels=pool_labels,
        never_negatives=NeverNegatives(anchors[2], anchors[3], pool_labels, pool_groups),
        positive=positive, weight=weight, batch_rows=total,
        anchors_are_batch=anchors[0].shape[0] == total,
        global_batch=(all_images, all_texts, all_labels, all_groups),
        sharded_memory=memory if memory is not None and memory.sharded and memory.in_use() else None,
    )


def score_matrices(pool: Pool, score_fn) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """``score_fn(anchors, items)`` for image anchors vs the text pool and text anchors vs the
    image pool, as ``(matrix, pool_dims)`` pairs: the image→text direction first, then the
    text→image one. ``pool_dim`` 1: anchors along rows, pool along columns; 0: the reverse.

    When the anchors are the whole batch and there is no memory, the text→image matrix is the
    transpose of the image→text one: one matrix read in both layouts, ``[(M, (1, 0))]`` (one
    matmul instead of two, and no transposed copy; ``pool.invalid`` is symmetric then). Else
    ``[(M_i2t, (1,)), (M_t2i, (1,))]``.
    """
    return [(score_fn(anchors, items), pool_dims) for anchors, items, pool_dims in direction_inputs(pool)]


def direction_inputs(pool: Pool) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """``(anchors, items, pool_dims)`` whose score matrices cover both directions (see
    `score_matrices`)."""
    if pool.anchors_are_batch and pool.image_pool.shape[0] == pool.batch_rows:
        return [(pool.image_anchors, pool.text_pool, (1, 0))]
    return [(pool.image_anchors, pool.text_pool, (1,)), (pool.text_anchors, pool.image_pool, (1,))]


def positive_entries(matrix: torch.Tensor, positive: torch.Tensor, pool_dim: int) -> torch.Tensor:
    """``[A]``: each anchor's entry at its own pair (layouts of `score_matrices`)."""
    return matrix.gather(pool_dim, positive.unsqueeze(pool_dim)).squeeze(pool_dim)


def enqueue_batch(pool: Pool, memory: NegativeMemory | None) -> None:
    """Put the step's global batch into the memory (after the loss used it), when there is one."""
    if memory is not None:
        memory.enqueue(*pool.global_batch)
