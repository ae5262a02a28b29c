"""Several training sources mixed by weight (``data.sources``): which rows of each an epoch draws.

Every epoch draws ``E`` rows (``data.epoch_rows``; default: all sources' rows together), source
``s`` giving ``n_s`` of them in proportion to its weight (rounded so that they sum to ``E``).
How a source gives its ``n_s`` rows, as `.epoch_plan.Pieces` of its units:

- **without replacement**: the source is an endless stream of *cycles*, each all of its units
  in a new seeded order; epoch ``e`` takes the stream's rows ``[e·n_s, (e+1)·n_s)``. A row comes
  back only after every other row of its source has been drawn (and within one epoch only when
  ``n_s`` exceeds the source: an upsampled small source);
- **with replacement**: units drawn at random, each as likely as any other (a drawn unit gives
  all its rows, so every row is equally likely), until ``n_s`` rows; the last one cut to a
  random stretch (OpenCLIP's resampled shards, but to the row).

Everything is a function of ``(seed, epoch)`` and the sources' units, computed alike by every
worker: the epoch's pieces are then put in order like units (`.epoch_plan.EpochOrder`),
and a checkpoint's position in that stream means the same after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .epoch_plan import Pieces

# Keeps the draws' random streams apart from the epoch order's.
CYCLE_ORDER, RESAMPLE = 0x6379636C, 0x72736D70


@dataclass(frozen=True)
class SourceMix:
    """One training source in the mixture: its name (in reports), weight and way of drawing."""

    name: str
    weight: float
    replacement: bool = False


def source_counts(weights: list[float], epoch_rows: int) -> list[int]:
    """``epoch_rows`` split in proportion to ``weights``: the largest remainders round up."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * epoch_rows
    counts = np.floor(shares).astype(np.int64)
    for index in np.argsort(-(shares - counts), kind="stable")[: epoch_rows - int(counts.sum())]:
        counts[index] += 1
    return counts.tolist()


def _cycle_pieces(ids: np.ndarray, unit_rows: np.ndarray, seed: int, source: int, first: int, count: int) -> list[tuple]:
    """Rows ``[first, first + count)`` of the source's stream of cycles, as (unit, start, rows)."""
    size = int(unit_rows[ids].sum())
    pieces, position = [], first
    while count > 0:
        cycle, offset = divmod(position, size)
        order = ids[np.random.default_rng([seed, CYCLE_ORDER, source, cycle]).permutation(len(ids))]
        ends = np.cumsum(unit_rows[order])
        index = int(np.searchsorted(ends, offset, side="right"))
        while count > 0 and index < len(order):
            unit_start = int(ends[index] - unit_rows[order[index]])
            start = offset - unit_start
            take = min(count, int(unit_rows[order[index]]) - start)
            pieces.append((int(order[index]), start, take))
            count, position, offset, index = count - take, position + take, offset + take, index + 1
    return pieces


def _resampled_pieces(ids: np.ndarray, unit_rows: np.ndarray, seed: int, epoch: int, source: int, count: int) -> list[tuple]:
    """``count`` rows of whole units drawn with replacement, each unit as likely as any other
    (so each row is: a drawn unit gives all its rows), the last cut to a random stretch."""
    rng = np.random.default_rng([seed, epoch, RESAMPLE, source])
    pieces = []
    while count > 0:
        unit = int(ids[rng.integers(len(ids))])
        take = min(count, int(unit_rows[unit]))
        pieces.append((unit, int(rng.integers(0, int(unit_rows[unit]) - take + 1)), take))
        count -= take
    return pieces


def epoch_pieces(unit_rows, unit_source, mix: list[SourceMix], epoch_rows: int, seed: int, epoch: int) -> Pieces:
    """The pieces of units that epoch ``epoch`` draws from each source (see the module docstring).

    Raises:
        ValueError: a source has no rows.
    """
    unit_rows = np.asarray(unit_rows, dtype=np.int64)
    unit_source = np.asarray(unit_source, dtype=np.int64)
    pieces: list[tuple] = []
    for source, (spec, count) in enumerate(zip(mix, source_counts([m.weight for m in mix], epoch_rows))):
        ids = np.flatnonzero((unit_source == source) & (unit_rows > 0))
        if not len(ids):
            raise ValueError(f"data.sources[{spec.name}] has no rows")
        if count == 0:
            continue
        if spec.replacement:
            pieces += _resampled_pieces(ids, unit_rows, seed, epoch, source, count)
        else:
            pieces += _cycle_pieces(ids, unit_rows, seed, source, epoch * count, count)
    units, starts, rows = (np.array(column, dtype=np.int64) for column in zip(*pieces)) if pieces else ([],) * 3
    return Pieces(np.asarray(units, dtype=np.int64), np.asarray(starts, dtype=np.int64), np.asarray(rows, dtype=np.int64))


def drawn_rows(pieces: Pieces, unit_source, mix: list[SourceMix]) -> dict[str, int]:
    """Rows an epoch draws from each source, by name."""
    sources = np.asarray(unit_source, dtype=np.int64)[pieces.units]
    return {spec.name: int(pieces.rows[sources == index].sum()) for index, spec in enumerate(mix)}
