"""The memory's share of every loss when the memory is sharded (``loss.memory_shard``).

Worker ``r`` of ``W`` holds ring rows ``r, r + W, …`` of the memory (`.memory`). Every
worker has the whole global batch (the gather), so each one reduces **all** ``N`` global
anchors against **its** shard — ``N · M / W`` scores, what a replicated memory costs a worker
for its ``N / W`` own anchors — and one collective combines the workers' per-anchor results.
Each anchor's worker then merges them with its part over the batch. Memory rows carry no
gradient, so what crosses the wire per anchor is small and what the loss needs is exact:

- ``hardest`` / ``semi_hard``: each shard's best candidates (value, pool row; `.Candidates`),
  an all-reduce MIN of the values, then of the pool rows that reach them (ties go to the first
  row, as in the replicated pool), then an all-reduce SUM that brings each winning row from its
  owner: ``[kinds × 2 directions × N, D]``.
- ``all``: per anchor the hinge sum, the valid and active counts and the sum of the active
  rows, ``[2 × N, D + 3]`` summed over workers. The hinge sum is the value; its gradient is that
  of ``k·d_ap − Σ_active d(a, m)``, which the count ``k`` and the row sum give exactly.
- InfoNCE: an online log-sum-exp per shard, an all-reduce MAX of the maxima, then a SUM of the
  rescaled sums and of the softmax-weighted row sums ``[2 × N, D + 1]``. The log-sum-exp is the
  value; its gradient (anchor and temperature) is that of ``s · a·μ``, ``μ`` the memory's
  softmax-weighted mean row.

The values equal the replicated memory's, to the order of floating-point sums (tested in
float64 on 2 and 3 gloo workers). Shards of a memory that is still filling may be empty: such
a worker still takes part in every collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .gather import distributed_world
from .memory import NegativeMemory
from .negatives import INF, Candidates
from .pool import NeverNegatives, Pool
from .tiled import _distance_fn, _paired_fn, mine_candidates_tiled, tile_bounds


class MemoryShard:
    """This worker's filled memory rows against all global anchors, both directions: image
    anchors against the memory's texts, text anchors against its images."""

    def __init__(self, pool: Pool, memory: NegativeMemory, chunk: int | None, normalized: bool):
        self.images, self.texts, labels, groups = memory.negatives()
        batch_images, batch_texts, batch_labels, batch_groups = (t.detach() for t in pool.global_batch)
        self.anchors = (batch_images, batch_texts)  # i2t, t2i: the global batch, all N rows
        self.items = (self.texts.to(batch_images), self.images.to(batch_images))
        self.never = NeverNegatives(batch_labels, batch_groups, labels.to(batch_labels.device), groups.to(batch_labels.device))
        self.rows = self.images.shape[0]
        self.chunk = chunk or max(1, self.rows)
        self.normalized = normalized
        self.rank, self.world = memory.rank, memory.world
        self.size, self.batch_rows = memory.size, pool.batch_rows
        # The pool row of each of this worker's slots: memory rows follow the batch, in ring order.
        self.pool_rows = memory.global_rows(self.rows, batch_images.device) + pool.batch_rows
        self.d_ap = _paired_fn(normalized)(batch_images, batch_texts)  # of every global anchor, without gradient

    def tiles(self):
        """The ``(start, stop)`` row ranges of this worker's shard, a tile of ``chunk`` rows at a time."""
        return tile_bounds(self.rows, self.chunk)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if distributed_world()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def memory_candidates(shard: MemoryShard, negatives: str) -> tuple[list[Candidates], list[list[torch.Tensor]]]:
    """Per direction, the memory's `Candidates` of all N global anchors, in pool rows,
    and the winning rows' embeddings ``[N, D]`` per kind (hardest, then beyond for semi_hard)."""
    values, rows = [], []
    for anchors, items in zip(shard.anchors, shard.items):
        [found] = mine_candidates_tiled(anchors, items, shard.d_ap, shard.never, negatives, shard.chunk, shard.normalized)
        kinds = [(found.hardest_value, found.hardest_index)]
        if found.beyond_value is not None:
            kinds.append((found.beyond_value, found.beyond_index))
        for value, index in kinds:
            values.append(value)
            # An empty shard's candidates are +inf at no row: point past the pool, never chosen.
            rows.append(shard.pool_rows[index] if shard.rows else torch.full_like(index, shard.batch_rows + shard.size))
    values = torch.stack(values)
    best = _all_reduce(values.clone(), dist.ReduceOp.MIN)
    # The first pool row that reaches the best value on any worker.
    rows = torch.where(values == best, torch.stack(rows), shard.batch_rows + shard.size)
    rows = _all_reduce(rows, dist.ReduceOp.MIN)
    # Each winning row from its owner: the others add zeros.
    ring = rows - shard.batch_rows
    mine = (ring < shard.size) & (ring % shard.world == shard.rank) & (ring // shard.world < shard.rows)
    slots = torch.where(mine, ring // shard.world, 0)
    kinds_per_direction = len(rows) // 2
    embeddings = torch.stack([
        torch.where(mine[k].unsqueeze(1), shard.items[k // kinds_per_direction][slots[k]], 0.0)
        if shard.rows else torch.zeros_like(shard.anchors[0]) for k in range(len(rows))
    ])
    embeddings = _all_reduce(embeddings)
    candidates, fetched = [], []
    for direction in range(2):
        kinds = range(direction * kinds_per_direction, (direction + 1) * kinds_per_direction)
        parts = [t for k in kinds for t in (best[k], rows[k])]
        candidates.append(Candidates(*parts))
        fetched.append([embeddings[k] for k in kinds])
    return candidates, fetched


def merge_mined(batch: Candidates, memory: Candidates, memory_rows: list[torch.Tensor], anchors: torch.Tensor,
                items: torch.Tensor, batch_rows: int):
    """For one direction: ``(negative embeddings [A, D], has_negative [A])`` of the anchors at
    global rows ``anchors``: the batch's candidates merged with the memory's (batch first in
    pool order). A memory row comes from ``memory_rows`` (detached), a batch row from
    ``items`` (with gradient)."""
    memory = memory.select(anchors)
    memory_rows = [rows.index_select(0, anchors) for rows in memory_rows]
    merged = batch.merge(memory)
    index, has_negative = merged.choose()
    from_memory = index >= batch_rows
    remembered = memory_rows[0]
    if merged.beyond_value is not None:
        remembered = torch.where((merged.beyond_value < 0).unsqueeze(1), memory_rows[1], memory_rows[0])
    negatives = torch.where(from_memory.unsqueeze(1), remembered.to(items),
                            items.index_select(0, torch.where(from_memory, 0, index)))
    return negatives, has_negative


@torch.no_grad()
def memory_hinge_statistics(shard: MemoryShard, margin: float) -> torch.Tensor:
    """``[2, N, D + 3]``: per direction and global anchor, over the whole memory: the hinge sum,
    the valid count, the active count, then the sum of the active rows."""
    distance = _distance_fn(shard.normalized)
    dim = shard.anchors[0].shape[1]
    stats = shard.anchors[0].new_zeros((2, shard.anchors[0].shape[0], dim + 3))
    for start, stop in shard.tiles():
        invalid = shard.never.tile(start, stop)
        for direction, (anchors, items) in enumerate(zip(shard.anchors, shard.items)):
            hinges = (shard.d_ap.unsqueeze(1) + margin - distance(anchors, items[start:stop])).relu_().masked_fill_(invalid, 0.0)
            active = hinges > 0
            stats[direction, :, 0] += hinges.sum(1)
            stats[direction, :, 1] += (~invalid).sum(1)
            stats[direction, :, 2] += active.sum(1)
            stats[direction, :, 3:] += active.to(hinges.dtype) @ items[start:stop]
    return _all_reduce(stats)


def mean_hinge_with_memory(batch_means: torch.Tensor, batch_valid: torch.Tensor, stats: torch.Tensor,
                           anchors: torch.Tensor, d_ap: torch.Tensor, normalized: bool) -> torch.Tensor:
    """One direction's per-anchor mean hinge over batch and memory negatives together.

    ``batch_means [A]``: over the batch's ``batch_valid`` negatives; ``stats [A, D + 3]``: the
    anchors' rows of `memory_hinge_statistics`; ``anchors``, ``d_ap``: with gradient.
    """
    hinge_sum, valid, active, active_rows = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3:]
    # Σ_active (d_ap − d(a, m)) as a function of the anchor, up to constants: its gradient is
    # the memory hinges' gradient; it adds exactly 0 to the value.
    linear = active * d_ap + 2.0 * (anchors * active_rows).sum(1)
    if not normalized:
        linear = linear - active * anchors.pow(2).sum(1)
    memory_sum = hinge_sum + (linear - linear.detach())
    return (batch_means * batch_valid + memory_sum) / (batch_valid + valid).clamp_min(1)


@torch.no_grad()
def memory_log_sum_exp(shard: MemoryShard, scale: torch.Tensor) -> torch.Tensor:
    """``[2, N, D + 1]``: per direction and global anchor, the log-sum-exp of its logits
    ``s · a·m`` over the memory's valid negatives (``−inf`` without any), then the softmax-
    weighted mean memory row ``μ``."""
    count, dim = shard.anchors[0].shape
    peaks = shard.anchors[0].new_full((2, count), -INF)
    for start, stop in shard.tiles():  # pass 1: every anchor's largest logit
        for direction, (anchors, items) in enumerate(zip(shard.anchors, shard.items)):
            logits = _memory_logits(shard, anchors * scale, items, start, stop)
            peaks[direction] = torch.maximum(peaks[direction], logits.amax(1))
    peaks = _all_reduce(peaks, dist.ReduceOp.MAX)
    shift = torch.where(peaks > -INF, peaks, 0.0)  # anchors without memory negatives: sums stay 0
    sums = shard.anchors[0].new_zeros((2, count, dim + 1))
    for start, stop in shard.tiles():  # pass 2: sums at the global maximum, exact without rescaling
        for direction, (anchors, items) in enumerate(zip(shard.anchors, shard.items)):
            weights = (_memory_logits(shard, anchors * scale, items, start, stop) - shift[direction].unsqueeze(1)).exp_()
            sums[direction, :, 0] += weights.sum(1)
            sums[direction, :, 1:] += weights @ items[start:stop]
    sums = _all_reduce(sums)
    total = sums[..., 0]
    log_sum = shift + total.log()  # −inf where the total is 0
    mean_row = sums[..., 1:] / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)
    return torch.cat([log_sum.unsqueeze(-1), mean_row], dim=-1)


def _memory_logits(shard: MemoryShard, scaled: torch.Tensor, items: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return (scaled @ items[start:stop].T).masked_fill_(shard.never.tile(start, stop), -INF)


def infonce_with_memory(batch_terms: torch.Tensor, own: torch.Tensor, memory: torch.Tensor, anchors: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    """One direction's per-anchor InfoNCE over batch and memory: ``batch_terms`` is
    ``lse_batch − own`` (with gradient), ``own`` the own pair's logit, ``memory`` the anchors'
    rows of `memory_log_sum_exp`."""
    log_sum, mean_row = memory[:, 0], memory[:, 1:]
    linear = scale * (anchors * mean_row).sum(1)  # d/da = s·μ, d/ds = a·μ: the memory lse's gradient
    memory_lse = log_sum + (linear - linear.detach())
    return torch.logaddexp(batch_terms + own, memory_lse) - own
