"""The sigmoid loss's per-anchor sums, a tile of captions at a time in forward and backward.

``terms[i] = Σ_j valid_ij · softplus(−z_ij · l_ij)`` with ``l_ij = s · a_i·t_j + b``; ``z`` is +1
at the anchor's own caption and −1 elsewhere; ``valid`` leaves out the never-negatives (but not
the own caption). Forward keeps no score matrix; backward recomputes each tile and uses
``∂ softplus(−z·l)/∂l = −z · σ(−z·l)``. Memory: one ``[A, chunk]`` tile at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TileMask:
    """Signs and validity of a tile of pool rows ``start:stop`` for every anchor."""

    def __init__(self, never_negatives, positive: torch.Tensor | None):
        self.never_negatives, self.positive = never_negatives, positive

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, valid)``, both ``[A, stop − start]``."""
        invalid = self.never_negatives.tile(start, stop)
        own = torch.zeros_like(invalid)
        if self.positive is not None:
            rows = torch.arange(own.shape[0], device=own.device)
            inside = (self.positive >= start) & (self.positive < stop)
            own[rows[inside], self.positive[inside] - start] = True
        z = torch.where(own, 1.0, -1.0).to(torch.get_default_dtype())
        return z, ~invalid | own


def tile_terms(anchors, items, scale, bias, z, valid) -> torch.Tensor:
    """``[A]``: the tile's sums (no graph)."""
    logits = scale * (anchors @ items.T) + bias
    return (F.softplus(-z.to(logits.dtype) * logits) * valid).sum(1)


def tile_gradient(anchors, items, scale, bias, z, valid, grad_terms) -> torch.Tensor:
    """``[A, m]``: ∂loss/∂logits of the tile, given ∂loss/∂terms ``grad_terms [A]``."""
    logits = scale * (anchors @ items.T) + bias
    z = z.to(logits.dtype)
    return grad_terms[:, None] * (-z) * torch.sigmoid(-z * logits) * valid


class _SigmoidTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, items, scale, bias, mask: TileMask, chunk: int):
        ctx.save_for_backward(anchors, items, scale, bias)
        ctx.mask, ctx.chunk = mask, chunk
        terms = anchors.new_zeros(anchors.shape[0])
        for start in range(0, items.shape[0], chunk):
            stop = min(start + chunk, items.shape[0])
            terms += tile_terms(anchors, items[start:stop], scale, bias, *mask(start, stop))
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        anchors, items, scale, bias = ctx.saved_tensors
        d_anchors, d_items = torch.zeros_like(anchors), torch.zeros_like(items)
        d_scale, d_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        for start in range(0, items.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, items.shape[0])
            tile = items[start:stop]
            g = tile_gradient(anchors, tile, scale, bias, *ctx.mask(start, stop), grad_terms)
            d_anchors += scale * (g @ tile)
            d_items[start:stop] = scale * (g.T @ anchors)
            d_scale += (g * (anchors @ tile.T)).sum()
            d_bias += g.sum()
        return d_anchors, d_items, d_scale, d_bias, None, None


def sigmoid_terms(anchors, items, scale, bias, positive, never_negatives, chunk_size: int | None) -> torch.Tensor:
    """``[A]``: each anchor's sum over the pool ``items`` (rows ``positive`` its own captions),
    in tiles of ``chunk_size`` captions (the whole pool in one tile without it)."""
    chunk = chunk_size or max(1, items.shape[0])
    return _SigmoidTerms.apply(anchors, items, scale, bias, TileMask(never_negatives, positive), chunk)
