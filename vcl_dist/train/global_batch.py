"""Which shares of each epoch's rows a worker trains on: the planned global batch kept when an
elastic group runs with fewer workers than planned (``train.keep_global_batch``).

An epoch's rows are dealt into shares (`vcl_dist.data.epoch_plan`), one per worker, and
each step takes one local batch from every share. Without the setting the shares follow the
group's size: fewer workers, a smaller global batch (and a learning rate scaled with it). With
it the rows stay dealt into ``train.num_workers`` shares whatever the group's size, and a worker
of a smaller group trains on the shares of the missing workers too — share ``s`` on worker
``s mod W`` — one micro-batch of the planned local batch each, with cached embedding gradients
(`.grad_cache`). Every step then sees the planned global batch, on the same rows and with
every micro-batch the size of a planned worker's batch, so its loss and gradient are those of
the full group (to float rounding: the pool's rows are summed in another order), BatchNorm
statistics included, and the learning rate stays as planned.
"""

from __future__ import annotations


def planned_shares(planned: int, world: int, keep_global_batch: bool) -> int:
    """How many shares an epoch's rows are dealt into."""
    return max(planned, world) if keep_global_batch else world


def worker_shares(rank: int, world: int, shares: int) -> list[int]:
    """The shares worker ``rank`` of ``world`` trains on, in order."""
    return list(range(rank, shares, world))
