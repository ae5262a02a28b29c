"""The sigmoid loss's per-anchor sums, a tile of captions at a time in forward and backward.

``terms[i] = Σ_j valid_ij · softplus(x_ij)`` with ``x_ij = −z_ij · l_ij``, ``l_ij = s · a_i·t_j + b``;
``z`` is +1 at the anchor's own caption and −1 elsewhere, and ``valid`` leaves out the
never-negatives (but not the own caption). ``∂ softplus(x)/∂l = −z · σ(x)``, so a tile's
gradient needs only ``σ(x)``: one tile keeps it from forward for backward (the dense loss: one
``[A, P]`` matrix, as InfoNCE keeps its probabilities); several tiles recompute each one in
backward, so that only one ``[A, chunk]`` tile exists at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TileMask:
    """Which entries of a tile of pool rows ``start:stop`` count, and where the own captions are."""

    def __init__(self, never_negatives, positive: torch.Tensor | None):
        self.never_negatives, self.positive = never_negatives, positive

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(valid [A, stop − start], (rows, columns) of the own captions inside the tile)``."""
        valid = self.never_negatives.tile(start, stop).logical_not_()
        if self.positive is None:
            empty = torch.empty(0, dtype=torch.long, device=valid.device)
            return valid, (empty, empty)
        rows = torch.arange(valid.shape[0], device=valid.device)
        inside = (self.positive >= start) & (self.positive < stop)
        own = (rows[inside], self.positive[inside] - start)
        valid[own] = True
        return valid, own


def _signed_logits(anchors, items, scale, bias, own) -> torch.Tensor:
    """``x = −z · l`` of the tile: ``l`` at the negatives, ``−l`` at the own captions."""
    x = (anchors @ items.T).mul_(scale).add_(bias)
    x[own] = -x[own]
    return x


def tile_terms(anchors, items, scale, bias, valid, own, keep_weight: bool = False):
    """``[A]``: the tile's sums; with ``keep_weight`` also ``∂terms_i/∂l_ij`` ``[A, m]`` (for backward)."""
    x = _signed_logits(anchors, items, scale, bias, own)
    terms = F.softplus(x).masked_fill_(~valid, 0).sum(1)
    return (terms, _weight(x, valid, own)) if keep_weight else terms


def _weight(x, valid, own) -> torch.Tensor:
    weight = torch.sigmoid_(x).masked_fill_(~valid, 0)  # x is not needed after this
    weight[own] = -weight[own]
    return weight


def tile_weight(anchors, items, scale, bias, valid, own) -> torch.Tensor:
    """``∂terms_i/∂l_ij`` of the tile, recomputed."""
    return _weight(_signed_logits(anchors, items, scale, bias, own), valid, own)


def add_tile_gradients(g, anchors, tile, scale, d_anchors, d_scale, d_bias) -> torch.Tensor:
    """Given ``g = ∂loss/∂l`` of a tile ``[A, m]``: add to the anchors', the scale's and the bias's
    gradients in place; returns the tile's captions' gradient ``[m, D]``. (``∂l/∂s = a·t``, so
    the scale's gradient is ``Σ a ⊙ (g t)``, from the product the anchors' gradient needs anyway.)"""
    g_items = g @ tile
    d_anchors.add_(scale * g_items)
    d_scale += (g_items * anchors).sum()
    d_bias += g.sum()
    return scale * (g.T @ anchors)


class _SigmoidTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, items, scale, bias, mask: TileMask, chunk: int):
        rows = items.shape[0]
        ctx.mask, ctx.chunk, ctx.weight = mask, chunk, None
        if chunk >= rows:  # one tile: keep its weight for backward
            terms, ctx.weight = tile_terms(anchors, items, scale, bias, *mask(0, rows), keep_weight=True)
        else:
            terms = anchors.new_zeros(anchors.shape[0])
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                terms += tile_terms(anchors, items[start:stop], scale, bias, *mask(start, stop))
        ctx.save_for_backward(anchors, items, scale, bias)
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        anchors, items, scale, bias = ctx.saved_tensors
        d_anchors, d_items = torch.zeros_like(anchors), torch.empty_like(items)
        d_scale, d_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        rows = items.shape[0]
        for start in range(0, rows, ctx.chunk):
            stop = min(start + ctx.chunk, rows)
            tile = items[start:stop]
            weight = ctx.weight if ctx.weight is not None else tile_weight(anchors, tile, scale, bias, *ctx.mask(start, stop))
            g = weight.mul_(grad_terms[:, None])
            d_items[start:stop] = add_tile_gradients(g, anchors, tile, scale, d_anchors, d_scale, d_bias)
        ctx.weight = None
        return d_anchors, d_items, d_scale, d_bias, None, None


def sigmoid_terms(anchors, items, scale, bias, positive, never_negatives, chunk_size: int | None) -> torch.Tensor:
    """``[A]``: each anchor's sum over the pool ``items`` (rows ``positive`` its own captions),
    in tiles of ``chunk_size`` captions (the whole pool in one tile without it)."""
    chunk = chunk_size or max(1, items.shape[0])
    return _SigmoidTerms.apply(anchors, items, scale, bias, TileMask(never_negatives, positive), chunk)
