"""Weighted training sources: each epoch draws every source's share to the row, without
replacement a source's rows all come before any comes again, and the stream over the drawn
pieces is planned, dealt and resumed like one over whole units."""

from collections import Counter

import numpy as np
import pytest

from vcl_dist.data.epoch_plan import EpochOrder, fresh_ranges, resume_ranges
from vcl_dist.data.mixture import SourceMix, drawn_rows, epoch_pieces, source_counts


@pytest.fixture
def sources():
    """Three sources of random unit sizes: a large one, a small one, a middle one."""
    rng = np.random.default_rng(4)
    rows = [rng.integers(5, 40, size=n).tolist() for n in (30, 4, 12)]
    unit_rows = sum(rows, [])
    unit_source = sum(([s] * len(r) for s, r in enumerate(rows)), [])
    return np.array(unit_rows), np.array(unit_source)


def rows_of(pieces) -> list[tuple[int, int]]:
    return [(int(u), int(s) + r) for u, s, n in zip(pieces.units, pieces.starts, pieces.rows) for r in range(n)]


def test_counts_follow_the_weights_and_sum_to_the_epoch():
    assert source_counts([0.6, 0.3, 0.1], 1001) == [601, 300, 100]
    assert sum(source_counts([1, 1, 1], 100)) == 100
    assert source_counts([5, 0.001], 10) == [10, 0]


def test_each_epoch_draws_every_sources_share_to_the_row(sources):
    unit_rows, unit_source = sources
    mix = [SourceMix("big", 0.5), SourceMix("small", 0.3, replacement=True), SourceMix("middle", 0.2)]
    for epoch in range(3):
        pieces = epoch_pieces(unit_rows, unit_source, mix, 500, seed=1, epoch=epoch)
        assert drawn_rows(pieces, unit_source, mix) == {"big": 250, "small": 150, "middle": 100}
        assert all(0 <= s and s + n <= unit_rows[u] for u, s, n in zip(pieces.units, pieces.starts, pieces.rows))
        assert (unit_source[pieces.units] == 1).sum() > 0
    again = epoch_pieces(unit_rows, unit_source, mix, 500, seed=1, epoch=2)
    assert rows_of(again) == rows_of(pieces)  # a function of (seed, epoch): every worker and restart alike
    assert rows_of(epoch_pieces(unit_rows, unit_source, mix, 500, seed=2, epoch=2)) != rows_of(pieces)


def test_without_replacement_no_row_comes_back_before_its_source_is_used_up(sources):
    unit_rows, unit_source = sources
    big = int(unit_rows[unit_source == 0].sum())
    mix = [SourceMix("big", 1.0), SourceMix("small", 1.0)]
    per_epoch = big // 3  # three epochs use up most of the big source
    drawn = []
    for epoch in range(3):
        pieces = epoch_pieces(unit_rows, unit_source, mix, 2 * per_epoch, seed=0, epoch=epoch)
        drawn += [row for row in rows_of(pieces) if unit_source[row[0]] == 0]
    assert len(drawn) == 3 * per_epoch and len(set(drawn)) == len(drawn)  # never twice
    # The small source is upsampled (it has fewer rows than its share): each of its rows is
    # drawn as evenly as whole cycles allow.
    small = Counter(row for row in rows_of(epoch_pieces(unit_rows, unit_source, mix, 2 * per_epoch, seed=0, epoch=0))
                    if unit_source[row[0]] == 1)
    assert max(small.values()) - min(small.values()) <= 1 and len(small) == unit_rows[unit_source == 1].sum()


def test_with_replacement_draws_rows_evenly_over_many_epochs(sources):
    unit_rows, unit_source = sources
    mix = [SourceMix("middle", 1.0, replacement=True)]
    only = np.where(unit_source == 2, 2, 9)  # the other units belong to no listed source
    only[unit_source == 2] = 0
    counts = Counter()
    for epoch in range(200):
        counts.update(u for u, n in zip(*(lambda p: (p.units, p.rows))(epoch_pieces(unit_rows, only, mix, 60, 0, epoch)))
                      for _ in range(n))
    # Each row is as likely as any other: the draws per row are about equal across units.
    per_row = np.array([counts[u] / unit_rows[u] for u in np.flatnonzero(unit_source == 2)])
    assert per_row.std() / per_row.mean() < 0.2


def test_the_stream_over_drawn_pieces_is_dealt_and_resumed_as_over_units(sources):
    unit_rows, unit_source = sources
    mix = [SourceMix("big", 2.0), SourceMix("small", 1.0, replacement=True)]
    pieces = epoch_pieces(unit_rows, unit_source, mix, 300, seed=3, epoch=1)
    order = EpochOrder(unit_rows, seed=3, epoch=1, mix_rows=40, pieces=pieces)
    assert order.total == 300

    def read(ranges):
        plan = order.worker_epoch(ranges, 7, lead_rows=5)
        return [(r.unit, int(row), int(p)) for r in plan.reads for row, p in zip(r.rows, r.positions)]

    whole = sorted(read([(0, 300)]), key=lambda x: x[2])
    assert Counter((u, row) for u, row, _ in whole) == Counter(rows_of(pieces))  # every drawn row, as often as drawn
    shares = fresh_ranges(300, 3)
    first = [x for share in shares for x in read(share)[:0]]
    rest = resume_ranges(shares, [20, 20, 20], 2)
    trained = [x for share in shares for x in sorted(read(share), key=lambda x: x[2])[:20]]
    later = [x for share in rest for x in read(share)]
    assert not first and sorted(p for *_, p in trained + later) == list(range(300))  # each position once across the restart
