"""WebDataset tars as img2dataset writes them: ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt``,
optional ``{key}.cls`` (class id) or ``{key}.json`` (``label``/``cls``, ``image_id``).

A sample is a run of consecutive members with one key (WebDataset's grouping), one row of raw
bytes per extension: Ray Data's ``read_webdataset`` reads them so for evaluation, and
`read_tar_rows` reads the samples at given indices of one tar for the training plan
(`.train_stream`); `to_shard_columns` turns such rows into the columns of the
Parquet shard format, so everything downstream sees one format.
"""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs

from ..storage import list_files
from .shard_format import caption_text, json_object
from .tar_index import TarSamples, indexed_samples, member_key


def _tar_members(filesystem: pafs.FileSystem, tar_path: str):
    """``(key, extension, tar, member)`` of every file in one tar, streamed (payloads not kept)."""
    with filesystem.open_input_stream(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            named = member_key(member.name) if member.isfile() else None
            if named is not None:
                yield *named, tar, member


def _members(filesystem: pafs.FileSystem, path: str):
    """``(key, extension, tar, member)`` of every member of every tar under ``path``."""
    for tar_path in list_files(filesystem, path, "tar"):
        yield from _tar_members(filesystem, tar_path)


def webdataset_row_count(filesystem: pafs.FileSystem, path: str) -> int:
    """Samples in the tars under ``path`` (see `webdataset_tar_rows`)."""
    return sum(rows for _, rows in webdataset_tar_rows(filesystem, path))


def webdataset_tar_rows(filesystem: pafs.FileSystem, path: str) -> list[tuple[str, int]]:
    """``(tar, samples)`` of every tar under ``path``, in name order.

    From img2dataset's ``{shard}_stats.json`` files (``successes``: the samples it wrote) when
    every tar has one, which reads no tar at all; else by reading the tars, 16 at a time.
    """
    tars = list_files(filesystem, path, "tar")
    counted = _counts_from_stats(filesystem, tars)
    if counted is None:
        with ThreadPoolExecutor(max_workers=16) as pool:
            counted = list(pool.map(lambda tar: _count_samples(filesystem, tar), tars))
    return list(zip(tars, counted))


def _counts_from_stats(filesystem: pafs.FileSystem, tars: list[str]) -> list[int] | None:
    stats = [tar.removesuffix(".tar") + "_stats.json" for tar in tars]
    if not stats or any(info.type != pafs.FileType.File for info in filesystem.get_file_info(stats)):
        return None

    def successes(file: str) -> int | None:
        with filesystem.open_input_stream(file) as stream:
            value = json_object(stream.read()).get("successes")
        return value if isinstance(value, int) and value >= 0 else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(successes, stats))
    return None if None in counts else counts


def _count_samples(filesystem: pafs.FileSystem, tar_path: str) -> int:
    """Samples in one tar: runs of consecutive members with one key (WebDataset's grouping)."""
    return sum(1 for _ in _samples(filesystem, tar_path))


def _samples(filesystem: pafs.FileSystem, tar_path: str, payloads: bool = False):
    """``(index, key, {extension: bytes})`` of every sample of one tar, in order, streamed; the
    payloads are read only with ``payloads`` (else the dicts are empty)."""
    with filesystem.open_input_stream(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for index, key, found in TarSamples(tar, wanted=lambda index: payloads):
            yield index, key, found if found is not None else {}


def read_tar_rows(filesystem: pafs.FileSystem, tar_path: str, rows) -> dict[str, np.ndarray]:
    """The samples at ``rows`` (indices, increasing) of one tar, as the columns that Ray Data's
    ``read_webdataset`` gives (``__key__`` and one column of bytes per extension): by byte
    range once this node knows where the tar's samples start (`.tar_index`)."""
    found = indexed_samples(filesystem, tar_path, [int(i) for i in rows])
    if len(found) != len(rows):
        missing = sorted({int(i) for i in rows} - {index for index, _, _ in found})[0]
        raise ValueError(f"{tar_path}: ends before its sample {missing + 1}, which the training plan counted "
                         "(was the tar changed during the run?)")
    return _sample_columns(found)


def _sample_columns(found: list) -> dict[str, np.ndarray]:
    """``(index, key, {ext: bytes})`` samples -> ``__key__`` and one column of bytes per extension
    (None where a sample lacks it)."""
    extensions = sorted({ext for _, _, payloads in found for ext in payloads})
    columns = {"__key__": np.array([key for _, key, _ in found], dtype=object)}
    for ext in extensions:
        columns[ext] = np.array([payloads.get(ext) for _, _, payloads in found], dtype=object)
    return columns


def tar_sample_batches(filesystem: pafs.FileSystem, tar_path: str, batch_rows: int):
    """Every sample of one tar, in order, as columns like `read_tar_rows`'s, ``batch_rows``
    samples at a time; each batch also has ``__index__``, the samples' indices in the tar."""
    found: list = []

    def columns() -> dict[str, np.ndarray]:
        return {**_sample_columns(found), "__index__": np.array([index for index, _, _ in found], dtype=np.int64)}

    for sample in _samples(filesystem, tar_path, payloads=True):
        found.append(sample)
        if len(found) == batch_rows:
            yield columns()
            found = []
    if found:
        yield columns()


def webdataset_captions(filesystem: pafs.FileSystem, path: str, limit: int) -> list[str]:
    captions = []
    for _, ext, tar, member in _members(filesystem, path):
        if ext == "txt":
            text = caption_text(tar.extractfile(member).read())
            if text:
                captions.append(text)
            if len(captions) >= limit:
                break
    return captions
