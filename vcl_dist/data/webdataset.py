"""WebDataset tars as img2dataset writes them: ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt``,
optional ``{key}.cls`` (class id) or ``{key}.json`` (``label``/``cls``, ``image_id``).

Ray Data's ``read_webdataset`` groups a tar's members by key into one row of raw bytes per
extension; :func:`to_shard_columns` turns such rows into the columns of the Parquet shard
format, so everything downstream sees one format.
"""

from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from ..storage import list_files
from .shard_format import IMAGE_EXTENSIONS, caption_text, json_object


def _tar_members(filesystem: pafs.FileSystem, tar_path: str):
    """``(key, extension, tar, member)`` of every file in one tar, streamed (payloads not kept)."""
    with filesystem.open_input_stream(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.rsplit("/", 1)[-1].split(".", 1)
                yield key, ext.lower(), tar, member


def _members(filesystem: pafs.FileSystem, path: str):
    """``(key, extension, tar, member)`` of every member of every tar under ``path``."""
    for tar_path in list_files(filesystem, path, "tar"):
        yield from _tar_members(filesystem, tar_path)


def webdataset_row_count(filesystem: pafs.FileSystem, path: str) -> int:
    """Samples (keys with an image) in the tars under ``path``.

    From img2dataset's ``{shard}_stats.json`` files (``successes``: the samples it wrote) when
    every tar has one, which reads no tar at all; else by reading the tars, 16 at a time.
    """
    tars = list_files(filesystem, path, "tar")
    counted = _counts_from_stats(filesystem, tars)
    if counted is not None:
        return counted
    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(lambda tar: _count_samples(filesystem, tar), tars))


def _counts_from_stats(filesystem: pafs.FileSystem, tars: list[str]) -> int | None:
    stats = [tar.removesuffix(".tar") + "_stats.json" for tar in tars]
    if not stats or any(info.type != pafs.FileType.File for info in filesystem.get_file_info(stats)):
        return None

    def successes(file: str) -> int | None:
        with filesystem.open_input_stream(file) as stream:
            value = json_object(stream.read()).get("successes")
        return value if isinstance(value, int) and value >= 0 else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(successes, stats))
    return None if None in counts else sum(counts)


def _count_samples(filesystem: pafs.FileSystem, tar_path: str) -> int:
    """Keys with an image in one tar."""
    return len({key for key, ext, _, _ in _tar_members(filesystem, tar_path) if ext in IMAGE_EXTENSIONS})


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
