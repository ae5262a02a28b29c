"""Which scored rows a filter keeps: exact duplicates out, then a score threshold.

- **Duplicates**: rows whose images have the same SHA-256 are copies; of each set the row with
  the best score stays (ties: the first in shard order). Found with a hash shuffle in Ray Data,
  so every image's copies meet in one block whatever the dataset's size.
- **Kept fraction**: the threshold is the score of the ``k``-th best candidate (a good row that
  is no duplicate), found exactly without holding the scores in one place: the range, a 65,536-bin
  histogram, then the scores of the one bin the ``k``-th best falls in. Rows tied with it are kept.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..storage import write_bytes_atomically

HISTOGRAM_BINS = 65_536
# Rows per block of the duplicate search's shuffle: ~50 bytes a row keeps a block far under
# Ray Data's block size, so each block is whole (every copy of an image in it).
DUPLICATE_BLOCK_ROWS = 500_000
FILES_PER_TASK = 64
NO_ROWS = np.zeros(0, dtype=np.int64)


def read_scores(filesystem: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with filesystem.open_input_file(path) as handle:
        return pq.read_table(handle, columns=columns)


def candidate_mask(table: pa.Table, duplicates: np.ndarray) -> np.ndarray:
    """Rows of one shard's scores that may be kept: good rows that are not duplicates."""
    good = table.column("problem").is_null().to_numpy(zero_copy_only=False)
    if len(duplicates):
        good &= ~np.isin(table.column("row").to_numpy(), duplicates)
    return good


def duplicates_in_block(block: pa.Table) -> pa.Table:
    """``(shard, row)`` of every copy but the best-scored of each image in ``block``, which holds
    every row of the images it has."""
    block = block.take(pc.sort_indices(block, [("image_sha256", "ascending"), ("score", "descending"),
                                               ("shard", "ascending"), ("row", "ascending")]))
    n = block.num_rows
    hashes = block.column("image_sha256").combine_chunks()
    digests = np.frombuffer(hashes.buffers()[1], dtype=np.uint8)[hashes.offset * 32:(hashes.offset + n) * 32]
    digests = digests.reshape(n, 32)
    repeat = np.zeros(n, dtype=bool)
    repeat[1:] = (digests[1:] == digests[:-1]).all(axis=1)
    return block.filter(pa.array(repeat)).select(["shard", "row"])


def _good_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column("image_sha256").is_valid()).select(["shard", "row", "score", "image_sha256"])


def find_duplicates(filesystem: pafs.FileSystem, score_files: list[str], good_rows: int) -> dict[int, np.ndarray]:
    """Shard index -> rows (sorted) that are copies of a better-scored row's image."""
    import ray.data

    if good_rows < 2:
        return {}
    scores = ray.data.read_parquet(score_files, filesystem=filesystem).select_columns(["shard", "row", "score", "image_sha256"])
    partitions = max(1, math.ceil(good_rows / DUPLICATE_BLOCK_ROWS))
    copies = (scores.map_batches(_good_rows, batch_format="pyarrow", batch_size=None)
              .repartition(partitions, keys=["image_sha256"])
              .map_batches(duplicates_in_block, batch_format="pyarrow", batch_size=None))
    found: dict[int, list[np.ndarray]] = {}
    for batch in copies.iter_batches(batch_size=None, batch_format="pyarrow"):
        shard, row = batch.column("shard").to_numpy(), batch.column("row").to_numpy()
        for index in np.unique(shard):
            found.setdefault(int(index), []).append(row[shard == index])
    return {index: np.sort(np.concatenate(parts)) for index, parts in found.items()}


def save_duplicates(filesystem: pafs.FileSystem, path: str, duplicates: dict[int, np.ndarray]) -> None:
    shards = [np.full(len(rows), index, dtype=np.int32) for index, rows in sorted(duplicates.items())]
    rows = [rows for _, rows in sorted(duplicates.items())]
    table = pa.table({"shard": pa.array(np.concatenate(shards) if shards else np.zeros(0, np.int32), pa.int32()),
                      "row": pa.array(np.concatenate(rows) if rows else NO_ROWS, pa.int64())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomically(filesystem, path, buffer.getvalue())


def load_duplicates(filesystem: pafs.FileSystem, path: str) -> dict[int, np.ndarray]:
    table = read_scores(filesystem, path)
    shard, row = table.column("shard").to_numpy(), table.column("row").to_numpy()
    return {int(index): np.sort(row[shard == index]) for index in np.unique(shard)}


def _candidate_scores(filesystem, files: list[tuple[int, str]], duplicates: dict[int, np.ndarray]) -> np.ndarray:
    parts = []
    for index, path in files:
        table = read_scores(filesystem, path, ["row", "score", "problem"])
        parts.append(table.column("score").to_numpy()[candidate_mask(table, duplicates.get(index, NO_ROWS))])
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def _bins(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, len(edges) - 2)


def _range_of(filesystem, files, duplicates) -> tuple[int, float, float]:
    scores = _candidate_scores(filesystem, files, duplicates)
    return (len(scores), float(scores.min()), float(scores.max())) if len(scores) else (0, math.inf, -math.inf)


def _histogram_of(filesystem, files, duplicates, edges) -> np.ndarray:
    return np.bincount(_bins(_candidate_scores(filesystem, files, duplicates), edges), minlength=len(edges) - 1)


def _scores_in_bin(filesystem, files, duplicates, edges, wanted: int) -> np.ndarray:
    scores = _candidate_scores(filesystem, files, duplicates)
    return scores[_bins(scores, edges) == wanted]


def candidate_count(filesystem: pafs.FileSystem, files: list[tuple[int, str]],
                    duplicates: dict[int, np.ndarray]) -> tuple[int, float, float]:
    """``(candidates, lowest score, highest score)`` over the score files ``(shard index, path)``."""
    results = _over_groups(_range_of, filesystem, files, duplicates)
    return sum(r[0] for r in results), min(r[1] for r in results), max(r[2] for r in results)


def kth_best_score(filesystem: pafs.FileSystem, files: list[tuple[int, str]], duplicates: dict[int, np.ndarray],
                   k: int, low: float, high: float) -> float:
    """The ``k``-th highest candidate score (``k`` ≥ 1, at most the candidates)."""
    if low == high:
        return low
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    counts = np.sum(_over_groups(_histogram_of, filesystem, files, duplicates, edges), axis=0)
    above = np.cumsum(counts[::-1])  # above[j]: candidates in the top j + 1 bins
    top = int(np.searchsorted(above, k))  # the k-th best is in the (top + 1)-th bin from the top
    wanted = len(counts) - 1 - top
    before = int(above[top - 1]) if top else 0
    in_bin = np.sort(np.concatenate(_over_groups(_scores_in_bin, filesystem, files, duplicates, edges, wanted)))[::-1]
    return float(in_bin[k - before - 1])


def _over_groups(fn, filesystem, files, duplicates, *args) -> list:
    """``fn(filesystem, group, its duplicates, *args)`` over groups of score files, as Ray tasks."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    refs = []
    for start in range(0, len(files), FILES_PER_TASK):
        group = files[start:start + FILES_PER_TASK]
        refs.append(task.remote(filesystem, group, {i: duplicates[i] for i, _ in group if i in duplicates}, *args))
    return ray.get(refs)
