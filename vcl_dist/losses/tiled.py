"""The losses over a pool of any size: the ``[A, P]`` score matrix is visited in tiles of
``chunk`` pool rows and never stored, in forward or in backward (``loss.chunk_size``).

The most any step holds is one ``[A, chunk]`` tile of scores and its mask, built from the label
and group vectors (`vcl_dist.losses.pool.NeverNegatives`):

- ``hardest``: a running (value, index) minimum of the masked distances over the tiles.
- ``semi_hard``: a running minimum of ``1 / (d_ap − d)`` (negative exactly for the items beyond
  the positive, smallest for the closest of them; see `.negatives`) beside the running
  hardest, which serves anchors with nothing beyond their positive.
  Both miners run without gradient; the loss then recomputes the two chosen distances from the
  embeddings, as the dense path does, so backward costs ``O(A·D)``.
- ``all``: running hinge sums, valid and active counts; backward recomputes each tile's active
  set and accumulates the anchors' gradient and the tile's rows of the items' gradient.
- InfoNCE: an online log-sum-exp (a running maximum and a rescaled running sum, the merge of
  Inf-CL / flash attention); backward recomputes each tile's probabilities from the saved
  log-sum-exp.

Layouts (``pool_dims``) as in `vcl_dist.losses.pool.direction_inputs`: ``(1,)`` is one
direction, anchors along a tile's rows; ``(1, 0)``, when the anchors are the whole batch and
there is no memory, serves both directions from one tile: image anchors along its rows, and
along its columns the text anchors of rows ``start:stop``, each of which sees its whole
column (every image) in that one tile — one matmul per tile for both directions, as the dense
path does.

Values and gradients are those of the dense paths (tested in float64); only the order of the
floating-point sums differs.
"""

from __future__ import annotations

import torch

from .distances import (
    paired_squared_distances,
    paired_squared_distances_normalized,
    squared_distances,
    squared_distances_normalized,
)
from .fused import _distance_backward
from .negatives import INF, Candidates
from .pool import NeverNegatives


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``chunk_size`` itself when it is a positive int or None; ValueError otherwise."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def tile_bounds(total: int, chunk: int):
    """``(start, stop)`` of each tile of ``chunk`` rows over ``total`` rows (the last may be short)."""
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def _distance_fn(normalized: bool):
    return squared_distances_normalized if normalized else squared_distances


def _paired_fn(normalized: bool):
    return paired_squared_distances_normalized if normalized else paired_squared_distances


def _anchor_axis(values: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """A per-anchor vector laid along a tile: ``[A, 1]`` for rows (dim 1), ``[1, stop − start]``
    for the column anchors of rows ``start:stop`` (dim 0)."""
    return values.unsqueeze(1) if dim == 1 else values[start:stop].unsqueeze(0)


@torch.no_grad()
def mine_candidates_tiled(anchors, items, d_ap, never: NeverNegatives, negatives: str, chunk: int, normalized: bool,
                          pool_dims=(1,)) -> list[Candidates]:
    """For each layout of ``pool_dims``, the `vcl_dist.losses.negatives.Candidates` of
    the distances of ``anchors`` to ``items``, one tile at a time; the hardest value is kept for
    every anchor. Ties go to the first row, as a dense minimum's do."""
    if negatives not in ("hardest", "semi_hard"):
        raise ValueError(f"{negatives!r} is not a mining mode")
    distance = _distance_fn(normalized)
    count = anchors.shape[0]
    # Per layout: the hardest (value, index) and, for semi_hard, the closest beyond the positive.
    hardest = [(anchors.new_full((count,), INF), torch.zeros(count, dtype=torch.long, device=anchors.device))
               for _ in pool_dims]
    beyond = [(value.clone(), index.clone()) for value, index in hardest]
    for start, stop in tile_bounds(items.shape[0], chunk):
        filled = distance(anchors, items[start:stop]).masked_fill_(never.tile(start, stop), INF)
        for layout, dim in enumerate(pool_dims):
            candidates = [(hardest, filled)]
            if negatives == "semi_hard":
                reciprocal = (_anchor_axis(d_ap, dim, start, stop) - filled).reciprocal_()
                candidates.append((beyond, reciprocal))
            for best, scores in candidates:
                value, index = scores.min(dim=dim)
                if dim == 0:  # a column anchor sees all of its items in this tile
                    best[layout][0][start:stop], best[layout][1][start:stop] = value, index
                    continue
                better = value < best[layout][0]
                best[layout] = (torch.where(better, value, best[layout][0]), torch.where(better, index + start, best[layout][1]))
    if negatives == "hardest":
        return [Candidates(*best) for best in hardest]
    return [Candidates(*best_hardest, *best_beyond) for best_hardest, best_beyond in zip(hardest, beyond)]


def mine_negatives_tiled(anchors, items, d_ap, never: NeverNegatives, negatives: str, chunk: int, normalized: bool,
                         pool_dims=(1,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each layout of ``pool_dims``, ``(index [A], has_negative [A])``: what
    `vcl_dist.losses.negatives.mine_negatives` picks, one tile at a time."""
    return [found.choose() for found in mine_candidates_tiled(anchors, items, d_ap, never, negatives, chunk, normalized,
                                                               pool_dims)]


def _paired_backward(grad_ap, anchors, partners, normalized: bool):
    """Gradients of ``anchors`` and ``partners`` from the gradient of their row-by-row squared
    distances (``2 − 2·a·p`` when normalised, ``|a − p|²`` otherwise)."""
    if normalized:
        return partners * (-2.0 * grad_ap).unsqueeze(1), anchors * (-2.0 * grad_ap).unsqueeze(1)
    difference = (anchors - partners) * (2.0 * grad_ap).unsqueeze(1)
    return difference, -difference


def _accumulate(total: torch.Tensor, dim: int, start: int, stop: int, tile_values: torch.Tensor) -> None:
    """Add a tile's per-anchor sums: all anchors for rows (dim 1), anchors ``start:stop`` for columns."""
    if dim == 1:
        total += tile_values
    else:
        total[start:stop] += tile_values


class _TiledMeanHinge(torch.autograd.Function):
    """The mean hinge over all valid negatives, tiled.

    Its gradient is linear in the upstream gradient of each anchor's term, and every loss here
    gives all anchors the same one (a sum times a weight). So forward also accumulates, tile by
    tile, the gradient for an upstream gradient of 1 everywhere — two more matmuls per tile, on
    the tile it has just computed — and backward scales it. That is the dense path's three
    matmuls per score, not four (a recompute). An upstream gradient that is not uniform (some
    other use of the terms) takes the general route: recompute each tile in backward.
    """

    @staticmethod
    def forward(ctx, anchors, items, positive, never, margin, normalized, chunk, pool_dims):
        anchors_, items_ = anchors.detach(), items.detach()
        distance = _distance_fn(normalized)
        d_ap = _paired_fn(normalized)(anchors_, items_.index_select(0, positive))
        count = anchors_.shape[0]
        # Valid negatives per anchor, known before the tiles: the eager gradient needs 1/count.
        valid = (items_.shape[0] - never.counts()).clamp_min_(1).to(anchors_.dtype)
        # With two layouts the anchors are the pool, and the column anchors' counts are the same.
        coefficients = [-1.0 / valid for _ in pool_dims]
        sums = [anchors_.new_zeros(count) for _ in pool_dims]
        # Active negatives per anchor, summed from the 0/1 tiles in float64: exact for any pool.
        active = [anchors_.new_zeros(count, dtype=torch.float64) for _ in pool_dims]
        eager = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if eager:
            grad_anchors, grad_items = torch.zeros_like(anchors_), torch.zeros_like(items_)
        for start, stop in tile_bounds(items_.shape[0], chunk):
            invalid = never.tile(start, stop)
            distances = distance(anchors_, items_[start:stop])
            grad_distances = None
            for layout, dim in enumerate(pool_dims):
                last = layout == len(pool_dims) - 1  # the last layout may overwrite the distances
                hinges = (distances if last else distances.clone()).sub_(_anchor_axis(d_ap, dim, start, stop) + margin)
                hinges.neg_().relu_().masked_fill_(invalid, 0.0)
                _accumulate(sums[layout], dim, start, stop, hinges.sum(dim=dim))
                active_set = hinges.sign_()  # in place: 1 on the active set, 0 elsewhere
                _accumulate(active[layout], dim, start, stop, active_set.sum(dim=dim))
                if eager:  # d hinge / d d_an = −1 on the active set, times the anchor's 1/count
                    term = active_set.mul_(_anchor_axis(coefficients[layout], dim, start, stop))
                    grad_distances = term if grad_distances is None else grad_distances.add_(term)
            if eager:
                tile_anchors, tile_rows = _distance_backward(grad_distances, anchors_, items_[start:stop], normalized)
                grad_anchors += tile_anchors
                grad_items[start:stop] += tile_rows
        counts = [valid for _ in pool_dims]
        saved = (anchors, items, positive, d_ap, valid, *active)
        if eager:
            # The d_ap part: + 1/count per active negative, summed (see _finish_gradients).
            saved += _finish_gradients(grad_anchors, grad_items, [-c for c in coefficients], active, anchors_, items_,
                                       positive, normalized)
        ctx.save_for_backward(*saved)
        ctx.never, ctx.margin, ctx.normalized, ctx.chunk, ctx.pool_dims = never, margin, normalized, chunk, pool_dims
        return torch.stack([total / c for total, c in zip(sums, counts)])

    @staticmethod
    def backward(ctx, grad):
        anchors, items, positive, d_ap, valid, *rest = ctx.saved_tensors
        layouts = len(ctx.pool_dims)
        active = rest[:layouts]
        if len(rest) > layouts and bool((grad == grad.reshape(-1)[0]).all()):
            grad_anchors, grad_items = rest[layouts:]
            scale = grad.reshape(-1)[0]
            return grad_anchors * scale, grad_items * scale, None, None, None, None, None, None
        distance = _distance_fn(ctx.normalized)
        coefficients = [grad[layout] / valid for layout in range(layouts)]
        grad_anchors, grad_items = torch.zeros_like(anchors), torch.zeros_like(items)
        for start, stop in tile_bounds(items.shape[0], ctx.chunk):
            tile = items[start:stop]
            distances = distance(anchors, tile)
            valid_tile = ~ctx.never.tile(start, stop)
            grad_distances = None
            for layout, dim in enumerate(ctx.pool_dims):
                active_set = (_anchor_axis(d_ap, dim, start, stop) + ctx.margin - distances > 0).logical_and_(valid_tile)
                term = active_set.to(anchors.dtype).mul_(-_anchor_axis(coefficients[layout], dim, start, stop))
                grad_distances = term if grad_distances is None else grad_distances.add_(term)
            tile_anchors, tile_rows = _distance_backward(grad_distances, anchors, tile, ctx.normalized)
            grad_anchors += tile_anchors
            grad_items[start:stop] += tile_rows
        _finish_gradients(grad_anchors, grad_items, coefficients, active, anchors, items, positive, ctx.normalized)
        return grad_anchors, grad_items, None, None, None, None, None, None


def _finish_gradients(grad_anchors, grad_items, coefficients, active, anchors, items, positive, normalized: bool):
    """Add the d_ap part of the hinges' gradient: ``+coefficient`` per active negative, summed.
    Every layout's anchor a has the pair (anchors[a], items[positive[a]]): with two layouts the
    anchors are the batch and positive[a] = a, so both directions' d_ap are that pair."""
    grad_ap = sum(c * a for c, a in zip(coefficients, active)).to(anchors.dtype)
    from_positive, to_positive = _paired_backward(grad_ap, anchors, items.index_select(0, positive), normalized)
    grad_anchors += from_positive
    grad_items.index_add_(0, positive, to_positive)
    return grad_anchors, grad_items


def mean_hinge_all_negatives_tiled(anchors, items, positive, never: NeverNegatives, margin: float, normalized: bool,
                                   chunk: int, pool_dims=(1,)) -> torch.Tensor:
    """``[len(pool_dims), A]``: each anchor's hinge ``max(d_ap − d_an + margin, 0)`` averaged
    over its valid negatives (0 without any), a tile of ``chunk`` items at a time."""
    return _TiledMeanHinge.apply(anchors, items, positive, never, margin, normalized, chunk, tuple(pool_dims))


class _TiledInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, items, scale, positive, never, chunk, pool_dims):
        anchors_, items_, scale_ = anchors.detach(), items.detach(), scale.detach()
        scaled = anchors_ * scale_
        count = anchors_.shape[0]
        peak = [anchors_.new_full((count,), -INF) for _ in pool_dims]
        total = [anchors_.new_zeros(count) for _ in pool_dims]
        for start, stop in tile_bounds(items_.shape[0], chunk):
            logits = _masked_logits(scaled, items_, positive, never, start, stop)
            for layout, dim in enumerate(pool_dims):
                if dim == 0:  # the column anchors' whole softmax is in this tile
                    peak[layout][start:stop] = logits.amax(dim=0)
                    total[layout][start:stop] = (logits - peak[layout][start:stop]).exp_().sum(dim=0)
                    continue
                new_peak = torch.maximum(peak[layout], logits.amax(dim=1))
                # Rescale the running sum to the new maximum. Before an anchor's first finite logit
                # its peak is −inf and its sum 0: shift by 0 then (−inf − −inf would be NaN). The
                # own pair, never excluded, makes every final peak finite.
                shift = torch.where(new_peak > -INF, new_peak, 0.0)
                tile_sum = (logits - shift.unsqueeze(1)).exp_().sum(dim=1)
                total[layout] = total[layout] * (peak[layout] - shift).exp() + tile_sum
                peak[layout] = new_peak
        log_sums = [p + t.log() for p, t in zip(peak, total)]
        own = (scaled * items_.index_select(0, positive)).sum(1)
        ctx.save_for_backward(anchors, items, scale, positive, *log_sums)
        ctx.never, ctx.chunk, ctx.pool_dims = never, chunk, pool_dims
        return torch.stack([log_sum - own for log_sum in log_sums])

    @staticmethod
    def backward(ctx, grad):
        anchors, items, scale, positive, *log_sums = ctx.saved_tensors
        scaled = anchors * scale
        grad_anchors_unscaled, grad_items = torch.zeros_like(anchors), torch.zeros_like(items)
        for start, stop in tile_bounds(items.shape[0], ctx.chunk):
            logits = _masked_logits(scaled, items, positive, ctx.never, start, stop)
            grad_logits = None
            for layout, dim in enumerate(ctx.pool_dims):
                # d/d logits of log-sum-exp: the softmax probabilities, times the upstream gradient.
                probabilities = (logits - _anchor_axis(log_sums[layout], dim, start, stop)).exp_()
                term = probabilities.mul_(_anchor_axis(grad[layout], dim, start, stop))
                grad_logits = term if grad_logits is None else grad_logits.add_(term)
            grad_anchors_unscaled += grad_logits @ items[start:stop]
            grad_items[start:stop] += grad_logits.T @ anchors
        # The own pair's logit, minus in every layout (the same pair in both, see _TiledMeanHinge).
        own_grad = grad.sum(0).unsqueeze(1)
        grad_anchors_unscaled -= items.index_select(0, positive) * own_grad
        grad_items.index_add_(0, positive, -anchors * own_grad)
        # logits = s · a·p: d/ds is Σ grad_logits · a·p = Σ_rows (grad_logits @ items) · a.
        grad_scale = (grad_anchors_unscaled * anchors).sum()
        return grad_anchors_unscaled.mul_(scale), grad_items.mul_(scale), grad_scale, None, None, None, None


def _masked_logits(scaled, items, positive, never: NeverNegatives, start: int, stop: int) -> torch.Tensor:
    """``[A, stop − start]`` logits of one tile, ``−inf`` where the item is a never-negative
    other than the anchor's own pair (which stays in the softmax)."""
    excluded = never.tile(start, stop)
    rows = torch.arange(start, stop, device=positive.device)
    excluded &= rows.unsqueeze(0) != positive.unsqueeze(1)
    return (scaled @ items[start:stop].T).masked_fill_(excluded, -INF)


def infonce_terms_tiled(anchors, items, scale, positive, never: NeverNegatives, chunk: int, pool_dims=(1,)) -> torch.Tensor:
    """``[len(pool_dims), A]``: each anchor's ``−log softmax(s · anchors @ itemsᵀ)`` at its own
    pair over the items that are not never-negatives, a tile of ``chunk`` items at a time."""
    return _TiledInfoNCE.apply(anchors, items, scale, positive, never, chunk, tuple(pool_dims))
