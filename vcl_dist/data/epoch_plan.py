"""Which training rows each worker reads, in which order, every epoch: a pure function of the
seed, the epoch, the read units and where the epoch stands — never of timing or process state.

Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, so neither the order
nor the split of rows can be reproduced, and a restart can only pass over as many rows again
(Ray Data cannot seek: ray 37633, 48224). Here the driver plans the split's read units once
(Parquet row groups, WebDataset tars, blocks of the built-in data), and every worker derives
from them, alone and alike, the epoch's *stream*:

- the units in a new order every epoch, from ``(seed, epoch)``;
- consecutive units taken into *mixing groups* of at least ``mix_rows`` rows; the rows of a
  group are shuffled together, from ``(seed, epoch, group)`` — a shuffle across units that does
  not depend on which worker reads them;
- position ``p`` of the stream is thus one row of one unit (`EpochOrder.rows_at`).

The workers share the stream out as contiguous *ranges of positions* (`deal`): with
``T`` rows and ``W`` workers, worker ``r`` reads ``[r·⌊T/W⌋, (r+1)·⌊T/W⌋)``. A checkpoint keeps
each worker's ranges and how many of their rows it trained on; a restart at the same world size
continues every worker's ranges exactly where it stopped, and at another size (an elastic
restart) deals the rows no worker trained on yet among the new workers (`resume_ranges`):
every row of the epoch is trained on once, none twice; only the last rows that do not fill a
step on every worker are left out, as they are at any epoch's end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

Ranges = list[tuple[int, int]]  # [start, stop) of stream positions, increasing and disjoint
# Salts that keep the streams of the epoch's unit order and of the groups' row orders apart (augmentation
# draws from (seed, epoch, row key): a stream of another length, apart from both).
UNIT_ORDER, GROUP_ORDER = 0x756E6974, 0x67726F75
# Rows of a worker's epoch planned at a time (`EpochOrder.worker_chapters`): a few MB of
# plan, and hundreds of read tasks to keep the CPUs busy.
CHAPTER_ROWS = 262_144


@dataclass(frozen=True)
class RowRead:
    """Rows of one unit that one read task reads: ``rows`` (indices inside the unit, increasing)
    and the stream ``positions`` they take."""

    unit: int
    rows: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class WorkerEpoch:
    """What one worker reads in one epoch: its ``reads`` in stream order, and for every mixing
    group it touches, ``(last position + 1, rows it gets from the group)`` in the same order."""

    reads: list[RowRead]
    groups: list[tuple[int, int]]
    rows: int


@dataclass(frozen=True)
class Pieces:
    """What an epoch is made of: ``rows[i]`` rows of unit ``units[i]`` from its row
    ``starts[i]`` on. Without a mixture of sources, every unit whole, once; with one
    (`.mixture`), the stretches of units each source gives the epoch."""

    units: np.ndarray
    starts: np.ndarray
    rows: np.ndarray

    @classmethod
    def whole(cls, unit_rows: Sequence[int]) -> "Pieces":
        rows = np.asarray(unit_rows, dtype=np.int64)
        return cls(np.arange(len(rows), dtype=np.int64), np.zeros(len(rows), dtype=np.int64), rows)


class EpochOrder:
    """The stream of one epoch over units of ``unit_rows`` rows, or over ``pieces`` of them
    (see the module docstring; a piece then takes a unit's place)."""

    def __init__(self, unit_rows: Sequence[int], seed: int, epoch: int, mix_rows: int, pieces: Pieces | None = None):
        self.pieces = pieces if pieces is not None else Pieces.whole(unit_rows)
        self.unit_rows = self.pieces.rows  # of each piece: a piece stands for a unit below
        self.seed, self.epoch = seed, epoch
        order = np.random.default_rng([seed, epoch, UNIT_ORDER]).permutation(len(self.unit_rows))
        self.group_units: list[np.ndarray] = []
        starts, members, rows = [0], [], 0
        for unit in order:
            members.append(unit)
            rows += int(self.unit_rows[unit])
            if rows >= max(1, mix_rows):
                self.group_units.append(np.array(members, dtype=np.int64))
                starts.append(starts[-1] + rows)
                members, rows = [], 0
        if members:
            self.group_units.append(np.array(members, dtype=np.int64))
            starts.append(starts[-1] + rows)
        self.group_start = np.array(starts, dtype=np.int64)  # one more than groups: the end
        self.total = int(self.group_start[-1])

    def _group_permutation(self, group: int) -> np.ndarray:
        size = int(self.group_start[group + 1] - self.group_start[group])
        return np.random.default_rng([self.seed, self.epoch, GROUP_ORDER, group]).permutation(size)

    def rows_at(self, group: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(units, rows inside them)`` at the given offsets of ``group``'s stretch of the stream."""
        picked = self._group_permutation(group)[offsets]
        units = self.group_units[group]
        first_rows = np.concatenate([[0], np.cumsum(self.unit_rows[units])])
        which = np.searchsorted(first_rows, picked, side="right") - 1
        return units[which], picked - first_rows[which]

    def worker_epoch(self, ranges: Ranges, max_task_rows: int, lead_rows: int | None = None) -> WorkerEpoch:
        """The reads of one worker whose share is ``ranges``: for each mixing group in stream
        order, one read per unit with rows in it (split into reads of at most
        ``max_task_rows`` rows), each unit's rows in the unit's own order (cheap to read).

        ``lead_rows``: the worker's first group is read in stretches of its stream — the first
        ``lead_rows`` positions, then twice as many each time — each with reads of its own, so
        that the first batch waits for ``lead_rows`` rows to be read and preprocessed rather than
        for the whole group (its units are read once per stretch). The rows and their order are
        the same either way."""
        chapters = list(self.worker_chapters(ranges, max_task_rows, lead_rows, chapter_rows=None))
        return WorkerEpoch([r for c in chapters for r in c.reads], [g for c in chapters for g in c.groups],
                           sum(c.rows for c in chapters))

    def worker_chapters(self, ranges: Ranges, max_task_rows: int, lead_rows: int | None = None,
                        chapter_rows: int | None = CHAPTER_ROWS) -> Iterator[WorkerEpoch]:
        """`worker_epoch` in consecutive parts of whole groups, each of at least
        ``chapter_rows`` rows (the last: what is left), computed as they are asked for: a
        worker holds one part's reads at a time, however many rows the epoch has."""
        reads: list[RowRead] = []
        groups: list[tuple[int, int]] = []
        planned = 0  # rows of this part's groups
        for index, (group, positions) in enumerate(self._worker_groups(ranges)):
            units, rows = self.rows_at(group, positions - self.group_start[group])
            for stretch in lead_stretches(len(positions), lead_rows if index == 0 else None):
                for unit in self.group_units[group]:
                    mine = stretch.start + np.flatnonzero(units[stretch] == unit)
                    if not len(mine):
                        continue
                    mine = mine[np.argsort(rows[mine], kind="stable")]
                    for chunk in range(0, len(mine), max_task_rows):
                        taken = mine[chunk:chunk + max_task_rows]
                        reads.append(RowRead(int(self.pieces.units[unit]), self.pieces.starts[unit] + rows[taken],
                                             positions[taken]))
                groups.append((int(positions[stretch.stop - 1]) + 1, stretch.stop - stretch.start))
            planned += len(positions)
            if chapter_rows and planned >= chapter_rows:
                yield WorkerEpoch(reads, groups, planned)
                reads, groups, planned = [], [], 0
        if groups or not chapter_rows:
            yield WorkerEpoch(reads, groups, planned)

    def _worker_groups(self, ranges: Ranges) -> Iterator[tuple[int, np.ndarray]]:
        """``(group, the positions of ranges in it)`` for every group ``ranges`` touch, in
        stream order (``ranges`` are increasing: a group's pieces come one after another)."""
        current, parts = None, []
        for start, stop in ranges:
            first = int(np.searchsorted(self.group_start, start, side="right")) - 1
            for group in range(max(first, 0), len(self.group_units)):
                lo, hi = int(self.group_start[group]), int(self.group_start[group + 1])
                if lo >= stop:
                    break
                positions = np.arange(max(lo, start), min(hi, stop), dtype=np.int64)
                if not len(positions):
                    continue
                if group != current and parts:
                    yield current, np.concatenate(parts)
                    parts = []
                current = group
                parts.append(positions)
        if parts:
            yield current, np.concatenate(parts)


def lead_stretches(rows: int, lead_rows: int | None) -> list[slice]:
    """``[0, rows)`` cut into ``lead_rows``, then twice as many each time (the last: what is
    left); whole without ``lead_rows``."""
    stretches, start, size = [], 0, lead_rows or rows
    while start < rows:
        stretches.append(slice(start, min(rows, start + size)))
        start, size = start + size, size * 2
    return stretches


def range_rows(ranges: Ranges) -> int:
    return sum(stop - start for start, stop in ranges)


def deal(ranges: Ranges, world: int) -> list[Ranges]:
    """``ranges`` (increasing, disjoint) cut into ``world`` contiguous shares of equal size; the
    ``total % world`` last positions go to nobody (they would not fill a step on every worker)."""
    share = range_rows(ranges) // world
    shares: list[Ranges] = [[] for _ in range(world)]
    worker, room = 0, share
    for start, stop in ranges:
        while start < stop and worker < world:
            take = min(stop - start, room)
            if take:
                shares[worker].append((start, start + take))
            start, room = start + take, room - take
            if room == 0:
                worker, room = worker + 1, share
    return shares


def drop_first(ranges: Ranges, count: int) -> Ranges:
    """``ranges`` without their first ``count`` positions (those already trained on)."""
    rest = []
    for start, stop in ranges:
        skipped = min(count, stop - start)
        count -= skipped
        if start + skipped < stop:
            rest.append((start + skipped, stop))
    return rest


def fresh_ranges(total: int, world: int) -> list[Ranges]:
    """The shares of an epoch that starts from its beginning."""
    return deal([(0, total)], world)


def resume_ranges(saved: list[Ranges], consumed: Sequence[int], world: int) -> list[Ranges]:
    """The shares that continue an epoch in which worker ``r`` of the saved group had trained on
    the first ``consumed[r]`` rows of ``saved[r]``: the same workers continue their own ranges;
    a group of another size deals what nobody trained on yet anew."""
    rest = [drop_first([tuple(r) for r in ranges], int(done)) for ranges, done in zip(saved, consumed)]
    if len(saved) == world:
        return rest
    return deal(sorted(r for ranges in rest for r in ranges), world)
