"""Bad rows: skipped and counted per shard, summed over workers, fatal past a threshold.

The verdict is global: the counts are summed over workers (an all-reduce every few steps), and
the shards named — in the fatal message and in ``result.json`` — are the worst over all
workers (their per-shard counts are merged with an all-gather), not each worker's own.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from ..losses.gather import distributed_world
from .fatal import FatalTrainingError

# Judge the fraction only once this many rows were seen (over all workers): a few bad rows
# in the first batch must not stop a run whose data is 99.9% good.
MIN_ROWS_FOR_VERDICT = 1000
# Shards named in reports: enough to find a broken writer, bounded however many shards are bad.
WORST_SHARDS = 10


class BadDataError(FatalTrainingError):
    """Too many rows of the dataset could not be used."""


class BadRowCounter:
    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.rows = 0
        self.bad = 0
        self.by_shard: Counter[str] = Counter()

    def add(self, rows: int, bad_shards: list[str]) -> None:
        self.rows += rows
        self.bad += len(bad_shards)
        self.by_shard.update(bad_shards)

    def global_counts(self, device: torch.device) -> tuple[int, int]:
        """``(rows, bad rows)`` summed over workers; a collective: every worker calls it."""
        counts = torch.tensor([self.rows, self.bad], dtype=torch.float64, device=device)
        if distributed_world()[1] > 1:
            dist.all_reduce(counts)
        return int(counts[0].item()), int(counts[1].item())

    def global_by_shard(self) -> Counter[str]:
        """Bad rows per shard, summed over all workers; a collective: every worker calls it."""
        world = distributed_world()[1]
        if world == 1:
            return Counter(self.by_shard)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, dict(self.by_shard))
        return sum((Counter(counts) for counts in everyone), Counter())

    def check(self, device: torch.device, final: bool = False) -> tuple[int, int]:
        """Raise `BadDataError` (naming the globally worst shard) when the global bad
        fraction is above the limit; returns the global counts. A collective: every worker
        calls it, and every worker reaches the same verdict from the same summed counts."""
        rows, bad = self.global_counts(device)
        if bad and (final or rows >= MIN_ROWS_FOR_VERDICT) and bad > self.max_fraction * rows:
            shard, count = worst_shards(self.global_by_shard(), 1)[0]
            raise BadDataError(
                f"{bad} of {rows} rows ({bad / rows:.1%}) were unusable (corrupt or missing image, empty caption, "
                f"bad label), above data.max_bad_fraction={self.max_fraction}; most in shard {shard} ({count} rows)"
            )
        return rows, bad


def worst_shards(by_shard: Counter[str] | dict[str, int], most: int = WORST_SHARDS) -> list[tuple[str, int]]:
    """The ``most`` shards with the most bad rows, worst first (ties by name: reproducible)."""
    return sorted(by_shard.items(), key=lambda item: (-item[1], item[0]))[:most]
