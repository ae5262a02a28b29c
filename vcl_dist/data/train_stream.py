"""The training split as each worker reads it: its own planned reads (`.epoch_plan`) run as
a Ray Dataset on the cluster's CPUs, and the batches they make, in the epoch's stream order.

Driver: `plan_units` lists the split's read units once (Parquet footers, tar sample
counts, or blocks of the built-in data put in Ray's object store), into a picklable
`TrainSplit` that goes to every worker.

Worker, every epoch: `TrainSplit.batches` — one Ray Data read task per planned read (one
unit's rows: read, then decoded, augmented and tokenised by the
`.preprocess.Preprocessor`), with ``preserve_order`` so the blocks arrive in plan
order whatever task finishes first; each mixing group's rows are put in stream order once the
group is complete, and cut into batches of the worker's size (the last partial one dropped).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from ..runtime.prefetch import fetch_first_ahead
from .epoch_plan import EpochOrder, Pieces, Ranges, RowRead, WorkerEpoch
from .feature_store import read_unit_features
from .images import ImageGeometry
from .mixture import SourceMix, drawn_rows, epoch_pieces
from .preprocess import Preprocessor
from .shard_format import pylist_columns, to_shard_columns
from .unreadable_shards import read_or_mark_unreadable

# Rows of one unit that one read task decodes at most: a WebDataset tar (thousands of samples)
# becomes several tasks, each streaming the tar and decoding its own rows.
MAX_TASK_ROWS = 1024


@dataclass(frozen=True)
class TrainUnit:
    """A read unit: ``rows`` rows that one read reads together. ``kind``: ``parquet`` (row
    groups of a file), ``tar`` (a WebDataset tar) or ``table`` (a block of a file on the driver's
    disk, put in Ray's object store as ``table``)."""

    kind: str
    path: str
    rows: int
    row_groups: tuple[int, ...] = ()
    offset: int = 0  # kind "table": the block's first row in its file
    group_rows: tuple[int, ...] = ()  # kind "parquet": rows of each of row_groups (none: read them all)
    source: int = 0  # which of data.sources it belongs to
    table: Any = None


def plan_units(source, path: str, unit_bytes: int, block_rows: int) -> list[TrainUnit]:
    """The read units of a split, in a fixed order (files by name, then their row groups)."""
    if source.driver_local:
        units = []
        for file in sorted(Path(path).glob("*.parquet")):
            rows = pq.ParquetFile(file).metadata.num_rows
            units += [TrainUnit("table", str(file), min(block_rows, rows - start), offset=start)
                      for start in range(0, rows, block_rows)]
        return units
    if source.format == "webdataset":
        from .webdataset import webdataset_tar_rows

        return [TrainUnit("tar", tar, rows) for tar, rows in webdataset_tar_rows(source.filesystem, path) if rows]
    from ..storage import list_files
    from .parquet_source import plan_read_units

    return [TrainUnit("parquet", u.path, u.rows, u.row_groups, group_rows=u.group_rows)
            for u in plan_read_units(source.filesystem, list_files(source.filesystem, path, "parquet"), unit_bytes)]


def put_driver_tables(units: list[TrainUnit]) -> list[TrainUnit]:
    """Blocks of files on the driver's disk into Ray's object store, where every node can read
    them (the refs live as long as the driver holds the returned units)."""
    import ray

    tables: dict[str, Any] = {}
    staged = []
    for unit in units:
        if unit.kind != "table":
            staged.append(unit)
            continue
        if unit.path not in tables:
            tables[unit.path] = pq.read_table(unit.path)
        staged.append(replace(unit, table=ray.put(tables[unit.path].slice(unit.offset, unit.rows))))
    return staged


def read_unit_rows(filesystem: pafs.FileSystem, unit: TrainUnit, rows: np.ndarray, images: bool = True) -> dict[str, np.ndarray]:
    """The raw shard columns (and ``path``) of ``rows`` of ``unit``; ``images=False``: Parquet
    shards are read without their image column (its features are read instead)."""
    if unit.kind == "tar":
        from .webdataset import read_tar_rows

        columns = to_shard_columns(read_tar_rows(filesystem, unit.path, rows))
    else:
        if unit.kind == "table":
            import ray

            table = ray.get(unit.table)
        else:
            groups, rows = _row_groups_of(unit, rows)
            with filesystem.open_input_file(unit.path) as file:
                shard = pq.ParquetFile(file)
                names = None if images else [n for n in shard.schema_arrow.names if n != "image"]
                table = shard.read_row_groups(groups, columns=names)
        if len(rows) and int(rows[-1]) >= table.num_rows:
            raise ValueError(f"{unit.path}: {table.num_rows} rows where {unit.rows} were planned "
                             "(was the file changed during the run?)")
        columns = pylist_columns(table.take(rows))
    return columns


def _row_groups_of(unit: TrainUnit, rows: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The row groups of a Parquet unit that hold ``rows``, and the rows' indices in a table of
    those groups alone: a read task reads only them (a unit has several; a task's rows may lie in one)."""
    if not unit.group_rows:
        return list(unit.row_groups), rows
    sizes = np.asarray(unit.group_rows, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, rows, side="right") - 1
    needed = np.unique(which)
    starts_read = np.concatenate([[0], np.cumsum(sizes[needed])])
    return [unit.row_groups[g] for g in needed], rows - starts[which] + starts_read[np.searchsorted(needed, which)]


def run_read(filesystem: pafs.FileSystem, unit: TrainUnit, read: RowRead, batch_rows: int, make_preprocessor,
             features: str | None = None) -> Iterator:
    """One read task: the read's rows, preprocessed ``batch_rows`` at a time, with their stream
    positions. ``features``: the folder of locked towers' outputs (`.feature_store`), which
    stand in the ``image`` column instead of decoded pictures, and in the ``input_ids`` column
    instead of tokens (``float32 [B, F]``), for the towers it holds."""
    computed = read_unit_features(filesystem, features, read.unit, read.rows) if features else {}
    columns = read_or_mark_unreadable(
        functools.partial(read_unit_rows, filesystem, unit, read.rows, images="image" not in computed),
        filesystem, unit.path, read.rows)
    columns["path"] = np.full(len(read.rows), unit.path, dtype=object)  # names the shard of a bad row
    if computed and list(computed["key"]) != [str(k) for k in columns["key"]]:
        raise ValueError(f"{features}: the features of unit {read.unit} are not of {unit.path}'s rows "
                         "(were the shards changed after they were computed?)")
    preprocess = make_preprocessor()
    for start in range(0, len(read.rows), batch_rows):
        part = slice(start, start + batch_rows)
        out = preprocess({name: values[part] for name, values in columns.items()})
        for tower, column in (("image", "image"), ("text", "input_ids")):
            if tower in computed:
                out[column] = computed[tower][part]
                out["valid"] = out["valid"] & computed[f"{tower}_valid"][part]
        out["position"] = read.positions[part]
        yield BlockAccessor.batch_to_block(out)


class PlannedReads(Datasource):
    """A Ray Data source with one read task per planned read, in plan order."""

    def __init__(self, filesystems: tuple[pafs.FileSystem, ...], units: list[TrainUnit], reads: list[RowRead],
                 batch_rows: int, make_preprocessor, features: str | None = None):
        super().__init__()
        self.filesystems, self.units, self.reads = filesystems, units, reads  # filesystems[unit.source]
        self.batch_rows, self.make_preprocessor, self.features = batch_rows, make_preprocessor, features

    def get_name(self) -> str:
        return "ReadPlannedTrainRows"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # decoded images are far larger than the files; Ray measures the blocks

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(run_read, self.filesystems[self.units[read.unit].source], self.units[read.unit], read,
                                       self.batch_rows,
                                       self.make_preprocessor, self.features),
                     BlockMetadata(num_rows=len(read.rows), size_bytes=None, exec_stats=None,
                                   input_files=(self.units[read.unit].path,)),
                     per_task_row_limit=per_task_row_limit)
            for read in self.reads
        ]


@dataclass
class TrainSplit:
    """Everything a worker needs to read its part of any epoch (picklable: built by the driver)."""

    filesystem: pafs.FileSystem
    units: list[TrainUnit]
    tokenizer: Any
    image_size: int | ImageGeometry
    max_text_length: int
    augment: bool
    seed: int
    mix_rows: int
    batch_rows: int  # rows a read task preprocesses at a time
    num_classes: int | None = None
    preprocess_workers: int | None = None
    features: str | None = None  # locked towers' outputs (feature_store), read instead of running them
    feature_towers: tuple[str, ...] = ()  # which: "image", "text"
    decode: str = "cpu"  # data.decode
    # data.sources: each source's filesystem (by TrainUnit.source), weight and way of drawing,
    # and the rows every epoch draws from them all (data.mixture); none: one source, every row once.
    filesystems: tuple = ()
    mixture: tuple[SourceMix, ...] = ()
    epoch_rows: int | None = None
    orders: dict = field(default_factory=dict, repr=False)  # epoch -> EpochOrder, computed once per worker

    @property
    def rows(self) -> int:
        """Rows of every epoch: all of the units', or what a mixture draws."""
        return self.epoch_rows if self.mixture else sum(unit.rows for unit in self.units)

    def fingerprint(self) -> list:
        """What a checkpoint's positions mean: they continue exactly only over the same units
        (and the same mixture of sources)."""
        mixture = [[m.name, m.weight, m.replacement] for m in self.mixture]
        return [self.rows, len(self.units), self.seed, self.mix_rows, *([mixture] if mixture else [])]

    def pieces(self, epoch: int) -> Pieces | None:
        """What a mixture draws in ``epoch`` (None without one: every unit whole)."""
        if not self.mixture:
            return None
        return epoch_pieces([u.rows for u in self.units], [u.source for u in self.units], list(self.mixture),
                            self.epoch_rows, self.seed, epoch)

    def drawn_rows(self, epoch: int) -> dict[str, int]:
        """Rows ``epoch`` draws from each source (a mixture's report)."""
        # From the draw alone: the epoch's order is not needed, nor evicted from the cache.
        return drawn_rows(self.pieces(epoch), [u.source for u in self.units], list(self.mixture))

    def order(self, epoch: int) -> EpochOrder:
        if epoch not in self.orders:
            self.orders = {epoch: EpochOrder([u.rows for u in self.units], self.seed, epoch, self.mix_rows,
                                             self.pieces(epoch))}
        return self.orders[epoch]

    def worker_epoch(self, epoch: int, ranges: Ranges, lead_rows: int | None = None) -> WorkerEpoch:
        return self.order(epoch).worker_epoch(ranges, MAX_TASK_ROWS, lead_rows)

    def batches(self, epoch: int, ranges: Ranges, batch_size: int, prefetch_blocks: int) -> Iterator[dict[str, np.ndarray]]:
        """This worker's batches of ``epoch`` over its ``ranges`` of the stream, in stream order."""
        # The first group in stretches from one batch up: the first step waits for one batch's
        # rows, not for the whole group's (epoch_plan.EpochOrder.worker_epoch).
        chapters = self.order(epoch).worker_chapters(ranges, MAX_TASK_ROWS, lead_rows=batch_size)
        return stream_batches(((self._chapter_blocks(epoch, plan, prefetch_blocks), plan.groups) for plan in chapters),
                              batch_size)

    def _chapter_blocks(self, epoch: int, plan: WorkerEpoch, prefetch_blocks: int) -> Iterator[dict[str, np.ndarray]]:
        """The preprocessed blocks of one part of a worker's epoch, in plan order: one Ray
        Dataset of its reads, started at the first ``next``."""
        import ray.data

        if not plan.reads:
            return iter(())
        make_preprocessor = functools.partial(Preprocessor, self.tokenizer, self.image_size, self.max_text_length,
                                              augment=self.augment, seed=(self.seed, epoch), num_classes=self.num_classes,
                                              decode_images=not (self.features and "image" in self.feature_towers),
                                              fast_decode=self.decode != "pillow", device_decode=self.decode == "gpu")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # blocks in plan order, not in finishing order
        context.enable_progress_bars = False  # one worker's pipeline of many: the driver reports progress
        dataset = ray.data.read_datasource(
            PlannedReads(self.filesystems or (self.filesystem,), self.units, plan.reads, self.batch_rows, make_preprocessor,
                         self.features),
            override_num_blocks=len(plan.reads), num_cpus=1,
            **({"concurrency": self.preprocess_workers} if self.preprocess_workers else {}),
        )
        return iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch_blocks))


class _Placed:
    """Rows of some blocks, in stream order: ``rows[i]`` of ``blocks[which[i]]``."""

    def __init__(self, blocks: list[dict[str, np.ndarray]], which: np.ndarray, rows: np.ndarray):
        self.blocks, self.which, self.rows = blocks, which, rows

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, count: int) -> tuple["_Placed", "_Placed"]:
        return (_Placed(self.blocks, self.which[:count], self.rows[:count]),
                _Placed(self.blocks, self.which[count:], self.rows[count:]))


def _gather(pieces: list[_Placed]) -> dict[str, np.ndarray]:
    """One batch from rows of several blocks: each row copied once, straight into the batch."""
    first = pieces[0].blocks[0]
    size = sum(len(p) for p in pieces)
    out = {name: np.empty((size, *values.shape[1:]), dtype=values.dtype) for name, values in first.items()}
    at = 0
    for piece in pieces:
        for index, block in enumerate(piece.blocks):
            mine = np.flatnonzero(piece.which == index)
            if len(mine):
                for name, values in block.items():
                    out[name][at + mine] = values[piece.rows[mine]]
        at += len(piece)
    return out


def _group_rows(blocks: Iterator[dict[str, np.ndarray]], end: int, count: int,
                leftover: list[dict[str, np.ndarray]]) -> _Placed:
    """The ``count`` rows before stream position ``end``, in stream order, from the
    ``leftover`` blocks and then ``blocks``; rows past ``end`` stay in (or go to) ``leftover``."""
    taken, later, have = [], [], 0

    def take(block: dict[str, np.ndarray]) -> None:
        nonlocal have
        past = block["position"] >= end
        if past.any():  # rows of a later group (not from plan-ordered reads; kept general)
            later.append({name: values[past] for name, values in block.items()})
            block = {name: values[~past] for name, values in block.items()}
        if len(block["position"]):
            taken.append(block)
            have += len(block["position"])

    for block in leftover:
        take(block)
    while have < count:
        block = next(blocks, None)
        if block is None:
            raise RuntimeError(f"the training data ended {count - have} rows short of a planned group")
        take(block)
    leftover[:] = later
    if have != count:
        raise RuntimeError(f"a planned group of {count} training rows came back with {have}")
    positions = np.concatenate([b["position"] for b in taken])
    which = np.concatenate([np.full(len(b["position"]), i) for i, b in enumerate(taken)])
    rows = np.concatenate([np.arange(len(b["position"])) for b in taken])
    order = np.argsort(positions, kind="stable")
    return _Placed(taken, which[order], rows[order])


def stream_batches(chapters: Iterator[tuple[Iterator[dict[str, np.ndarray]], list[tuple[int, int]]]],
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Parts of an epoch — each its blocks of preprocessed rows (in plan order, each with
    ``position``) and its mixing groups ``(end, count)`` — -> batches of ``batch_size`` rows in
    stream order; a last partial batch is dropped. Each group is put in order once all its rows
    are in; the rows are then copied once, into their batch (pictures are most of a batch's
    bytes, and this runs in the training process). The next part's blocks are asked for when
    this part is half consumed, so that its reads run before this part's last rows are used.

    Raises:
        RuntimeError: the reads gave other rows than planned (a changed file, a lost task).
    """
    carry: list[_Placed] = []
    have = 0
    upcoming = next(chapters, None)
    while upcoming is not None:
        blocks, groups = upcoming
        upcoming = None
        leftover: list[dict[str, np.ndarray]] = []
        for index, (end, count) in enumerate(groups):
            if index == len(groups) // 2:
                upcoming = _started(next(chapters, None))
            placed = _group_rows(blocks, end, count, leftover)
            while have + len(placed) >= batch_size:
                head, placed = placed.split(batch_size - have)
                yield _gather([*carry, head])
                carry, have = [], 0
            if len(placed):
                carry.append(placed)
                have += len(placed)
        if leftover or next(blocks, None) is not None:
            raise RuntimeError("the training data gave more rows than planned")
        if not groups:
            upcoming = _started(next(chapters, None))


def _started(chapter):
    """A part of the epoch whose first block is being fetched from now on (in a thread)."""
    if chapter is None:
        return None
    blocks, groups = chapter
    return fetch_first_ahead(blocks), groups
