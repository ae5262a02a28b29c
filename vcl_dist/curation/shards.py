"""The shards a filter reads and writes: which they are, their rows, a filtered copy of each.

Input shards are Parquet files or WebDataset tars (local or ``s3://``), each known by its index
in name order; output shards are Parquet in the shard format (a Parquet input keeps its own
columns), one per input shard that keeps a row, at the input's relative path with ``.parquet``.
"""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..data.shard_format import SHARD_SCHEMA, caption_text, parse_label, to_shard_columns
from ..data.webdataset import tar_sample_batches, webdataset_tar_rows
from ..storage import GLOB_CHARACTERS, list_files, write_bytes_atomically


@dataclass(frozen=True)
class InputShard:
    """One input shard: its index (name order), path inside the filesystem, and rows."""

    index: int
    path: str
    rows: int


def detect_format(filesystem: pafs.FileSystem, path: str) -> str:
    """``webdataset`` when ``path`` holds tars, else ``parquet``.

    Raises:
        FileNotFoundError: neither is there (one line).
    """
    for kind, extension in (("webdataset", "tar"), ("parquet", "parquet")):
        try:
            list_files(filesystem, path, extension)
            return kind
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"no .tar or .parquet shards at {path}")


def list_input_shards(filesystem: pafs.FileSystem, path: str, kind: str) -> list[InputShard]:
    """Every shard under ``path`` with its rows (Parquet footers; tars' ``_stats.json`` or members)."""
    if kind == "webdataset":
        counted = webdataset_tar_rows(filesystem, path)
    else:
        files = list_files(filesystem, path, "parquet")

        def rows(file: str) -> int:
            with filesystem.open_input_file(file) as handle:
                return pq.ParquetFile(handle).metadata.num_rows

        with ThreadPoolExecutor(max_workers=16) as pool:
            counted = list(zip(files, pool.map(rows, files)))
    return [InputShard(i, file, rows) for i, (file, rows) in enumerate(counted)]


def input_root(path: str, shards: list[InputShard]) -> str:
    """The folder the shards' output names are relative to: ``path`` itself when it is a folder
    of them, else (a glob, one file) the folder the shards share."""
    if not any(c in path for c in GLOB_CHARACTERS) and not any(s.path == path for s in shards):
        return path.rstrip("/")
    return posixpath.commonpath([posixpath.dirname(s.path) for s in shards]) if shards else path


def output_name(shard: InputShard, root: str) -> str:
    """``a/b-0001.tar`` -> ``a/b-0001.parquet``: the output shard's path relative to the output folder."""
    relative = posixpath.relpath(shard.path, root) if root else shard.path
    return relative.rsplit(".", 1)[0] + ".parquet"


def shard_batches(filesystem: pafs.FileSystem, shard: InputShard, kind: str, batch_rows: int):
    """The raw rows of one shard, in order, ``batch_rows`` at a time, as shard-format columns
    plus ``row`` (the row's index in the shard)."""
    if kind == "webdataset":
        for batch in tar_sample_batches(filesystem, shard.path, batch_rows):
            columns = to_shard_columns(batch)
            columns["row"] = batch["__index__"]
            yield columns
        return
    start = 0
    with filesystem.open_input_file(shard.path) as handle:
        for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
            columns = {name: np.fromiter(record_batch.column(i).to_pylist(), dtype=object, count=record_batch.num_rows)
                       for i, name in enumerate(record_batch.schema.names)}
            columns["row"] = np.arange(start, start + record_batch.num_rows, dtype=np.int64)
            start += record_batch.num_rows
            yield columns


def kept_rows_table(filesystem: pafs.FileSystem, shard: InputShard, kind: str, kept: np.ndarray) -> pa.Table:
    """The rows at ``kept`` (indices, increasing) of one shard: a Parquet shard's own columns; a
    tar's as the shard format's (caption as text, label as class id, -1 unlabeled)."""
    if kind == "parquet":
        with filesystem.open_input_file(shard.path) as handle:
            return pq.read_table(handle).take(pa.array(kept, pa.int64()))
    wanted = set(int(i) for i in kept)
    parts = []
    for batch in tar_sample_batches(filesystem, shard.path, 1024):
        take = np.array([int(i) in wanted for i in batch["__index__"]], dtype=bool)
        if take.any():
            columns = to_shard_columns({name: values[take] for name, values in batch.items()})
            parts.append(pa.table({
                "key": pa.array([str(k) for k in columns["key"]], pa.string()),
                "image": pa.array([bytes(v) for v in columns["image"]], pa.binary()),
                "caption": pa.array([caption_text(c) for c in columns["caption"]], pa.string()),
                "label": pa.array([parse_label(v) for v in columns["label"]], pa.int64()),
                "image_id": pa.array([None if v is None else str(v) for v in columns["image_id"]], pa.string()),
            }, schema=SHARD_SCHEMA))
    return pa.concat_tables(parts) if parts else SHARD_SCHEMA.empty_table()


def write_shard(filesystem: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write one output shard whole or not at all (into place by a rename; an object's upload
    is all or nothing)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1024)
    write_bytes_atomically(filesystem, path, buffer.getvalue())
