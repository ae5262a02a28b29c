"""Parquet shards read *and* preprocessed by one Ray Data read task per read unit.

``read_parquet`` followed by ``map_batches`` costs three things per epoch that this source
avoids (Ray 2.60, measured on 2 CPUs with 10,000 JPEGs at 224 px, see benchmarks/data_speed.py):

- its listing step starts footer-reading actors (new processes) for every execution, a second
  before the first read, every epoch of every split;
- the raw image bytes travel through the object store between the read and the decode tasks
  (Ray does not fuse ``read → map_batches(batch_size=…)``);
- the two operators split the CPUs between them while the reads are queued.

Here the footers are read once, when the dataset is built (16 at a time), into read units of
whole row groups, ≤ ``unit_bytes`` of encoded data each (the training split's units too: see
`.train_stream`), and each unit's task reads its row groups and runs the
`vcl_dist.data.preprocess.Preprocessor` on them, yielding model-ready blocks in file order.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from .shard_format import pylist_columns


@dataclass(frozen=True)
class ReadUnit:
    path: str
    row_groups: tuple[int, ...]
    rows: int
    group_rows: tuple[int, ...] = ()  # rows of each of ``row_groups``


def plan_read_units(filesystem: pafs.FileSystem, files: list[str], unit_bytes: int) -> list[ReadUnit]:
    """Consecutive row groups of each file packed into units of at most ``unit_bytes``
    (compressed; a larger row group is a unit of its own)."""

    def units_of(path: str) -> list[ReadUnit]:
        with filesystem.open_input_file(path) as file:
            metadata = pq.ParquetFile(file).metadata
        units, groups, sizes, rows, size = [], [], [], 0, 0
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            group_bytes = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            if groups and size + group_bytes > unit_bytes:
                units.append(ReadUnit(path, tuple(groups), rows, tuple(sizes)))
                groups, sizes, rows, size = [], [], 0, 0
            groups.append(index)
            sizes.append(group.num_rows)
            rows += group.num_rows
            size += group_bytes
        if groups:
            units.append(ReadUnit(path, tuple(groups), rows, tuple(sizes)))
        return units

    with ThreadPoolExecutor(max_workers=16) as pool:  # footers are small reads: latency-bound on S3
        return [unit for units in pool.map(units_of, files) for unit in units]


def read_and_preprocess(filesystem: pafs.FileSystem, unit: ReadUnit, batch_rows: int,
                        make_preprocessor: Callable[[], Callable[[dict], dict]]) -> Iterator:
    """One read task: the unit's rows, ``batch_rows`` at a time, preprocessed into blocks."""
    preprocess = make_preprocessor()
    with filesystem.open_input_file(unit.path) as file:
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, row_groups=list(unit.row_groups)):
            batch = pylist_columns(record_batch)
            batch["path"] = np.full(record_batch.num_rows, unit.path, dtype=object)  # names the shard of a bad row
            yield BlockAccessor.batch_to_block(preprocess(batch))


class PreprocessedParquet(Datasource):
    """A Ray Data source of model-ready rows from Parquet shards (see the module docstring).

    ``make_preprocessor``: a picklable factory of the per-task batch function.
    """

    def __init__(self, filesystem: pafs.FileSystem, units: list[ReadUnit], batch_rows: int,
                 make_preprocessor: Callable[[], Callable[[dict], dict]]):
        super().__init__()
        self.filesystem, self.units, self.batch_rows = filesystem, units, batch_rows
        self.make_preprocessor = make_preprocessor

    def get_name(self) -> str:
        return "ReadPreprocessParquet"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # decoded images are far larger than the files; Ray measures the blocks

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_and_preprocess, self.filesystem, unit, self.batch_rows, self.make_preprocessor),
                BlockMetadata(num_rows=unit.rows, size_bytes=None, exec_stats=None, input_files=(unit.path,)),
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]
