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
matrix. ``all`` needs the gradient of every hinge. No loops over anchors, no ``[A, P, P]``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def mine_negatives(distances: torch.Tensor, d_ap: torch.Tensor, valid: torch.Tensor, negatives: str,
                   pool_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [A], has_negative [A])``: the pool row chosen for each anchor."""
    d_ap = d_ap.unsqueeze(pool_dim)
    if negatives == "hardest":
        candidates = valid
    elif negatives == "semi_hard":
        farther = valid & (distances > d_ap)
        has_farther = farther.any(dim=pool_dim, keepdim=True)
        candidates = torch.where(has_farther, farther, valid)
    else:
        raise ValueError(f"{negatives!r} is not a mining mode")
    index = distances.masked_fill(~candidates, float("inf")).argmin(dim=pool_dim)
    return index, valid.any(dim=pool_dim)


def hinge(d_ap: torch.Tensor, d_an: torch.Tensor, has_negative: torch.Tensor, margin: float) -> torch.Tensor:
    # where() rather than a multiplication by the mask: an anchor without negatives has a
    # meaningless d_an, whose gradient must not leak.
    return torch.where(has_negative, torch.relu(d_ap - d_an + margin), torch.zeros_like(d_ap))


def all_negatives(d_ap: torch.Tensor, distances: torch.Tensor, valid: torch.Tensor, margin: float,
                  pool_dim: int = 1) -> torch.Tensor:
    """Per-anchor ``[A]`` mean of the hinge over all valid negatives (differentiable)."""
    hinges = (d_ap.unsqueeze(pool_dim) + margin - distances).relu_() * valid
    return hinges.sum(dim=pool_dim) / valid.sum(dim=pool_dim).clamp_min(1)


def _mined(negatives: str):
    def select(d_ap, distances, valid, margin, pool_dim=1):
        index, has_negative = mine_negatives(distances, d_ap, valid, negatives, pool_dim)
        d_an = distances.gather(pool_dim, index.unsqueeze(pool_dim)).squeeze(pool_dim)
        return hinge(d_ap, d_an, has_negative, margin)

    select.__name__ = f"{negatives}_negative"
    select.__doc__ = f"Per-anchor ``[A]`` hinge at the {negatives.replace('_', '-')} negative (from a distance matrix)."
    return select


hardest_negative = _mined("hardest")
semi_hard_negative = _mined("semi_hard")

# The per-anchor loss of each mode from a full distance matrix; the losses use the cheaper
# mining route for the first two (same values and gradients).
NEGATIVE_SELECTION = {
    "hardest": hardest_negative,
    "semi_hard": semi_hard_negative,
    "all": all_negatives,
}
MINED_MODES = ("hardest", "semi_hard")
