"""Bad rows: skipped and counted per shard, summed over workers, fatal past a threshold."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from ..losses.gather import distributed_world

# Judge the fraction only once this many rows were seen (over all workers): a few bad rows
# in the first batch must not stop a run whose data is 99.9% good.
MIN_ROWS_FOR_VERDICT = 1000


class BadDataError(RuntimeError):
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

    def check(self, device: torch.device, final: bool = False) -> tuple[int, int]:
        """Raise :class:`BadDataError` (naming this worker's worst shard) when the global bad
        fraction is above the limit; returns the global counts. A collective."""
        rows, bad = self.global_counts(device)
        if bad and (final or rows >= MIN_ROWS_FOR_VERDICT) and bad > self.max_fraction * rows:
            shard, count = self.by_shard.most_common(1)[0] if self.by_shard else ("another worker's shard", 0)
            raise BadDataError(
                f"{bad} of {rows} rows ({bad / rows:.1%}) were unusable (corrupt or missing image, empty caption, "
                f"bad label), above data.max_bad_fraction={self.max_fraction}; most in shard {shard} ({count} rows)"
            )
        return rows, bad
