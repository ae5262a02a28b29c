"""The epoch plan (which rows each worker reads, in which order) and the worker-side assembly
of read blocks into stream-ordered batches: pure functions, checked on random unit sizes."""

import numpy as np
import pytest

from vcl_dist.data.epoch_plan import EpochOrder, deal, drop_first, fresh_ranges, range_rows, resume_ranges
from vcl_dist.data.train_stream import stream_batches


def stream_rows(order: EpochOrder, ranges, max_task_rows=7, lead_rows=None) -> list[tuple[int, int]]:
    """(unit, row) of every position of ``ranges``, in stream order, as a worker reads them."""
    plan = order.worker_epoch(ranges, max_task_rows, lead_rows)
    by_position = {int(p): (r.unit, int(row)) for r in plan.reads for p, row in zip(r.positions, r.rows)}
    assert plan.rows == range_rows(ranges) == len(by_position)
    assert sum(n for _, n in plan.groups) == plan.rows
    assert all(len(r.rows) <= max_task_rows and list(r.rows) == sorted(r.rows) for r in plan.reads)
    return [by_position[p] for p in sorted(by_position)]


@pytest.fixture
def unit_rows():
    return np.random.default_rng(3).integers(1, 60, size=23).tolist()


def test_every_row_once_per_epoch_in_a_seeded_order_new_each_epoch(unit_rows):
    everything = {(u, r) for u, n in enumerate(unit_rows) for r in range(n)}
    orders = []
    for epoch in range(2):
        order = EpochOrder(unit_rows, seed=5, epoch=epoch, mix_rows=40)
        assert order.total == sum(unit_rows)
        rows = stream_rows(order, [(0, order.total)])
        assert set(rows) == everything and len(rows) == len(everything)
        assert rows == stream_rows(EpochOrder(unit_rows, seed=5, epoch=epoch, mix_rows=40), [(0, order.total)])
        orders.append(rows)
    assert orders[0] != orders[1]
    assert stream_rows(EpochOrder(unit_rows, seed=6, epoch=0, mix_rows=40), [(0, sum(unit_rows))]) != orders[0]
    # Rows of different units mix within a group: read unit after unit, the stream would change
    # units 22 times.
    assert sum(a[0] != b[0] for a, b in zip(orders[0], orders[0][1:])) > 100


def test_shares_are_equal_disjoint_and_continue_exactly_after_a_checkpoint(unit_rows):
    order = EpochOrder(unit_rows, seed=1, epoch=3, mix_rows=25)
    total = order.total
    shares = fresh_ranges(total, 3)
    assert [range_rows(s) for s in shares] == [total // 3] * 3
    full = [stream_rows(order, s) for s in shares]
    assert sum(len(f) for f in full) == len({x for f in full for x in f}) == total - total % 3
    # Same world size: each worker continues its own share with its very next row.
    rest = resume_ranges(shares, [17, 17, 17], 3)
    assert [stream_rows(order, r) for r in rest] == [f[17:] for f in full]


def test_another_world_size_deals_what_nobody_trained_on(unit_rows):
    order = EpochOrder(unit_rows, seed=1, epoch=0, mix_rows=25)
    shares = fresh_ranges(order.total, 2)
    trained = [x for s in shares for x in stream_rows(order, s)[:30]]
    for world in (1, 3, 4):
        rest = resume_ranges(shares, [30, 30], world)
        assert len({range_rows(r) for r in rest}) == 1  # equal shares
        later = [x for r in rest for x in stream_rows(order, r)]
        assert not set(later) & set(trained) and len(set(later)) == len(later)
        assert len(trained) + len(later) > range_rows(shares[0]) * 2 - world  # at most world - 1 rows left out
        # Shrink then grow back: still no row twice.
        grown = resume_ranges(rest, [10] * world, 2)
        again = [x for r in grown for x in stream_rows(order, r)]
        first_ten = [x for r in rest for x in stream_rows(order, r)[:10]]
        assert not set(again) & (set(trained) | set(first_ten))


def test_deal_and_drop_first_on_ranges():
    assert deal([(0, 5), (10, 16)], 2) == [[(0, 5)], [(10, 15)]]
    assert deal([(0, 5), (10, 17)], 3) == [[(0, 4)], [(4, 5), (10, 13)], [(13, 17)]]
    assert drop_first([(0, 5), (10, 16)], 7) == [(12, 16)]
    assert drop_first([(0, 5)], 0) == [(0, 5)]


def test_blocks_in_plan_order_become_stream_ordered_batches():
    rng = np.random.default_rng(0)
    groups = [(30, 30), (55, 25), (60, 5)]
    blocks = []
    for (end, count), start in zip(groups, (0, 30, 55)):
        positions = rng.permutation(np.arange(start, end))  # as the group's reads give them
        for part in np.array_split(positions, 3):
            blocks.append({"position": part, "key": np.array([f"k{p}" for p in part], dtype=object)})
    batches = list(stream_batches(iter([(iter(blocks), groups)]), 16))
    assert [len(b["position"]) for b in batches] == [16, 16, 16]  # 60 rows: the last 12 do not fill a batch
    assert np.concatenate([b["position"] for b in batches]).tolist() == list(range(48))
    assert batches[1]["key"][0] == "k16"
    with pytest.raises(RuntimeError, match="short"):
        list(stream_batches(iter([(iter(blocks[:-1]), groups)]), 16))


def test_blocks_that_straddle_groups_give_each_row_once_with_every_column():
    rng = np.random.default_rng(1)
    groups = [(20, 20), (45, 25)]
    # Rows of both groups, shuffled together and cut anyhow: blocks cross the groups' boundary.
    positions = np.concatenate([rng.permutation(20), 20 + rng.permutation(25)])
    positions[15:25] = rng.permutation(positions[15:25])
    pixels = rng.integers(0, 255, (45, 3, 4, 4), dtype=np.uint8)
    blocks = [{"position": part, "image": pixels[part], "key": np.array([f"k{p}" for p in part], dtype=object)}
              for part in np.array_split(positions, 6)]
    batches = list(stream_batches(iter([(iter(blocks), groups)]), 8))
    assert len(batches) == 5  # 45 rows: the last 5 do not fill a batch
    order = np.concatenate([b["position"] for b in batches])
    assert order.tolist() == list(range(40))
    assert np.array_equal(np.concatenate([b["image"] for b in batches]), pixels[:40])
    assert [k for b in batches for k in b["key"]] == [f"k{p}" for p in range(40)]
    extra = [*blocks, {"position": np.array([50]), "image": pixels[:1], "key": np.array(["x"], dtype=object)}]
    with pytest.raises(RuntimeError, match="more rows than planned"):
        list(stream_batches(iter([(iter(extra), groups)]), 8))


def test_the_first_group_read_in_stretches_gives_the_same_rows_in_the_same_batches(unit_rows):
    order = EpochOrder(unit_rows, seed=2, epoch=1, mix_rows=90)
    shares = resume_ranges(fresh_ranges(order.total, 2), [13, 13], 2)  # a resumed share: two ranges
    for ranges in [*fresh_ranges(order.total, 2), *shares]:
        whole, lead = order.worker_epoch(ranges, 7), order.worker_epoch(ranges, 7, lead_rows=5)
        assert stream_rows(order, ranges, lead_rows=5) == stream_rows(order, ranges)
        # The first group becomes stretches of 5, 10, 20, ... rows; the later groups stay whole.
        stretches = len(lead.groups) - len(whole.groups) + 1
        assert [n for _, n in lead.groups[:stretches - 1]] == [5 * 2 ** k for k in range(stretches - 1)]
        assert sum(n for _, n in lead.groups[:stretches]) == whole.groups[0][1] and stretches > 2
        assert lead.groups[stretches:] == whole.groups[1:]
        # The first batch's rows are all in the first stretch's reads.
        first_reads = [r for r in lead.reads if r.positions.max() < lead.groups[0][0]]
        assert sum(len(r.rows) for r in first_reads) == 5

        def batches(plan):
            blocks = [{"position": r.positions, "row": r.rows, "unit": np.full(len(r.rows), r.unit)} for r in plan.reads]
            return list(stream_batches(iter([(iter(blocks), plan.groups)]), 4))

        for a, b in zip(batches(lead), batches(whole), strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_an_epoch_planned_in_parts_reads_and_batches_as_one_plan_does(unit_rows):
    order = EpochOrder(unit_rows, seed=3, epoch=0, mix_rows=40)
    resumed = resume_ranges(fresh_ranges(order.total, 2), [17, 17], 3)
    for ranges in [*fresh_ranges(order.total, 2), *resumed]:
        whole = order.worker_epoch(ranges, 7, lead_rows=5)
        parts = list(order.worker_chapters(ranges, 7, lead_rows=5, chapter_rows=50))
        assert len(parts) >= 2 and all(part.rows >= 50 for part in parts[:-1])
        assert [g for part in parts for g in part.groups] == whole.groups
        assert [(r.unit, r.rows.tolist(), r.positions.tolist()) for part in parts for r in part.reads] == \
            [(r.unit, r.rows.tolist(), r.positions.tolist()) for r in whole.reads]

        def blocks(plan):
            return iter([{"position": r.positions, "unit": np.full(len(r.rows), r.unit), "row": r.rows} for r in plan.reads])

        # A batch that spans two parts is cut as in one plan: nothing dropped at a part's end.
        in_parts = list(stream_batches(((blocks(part), part.groups) for part in parts), 6))
        in_one = list(stream_batches(iter([(blocks(whole), whole.groups)]), 6))
        assert len(in_parts) == len(in_one) == whole.rows // 6
        for a, b in zip(in_parts, in_one, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
