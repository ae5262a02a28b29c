"""Negative selection: how one anchor's hinge terms become one number.

Each mode is one function of the same signature, so a new mode is one function here and one
entry in ``NEGATIVE_SELECTION``:

    select(d_ap [A], d_an [A, N], valid [A, N] bool, margin) -> per-anchor loss [A]

``d_ap`` is the squared distance of each anchor to its positive, ``d_an`` to every item of the
pool, ``valid`` marks the items that may serve as that anchor's negatives. An anchor without
any valid negative contributes 0. Everything is vectorised over the [A, N] matrix: no loops
over anchors and no [A, N, N] triplet tensors.
"""

from __future__ import annotations

import torch


def _masked_min(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~mask, float("inf")).min(dim=1).values


def _hinge_at(d_ap: torch.Tensor, d_an: torch.Tensor, has_negative: torch.Tensor, margin: float) -> torch.Tensor:
    # where() rather than multiplying by the mask: inf * 0 would be NaN.
    d_an = torch.where(has_negative, d_an, d_ap)
    return torch.where(has_negative, torch.relu(d_ap - d_an + margin), torch.zeros_like(d_ap))


def hardest_negative(d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """The closest valid negative per anchor (VSE++ "max violation")."""
    return _hinge_at(d_ap, _masked_min(d_an, valid), valid.any(dim=1), margin)


def semi_hard_negative(d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """The closest valid negative strictly farther than the positive (FaceNet); the hardest
    valid negative for anchors that have none farther than their positive."""
    farther = valid & (d_an > d_ap.unsqueeze(1))
    has_farther = farther.any(dim=1)
    chosen = torch.where(has_farther, _masked_min(d_an, farther), _masked_min(d_an, valid))
    return _hinge_at(d_ap, chosen, valid.any(dim=1), margin)


def all_negatives(d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """The hinge averaged over all of the anchor's valid negatives (VSE++ sum, normalised)."""
    hinges = torch.relu(d_ap.unsqueeze(1) - d_an + margin) * valid
    return hinges.sum(dim=1) / valid.sum(dim=1).clamp_min(1)


NEGATIVE_SELECTION = {
    "hardest": hardest_negative,
    "semi_hard": semi_hard_negative,
    "all": all_negatives,
}
