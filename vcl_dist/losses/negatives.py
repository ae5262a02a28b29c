"""Negative selection: which negatives of an anchor enter its hinge, and how.

Inputs, for anchors against a pool: ``distances`` (squared), with the pool along ``pool_dim``
(1: ``[A, P]``; 0: ``[P, A]``, the transposed layout that lets the text→image direction reuse
the image→text matrix without a transposed copy), ``d_ap [A]`` the distance of each anchor to
its positive, and ``valid`` (same layout) marking the items that may be the anchor's
negatives. An anchor without any valid negative contributes 0.

- ``hardest``: the closest valid negative (VSE++ "max violation").
- ``semi_hard``: the closest valid negative strictly farther than the positive (FaceNet); the
  hardest valid negative for anchors that have none farther.
- ``all``: the hinge averaged over all of the anchor's valid negatives (VSE++ sum, normalised).

The first two are *miners*: they pick one negative per anchor without gradient, and the loss
recomputes that one distance from the embeddings, so backward never touches an ``[A, P]``
matrix. ``all`` needs the gradient of every hinge (see `.fused`). No loops over
anchors, no ``[A, P, P]`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INF = float("inf")


@dataclass
class Candidates:
    """What a miner keeps per anchor ``[A]``, to choose from or to merge with candidates from
    more pool rows (tiles, a sharded memory): the hardest valid negative (``hardest_value``
    ``+inf`` when there is none) and, for ``semi_hard``, the closest one beyond the positive
    as the minimum of ``1 / (d_ap − d)`` (negative exactly when one was found; see
    `mine_candidates`). Indices are pool rows. For ``semi_hard`` the hardest value need
    only be right where nothing beyond was found: it is used only there."""

    hardest_value: torch.Tensor
    hardest_index: torch.Tensor
    beyond_value: torch.Tensor | None = None
    beyond_index: torch.Tensor | None = None

    def choose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index [A], has_negative [A])``: semi-hard where found, else the hardest."""
        if self.beyond_value is None:
            return self.hardest_index, self.hardest_value < INF
        found = self.beyond_value < 0
        return torch.where(found, self.beyond_index, self.hardest_index), found | (self.hardest_value < INF)

    def merge(self, later: Candidates) -> Candidates:
        """The better of two candidate sets over disjoint pool rows; ``later`` holds rows after
        this one's in pool order and wins only when strictly better (ties go to the first row,
        as a dense minimum's do)."""
        pairs = [(self.hardest_value, self.hardest_index, later.hardest_value, later.hardest_index)]
        if self.beyond_value is not None:
            pairs.append((self.beyond_value, self.beyond_index, later.beyond_value, later.beyond_index))
        merged = []
        for value, index, later_value, later_index in pairs:
            better = later_value < value
            merged += [torch.where(better, later_value, value), torch.where(better, later_index, index)]
        return Candidates(*merged)

    def select(self, anchors: torch.Tensor) -> Candidates:
        """The candidates of the anchors at positions ``anchors``."""
        return Candidates(*(None if t is None else t.index_select(0, anchors) for t in
                            (self.hardest_value, self.hardest_index, self.beyond_value, self.beyond_index)))


@torch.no_grad()
def mine_candidates(filled: torch.Tensor, d_ap: torch.Tensor, negatives: str, pool_dim: int = 1) -> Candidates:
    """The `Candidates` of each anchor over a distance matrix ``filled``, which holds
    ``+inf`` wherever an item may not be a negative."""
    if negatives == "hardest":
        return Candidates(*filled.min(dim=pool_dim))
    if negatives != "semi_hard":
        raise ValueError(f"{negatives!r} is not a mining mode")
    # The closest item strictly farther than the positive, without a masked copy: over x >
    # d_ap, 1 / (d_ap − x) is negative and smallest for the smallest x; x ≤ d_ap gives a
    # positive value or +inf (x = d_ap), never-negatives (x = inf) give −0.0.
    reciprocal = (d_ap.unsqueeze(pool_dim) - filled).reciprocal_()
    beyond_value, beyond_index = reciprocal.min(dim=pool_dim)
    hardest_value, hardest_index = torch.full_like(beyond_value, INF), torch.zeros_like(beyond_index)
    fallback = (beyond_value >= 0).nonzero().squeeze(1)
    if fallback.numel():
        # Anchors with no farther negative take their hardest one (usually few of them).
        fallback_values, fallback_index = filled.index_select(1 - pool_dim, fallback).min(dim=pool_dim)
        hardest_value[fallback], hardest_index[fallback] = fallback_values, fallback_index
    return Candidates(hardest_value, hardest_index, beyond_value, beyond_index)


def mine_negatives(filled: torch.Tensor, d_ap: torch.Tensor, negatives: str, pool_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [A], has_negative [A])``: the pool row chosen for each anchor.

    ``filled``: squared distances with ``+inf`` wherever an item may not be a negative.
    """
    return mine_candidates(filled, d_ap, negatives, pool_dim).choose()


def hinge(d_ap: torch.Tensor, d_an: torch.Tensor, has_negative: torch.Tensor, margin: float) -> torch.Tensor:
    """The triplet hinge ``max(d_ap − d_an + margin, 0)`` per anchor, ``[A]``; 0 where an anchor has no negative.

    Args:
        d_ap: ``[A]`` squared anchor–positive distances.
        d_an: ``[A]`` squared distances to each anchor's chosen negative.
        has_negative: ``[A]`` whether the anchor has any valid negative.
        margin: the hinge margin.
    """
    # where() rather than a multiplication by the mask: an anchor without negatives has a
    # meaningless d_an, whose gradient must not leak.
    return torch.where(has_negative, torch.relu(d_ap - d_an + margin), torch.zeros_like(d_ap))


def count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``mask.sum(dim)`` for a bool mask, summed as bytes into int32: a bool sum widens every
    entry to int64 first, which costs over ten times more on ``A x P`` masks."""
    return mask.view(torch.uint8).sum(dim=dim, dtype=torch.int32)


def all_negatives(d_ap: torch.Tensor, distances: torch.Tensor, valid: torch.Tensor, margin: float,
                  pool_dim: int = 1) -> torch.Tensor:
    """Per-anchor ``[A]`` mean of the hinge over all valid negatives (differentiable). The
    batch losses use the fused `vcl_dist.losses.fused.mean_hinge_all_negatives`."""
    hinges = (d_ap.unsqueeze(pool_dim) + margin - distances).relu() * valid
    return hinges.sum(dim=pool_dim) / valid.sum(dim=pool_dim).clamp_min(1)


def _mined(negatives: str):
    def select(d_ap, distances, valid, margin, pool_dim=1):
        index, has_negative = mine_negatives(distances.masked_fill(~valid, INF), d_ap, negatives, pool_dim)
        d_an = distances.gather(pool_dim, index.unsqueeze(pool_dim)).squeeze(pool_dim)
        return hinge(d_ap, d_an, has_negative, margin)

    select.__name__ = f"{negatives}_negative"
    select.__doc__ = f"Per-anchor ``[A]`` hinge at the {negatives.replace('_', '-')} negative (from a distance matrix)."
    return select


hardest_negative = _mined("hardest")
semi_hard_negative = _mined("semi_hard")

# The per-anchor loss of each mode from a distance matrix and a validity mask: the plain
# interface (VCRL's class terms use it); the batch losses use the cheaper in-place route.
NEGATIVE_SELECTION = {
    "hardest": hardest_negative,
    "semi_hard": semi_hard_negative,
    "all": all_negatives,
}
MINED_MODES = ("hardest", "semi_hard")
