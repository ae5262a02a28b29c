"""Locked towers' outputs, computed once per training read unit and read back by row.

When a tower is locked whole (and, for pictures, not augmented), every epoch would run it on
the same inputs. Its outputs (the pooled features its trainable projection takes) are instead
computed once (`vcl_dist.train.locked_features`) into one Parquet file per read unit of the
training plan — ``unit-<index>.parquet`` with ``key`` and, per locked tower, ``image`` / ``text``
(the features) and ``image_valid`` / ``text_valid`` (0: the picture could not be decoded, the
caption is unusable) — under a folder named by a fingerprint of the towers' weights, the input
preparation and the units. Training then reads a unit's rows from its file instead of running
the tower, in the same order as the plan reads the rows themselves. A file is written whole or
not at all, and ``_complete.json`` is written last: an interrupted computation continues with
the units it had not finished.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

COMPLETE_FILE = "_complete.json"


def unit_file(folder: str, index: int) -> str:
    return f"{folder}/unit-{index:06d}.parquet"


def features_fingerprint(parts: list, units) -> str:
    """What the features depend on: ``parts`` (the towers' state dicts, how inputs are prepared),
    and which rows."""
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, dict):  # a state dict
            for name in sorted(part):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(part[name].detach().cpu().float().numpy()).tobytes())
        else:
            digest.update(repr(part).encode())
    for unit in units:
        digest.update(f"{unit.kind}|{unit.path}|{list(unit.row_groups)}|{unit.offset}|{unit.rows}".encode())
    return digest.hexdigest()


def _fixed_size(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def write_unit_features(filesystem: pafs.FileSystem, folder: str, index: int, keys, towers: dict[str, tuple]) -> None:
    """One unit's features, ``towers``: ``{"image" | "text": (valid [N], features [N, F])}``;
    written to a temporary name and moved into place (local), or as one object (S3: a put is
    all or nothing)."""
    columns = {"key": pa.array([str(k) for k in keys])}
    for tower, (valid, features) in towers.items():
        columns[tower] = _fixed_size(features)
        columns[f"{tower}_valid"] = pa.array(np.asarray(valid).astype(np.uint8))
    target = unit_file(folder, index)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    staging = f"{target}.partial" if local else target
    with filesystem.open_output_stream(staging) as out:
        pq.write_table(pa.table(columns), out)
    if local:
        filesystem.move(staging, target)


def read_unit_features(filesystem: pafs.FileSystem, folder: str, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``key`` and, per tower the file holds, ``image`` / ``text`` (``float32 [len(rows), F]``) and
    ``image_valid`` / ``text_valid`` of ``rows`` of unit ``index``.

    Raises:
        ValueError: the file holds fewer rows than asked for (one line).
    """
    with filesystem.open_input_file(unit_file(folder, index)) as file:
        table = pq.read_table(file)
    if len(rows) and int(rows[-1]) >= table.num_rows:
        raise ValueError(f"{unit_file(folder, index)}: {table.num_rows} rows, row {int(rows[-1])} asked for")
    table = table.take(pa.array(rows))
    out = {"key": np.array(table.column("key").to_pylist(), dtype=object)}
    for tower in ("image", "text"):
        if tower in table.column_names:
            column = table.column(tower).combine_chunks()
            out[tower] = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size).astype(np.float32)
            out[f"{tower}_valid"] = table.column(f"{tower}_valid").to_numpy().astype(np.uint8)
    return out


def missing_units(filesystem: pafs.FileSystem, folder: str, count: int) -> list[int]:
    """The units whose files are not there yet (all of them when the folder is new)."""
    if filesystem.get_file_info(f"{folder}/{COMPLETE_FILE}").type == pafs.FileType.File:
        return []
    info = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    present = {entry.base_name for entry in info}
    return [i for i in range(count) if unit_file(folder, i).rsplit("/", 1)[1] not in present]


def mark_complete(filesystem: pafs.FileSystem, folder: str, count: int, towers: list[str]) -> None:
    with filesystem.open_output_stream(f"{folder}/{COMPLETE_FILE}") as out:
        out.write(json.dumps({"units": count, "towers": towers}).encode())
