"""The sigmoid loss over a ring of workers: images stay, caption blocks travel.

Worker ``r`` holds its image anchors and, at step ``k``, the caption block of worker
``r − k`` (with its labels and image groups); it adds its anchors' terms against that block
(`.sigmoid_terms`) while the block goes on to worker ``r + 1`` and the next arrives from
``r − 1``. After ``W − 1`` passes every anchor has met every caption. Backward sends the blocks
round again, each with an accumulator of its gradient that every worker adds to; one more pass
brings each accumulator home. Per worker: at most two caption blocks and one score tile of
``[n_local, chunk]`` at a time, never the global pool; traffic: ``W − 1`` passes of a block
(captions, labels, groups) forward, ``W − 1`` of a block with its gradient and one of the
gradient alone backward.

Point-to-point through ``torch.distributed.batch_isend_irecv`` on the default group: gloo on
CPUs, nccl on GPUs. The next block's transfer is posted before the current block's tile work,
so the two overlap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .gather import distributed_world
from .pool import NeverNegatives
from .sigmoid_terms import TileMask, add_tile_gradients, tile_terms, tile_weight


def _pass_on(tensors: list[torch.Tensor], incoming_rows: int, rank: int, world: int) -> tuple[list, Transfer]:
    """Post: send ``tensors`` to the next worker, receive the previous worker's (of
    ``incoming_rows`` rows). Returns the receive buffers and a `Transfer` to wait on."""
    buffers = [t.new_empty((incoming_rows, *t.shape[1:])) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), (rank + 1) % world) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, (rank - 1) % world) for b in buffers]
    return buffers, Transfer(ops, dist.batch_isend_irecv(ops))


class Transfer:
    """Posted sends and receives; holds their tensors until `wait` returns."""

    def __init__(self, ops: list, requests: list):
        self.ops, self.requests = ops, requests

    def wait(self) -> None:
        """Block until every send and receive of this block's exchange has completed."""
        for request in self.requests:
            request.wait()


def _tiles(mask: TileMask, rows: int, chunk: int):
    """``(start, stop, (valid, own))`` of each tile of a block of ``rows`` captions."""
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        yield start, stop, mask(start, stop)


class _RingSigmoidTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, texts, labels, groups, scale, bias, sizes: list[int], chunk: int | None):
        rank, world = distributed_world()
        ctx.save_for_backward(images, texts, labels, groups, scale, bias)
        ctx.sizes, ctx.chunk = sizes, chunk
        terms = images.new_zeros(images.shape[0])
        block = [texts, labels, groups]
        for k in range(world):
            owner = (rank - k) % world
            pending = _pass_on(block, sizes[(owner - 1) % world], rank, world) if k < world - 1 else None
            mask = _mask(labels, groups, block, owner == rank)
            step = chunk or max(1, block[0].shape[0])
            for start, stop, (valid, own) in _tiles(mask, block[0].shape[0], step):
                terms += tile_terms(images, block[0][start:stop], scale, bias, valid, own)
            if pending is not None:
                block, transfer = pending
                transfer.wait()
        return terms

    @staticmethod
    def backward(ctx, grad_terms):
        images, texts, labels, groups, scale, bias = ctx.saved_tensors
        rank, world = distributed_world()
        sizes = ctx.sizes
        d_images = torch.zeros_like(images)
        d_scale, d_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        block = [texts, labels, groups, torch.zeros_like(texts)]  # the last: the block's gradient so far
        for k in range(world):
            owner = (rank - k) % world
            mask = _mask(labels, groups, block, owner == rank)
            step = ctx.chunk or max(1, block[0].shape[0])
            for start, stop, (valid, own) in _tiles(mask, block[0].shape[0], step):
                tile = block[0][start:stop]
                g = tile_weight(images, tile, scale, bias, valid, own).mul_(grad_terms[:, None])
                block[3][start:stop] += add_tile_gradients(g, images, tile, scale, d_images, d_scale, d_bias)
            if k < world - 1:  # on to the next worker: the block and its gradient so far
                block, transfer = _pass_on(block, sizes[(owner - 1) % world], rank, world)
            else:  # the last pass brings every block's gradient home, this worker's among them
                (d_texts,), transfer = _pass_on(block[3:], sizes[rank], rank, world)
            transfer.wait()
        return d_images, d_texts, None, None, d_scale, d_bias, None, None


def _mask(anchor_labels, anchor_groups, block, own_block: bool) -> TileMask:
    """Which pairs count against a travelling block: the own caption is only in the own block."""
    never = NeverNegatives(anchor_labels, anchor_groups, block[1], block[2])
    positive = torch.arange(anchor_labels.shape[0], device=anchor_labels.device) if own_block else None
    return TileMask(never, positive)


def ring_sigmoid_terms(images, texts, labels, groups, scale, bias, sizes: list[int], chunk_size: int | None) -> torch.Tensor:
    """``[n_local]``: each local image anchor's sum over every worker's captions, by the ring.
    ``sizes``: every worker's rows (`vcl_dist.losses.gather.gather_sizes`)."""
    return _RingSigmoidTerms.apply(images, texts, labels, groups, scale, bias, list(sizes), chunk_size)
