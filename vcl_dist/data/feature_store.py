"""A locked image tower's outputs, computed once per training read unit and read back by row.

When the image tower is locked whole and the pictures are not augmented, every epoch would run
the same tower on the same pixels. Its outputs (the pooled features the trainable projection
takes) are instead computed once (:mod:`vcl_dist.train.locked_features`) into one Parquet file
per read unit of the training plan — ``unit-<index>.parquet`` with ``key``, ``valid`` (0: the
picture could not be decoded) and ``features`` — under a folder named by a fingerprint of the
tower's weights, the picture geometry and the units. Training then reads a unit's rows from its
file instead of decoding pictures, in the same order as the plan reads the rows themselves.
A file is written whole or not at all, and ``_complete.json`` is written last: an interrupted
computation continues with the units it had not finished.
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


def features_fingerprint(tower_state: dict, geometry, units) -> str:
    """What the features depend on: the tower's weights, how pictures are prepared, which rows."""
    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(tower_state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tower_state[name].detach().cpu().float().numpy()).tobytes())
    digest.update(repr(geometry).encode())
    for unit in units:
        digest.update(f"{unit.kind}|{unit.path}|{list(unit.row_groups)}|{unit.offset}|{unit.rows}".encode())
    return digest.hexdigest()


def write_unit_features(filesystem: pafs.FileSystem, folder: str, index: int, keys, valid: np.ndarray,
                        features: np.ndarray) -> None:
    """One unit's features, written to a temporary name and moved into place (local), or as one
    object (S3: a put is all or nothing)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    table = pa.table({"key": pa.array([str(k) for k in keys]), "valid": pa.array(valid.astype(np.uint8)),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), features.shape[1])})
    target = unit_file(folder, index)
    local = isinstance(filesystem, pafs.LocalFileSystem)
    staging = f"{target}.partial" if local else target
    with filesystem.open_output_stream(staging) as out:
        pq.write_table(table, out)
    if local:
        filesystem.move(staging, target)


def read_unit_features(filesystem: pafs.FileSystem, folder: str, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``key``, ``valid`` and ``features`` ``float32 [len(rows), F]`` of ``rows`` of unit ``index``.

    Raises:
        ValueError: the file holds fewer rows than asked for (one line).
    """
    with filesystem.open_input_file(unit_file(folder, index)) as file:
        table = pq.read_table(file)
    if len(rows) and int(rows[-1]) >= table.num_rows:
        raise ValueError(f"{unit_file(folder, index)}: {table.num_rows} rows, row {int(rows[-1])} asked for")
    table = table.take(pa.array(rows))
    column = table.column("features").combine_chunks()
    width = column.type.list_size
    return {"key": np.array(table.column("key").to_pylist(), dtype=object),
            "valid": table.column("valid").to_numpy().astype(np.uint8),
            "features": column.values.to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=False)}


def missing_units(filesystem: pafs.FileSystem, folder: str, count: int) -> list[int]:
    """The units whose files are not there yet (all of them when the folder is new)."""
    if filesystem.get_file_info(f"{folder}/{COMPLETE_FILE}").type == pafs.FileType.File:
        return []
    info = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    present = {entry.base_name for entry in info}
    return [i for i in range(count) if unit_file(folder, i).rsplit("/", 1)[1] not in present]


def mark_complete(filesystem: pafs.FileSystem, folder: str, count: int, width: int) -> None:
    with filesystem.open_output_stream(f"{folder}/{COMPLETE_FILE}") as out:
        out.write(json.dumps({"units": count, "features": width}).encode())
