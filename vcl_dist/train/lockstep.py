"""Lock-step batches: every worker takes a step only while every worker has a batch.

Free of Ray, so that it can be tested with plain torch.distributed processes.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist

from ..losses.gather import distributed_world, host_group
from ..runtime.step_phases import PhaseClock, phase
from .data_quality import BadDataError

MIN_ROWS_PER_STEP = 2


def lockstep(batches: Iterator, waits: list[float], clock: PhaseClock | None = None) -> Iterator:
    """Yield batches while *every* worker still has one.

    Collectives (the gather in the loss, DDP's all-reduce) hang if one worker takes a step
    that another does not; one tiny all-reduce per step makes all workers stop together,
    whatever their shards hold. The same all-reduce says whether every worker's batch has
    ``MIN_ROWS_PER_STEP`` usable rows, so a batch of bad rows stops all workers at once with
    `BadDataError` (which is not retried) rather than one of them. The time spent
    waiting for the data iterator alone (not for the other workers) is appended to ``waits``.
    ``clock``: each step begins on it where its batch is waited for (the consumer ends it).
    """
    _, world = distributed_world()
    clock = clock or PhaseClock()
    while True:
        clock.begin_step()
        with phase("data_wait"):
            started = time.perf_counter()
            batch = next(batches, None)
            waits.append(time.perf_counter() - started)
        usable_rows = int(batch["valid"].sum()) if batch is not None else 0
        flags = [0 if batch is None else 1, 1 if usable_rows >= MIN_ROWS_PER_STEP else 0]
        if world > 1:
            with phase("sync"):  # on the host: it must not wait for the previous step's kernels
                reduced = torch.tensor(flags)
                dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=host_group())
                flags = reduced.tolist()
        if flags[0] == 0:
            clock.cancel_step()
            return
        if flags[1] == 0:
            raise BadDataError(f"a training batch had fewer than {MIN_ROWS_PER_STEP} usable rows on some worker "
                               f"(this worker: {usable_rows} of {len(batch['valid'])}): the shards are mostly corrupt")
        yield batch
