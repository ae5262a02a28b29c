"""Pairwise squared distances, each from one fused matmul."""

from __future__ import annotations

import torch


def squared_distances_normalized(anchors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[A, D] x [P, D] -> [A, P]`` of unit vectors: ``2 − 2·cos``, as one addmm."""
    return torch.addmm(anchors.new_tensor(2.0), anchors, items.T, alpha=-2.0)


def squared_distances(anchors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[A, D] x [P, D] -> [A, P]`` squared Euclidean distances ``|a|² + |p|² − 2·a·p``.

    One addmm and one in-place add; rounding can leave ``−1e-7``-sized values for nearly
    equal vectors, which no loss here minds (there is no square root).
    """
    distances = torch.addmm(items.pow(2).sum(1).unsqueeze(0), anchors, items.T, alpha=-2.0)
    return distances.add_(anchors.pow(2).sum(1, keepdim=True))


def paired_squared_distances_normalized(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, D], [A, D] -> [A]``: row-by-row ``2 − 2·cos`` of unit vectors."""
    return 2.0 - 2.0 * (a * b).sum(1)


def paired_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, D], [A, D] -> [A]``: row-by-row squared Euclidean distances."""
    return (a - b).pow(2).sum(1)
