"""Where each sample of a WebDataset tar starts: read a training task's rows by their byte ranges.

A training read task takes a stretch of one tar's rows (`.epoch_plan`: a unit's rows in
their own order, cut into reads); streamed, every task would read the tar from its start to its
last row — a 10,000-sample tar read by ten tasks, five times over. Instead a task streams only
from the nearest sample start this node already knows (the tar's start at first) to the start
of the sample after its last, noting each sample's offset on the way; the offsets (8 bytes a
sample) are kept on the node's disk, keyed by the tar's path, size and modification time, and a
task whose samples are all known reads just their bytes: one ranged read per run of nearby
samples, several at once on an object store. So every byte of a tar is streamed about once per
node, whatever the order of the tasks. Compressed tars have no offsets to jump to: streamed whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

INDEX_DIR = Path(tempfile.gettempdir()) / "vcl-dist-tar-index"
# Samples closer than this are read in one request (a few images' bytes cost less than a request).
MERGE_GAP_BYTES = 256 * 1024
RANGED_READ_THREADS = 8
STREAM_BUFFER_BYTES = 4 * 2**20
TAR_BLOCK = 512


def member_key(name: str) -> tuple[str, str] | None:
    """``a/b/0001.jpg`` -> ``("0001", "jpg")``; None for a name without an extension."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    key, ext = base.split(".", 1)
    return key, ext.lower()


def index_file(filesystem: pafs.FileSystem, tar_path: str) -> Path:
    """Where this node keeps the index of this version of the tar."""
    info = filesystem.get_file_info(tar_path)
    identity = f"{filesystem.type_name}|{tar_path}|{info.size}|{info.mtime_ns}"
    return INDEX_DIR / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.npz"


@dataclass
class TarIndex:
    """The known sample starts of a tar (``offsets[i]``: where sample ``i``'s first header is),
    the first ``len(offsets)`` samples; ``complete``: the last entry is the end of the last sample."""

    offsets: np.ndarray
    complete: bool

    def covers(self, rows: list[int]) -> bool:
        """Whether the byte range of every sample at ``rows`` is known (sample ``r`` ends where
        ``r + 1`` starts, or, the last, at the recorded end)."""
        return not rows or rows[-1] + 1 < len(self.offsets)


def load_index(path: Path) -> TarIndex | None:
    try:
        with np.load(path) as saved:
            return TarIndex(saved["offsets"], bool(saved["complete"]))
    except (OSError, ValueError, KeyError):
        return None


def save_index(path: Path, index: TarIndex) -> None:
    """Written beside and renamed (a task never loads half an index), and only when it knows
    more than the index there now (another task may have written a longer one meanwhile)."""
    there = load_index(path)
    if there is not None and (there.complete or len(there.offsets) >= len(index.offsets)) and not index.complete:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp-{os.getpid()}")
    with open(partial, "wb") as out:
        np.savez(out, offsets=index.offsets, complete=np.array(index.complete))
    os.replace(partial, path)


def is_compressed(filesystem: pafs.FileSystem, tar_path: str) -> bool:
    with filesystem.open_input_file(tar_path) as file:
        head = file.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00"


def resume_point(rows: list[int], known: TarIndex | None) -> tuple[int, int]:
    """``(sample, byte offset)`` to start streaming at for ``rows``: the last known sample start
    at or before the first of them (the tar's start when none is known)."""
    if known is None or not rows or not len(known.offsets):
        return 0, 0
    first = min(rows[0], len(known.offsets) - 1)
    return first, int(known.offsets[first]) if first else 0


class TarSamples:
    """The samples of a tar being streamed, grouped WebDataset's way: a run of consecutive files
    with one key is one sample.

    Iterating yields ``(index, key, payloads)`` of each sample once its last file is passed;
    ``payloads`` (``{extension: bytes}``) is read only for the samples ``wanted`` accepts, else
    None. With ``stop_after``, the walk ends at the start of the sample after that one, without
    reading it. Afterwards ``starts`` holds the byte offset of every sample start met, ``end``
    the end of the last file read, and ``complete`` whether the tar's end was reached.

    Args:
        tar: a ``tarfile`` opened for streaming (``mode="r|"``), positioned ``base`` bytes into the file.
        base: where in the file the stream begins (a known sample start, or 0).
        first_index: the index of the first sample in the stream.
        wanted: which sample indices to read the payloads of.
        stop_after: the last sample index needed; None: the whole tar.
    """

    def __init__(self, tar: tarfile.TarFile, base: int = 0, first_index: int = 0,
                 wanted: Callable[[int], bool] = lambda index: True, stop_after: int | None = None):
        self.tar, self.base, self.first_index, self.wanted, self.stop_after = tar, base, first_index, wanted, stop_after
        self.starts: list[int] = []
        self.end, self.complete = base, True

    def __iter__(self) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
        index, key, payloads = self.first_index - 1, None, None
        for member in self.tar:
            named = member_key(member.name) if member.isfile() else None
            if named is None:
                continue
            if named[0] != key:
                if key is not None:
                    yield index, key, payloads
                index, key = index + 1, named[0]
                self.starts.append(self.base + member.offset)
                if self.stop_after is not None and index > self.stop_after:
                    self.complete = False  # the next sample's start is all this walk needed of it
                    return
                payloads = {} if self.wanted(index) else None
            if payloads is not None:
                payloads.setdefault(named[1], self.tar.extractfile(member).read())
            self.end = self.base + member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
        if key is not None:
            yield index, key, payloads


def stream_samples(filesystem: pafs.FileSystem, tar_path: str, rows: list[int], known: TarIndex | None):
    """Stream the tar from the last known sample start at or before the first of ``rows`` up to
    the start of the sample after the last: ``(found, index)`` — the ``(index, key, {ext:
    bytes})`` of the samples at ``rows``, and the index extended by what was passed."""
    wanted = set(rows)
    first, base = resume_point(rows, known)
    with filesystem.open_input_file(tar_path) as raw:
        raw.seek(base)
        # Large reads: on an object store each read of the raw file is a request.
        stream = pa.BufferedInputStream(raw, buffer_size=STREAM_BUFFER_BYTES)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            walk = TarSamples(tar, base, first, wanted.__contains__, rows[-1] if rows else -1)
            found = [sample for sample in walk if sample[2] is not None]
    before = known.offsets[:first] if known is not None else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([before, np.array(walk.starts + ([walk.end] if walk.complete else []), dtype=np.int64)])
    return found, TarIndex(offsets, walk.complete)


def _parse_sample(index: int, data: bytes) -> tuple[int, str, dict[str, bytes]]:
    """One sample's bytes (its members, headers included) -> ``(index, key, {ext: bytes})``."""
    key, payloads = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            named = member_key(member.name) if member.isfile() else None
            if named is not None:
                key = key or named[0]
                payloads.setdefault(named[1], tar.extractfile(member).read())
    return index, key, payloads


def ranged_samples(filesystem: pafs.FileSystem, tar_path: str, offsets: np.ndarray, rows: list[int]):
    """The samples at ``rows`` (increasing) read by byte range: ``(index, key, {ext: bytes})``."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and offsets[row] - offsets[runs[-1][-1] + 1] <= MERGE_GAP_BYTES:
            runs[-1].append(row)
        else:
            runs.append([row])
    with filesystem.open_input_file(tar_path) as file:

        def read_run(run: list[int]) -> list:
            start = int(offsets[run[0]])
            data = file.read_at(int(offsets[run[-1] + 1]) - start, start)
            return [_parse_sample(row, data[offsets[row] - start:offsets[row + 1] - start]) for row in run]

        local = isinstance(filesystem, pafs.LocalFileSystem)
        if local or len(runs) == 1:
            parts = [read_run(run) for run in runs]
        else:
            with ThreadPoolExecutor(max_workers=RANGED_READ_THREADS) as pool:
                parts = list(pool.map(read_run, runs))
    return [sample for part in parts for sample in part]


def indexed_samples(filesystem: pafs.FileSystem, tar_path: str, rows: list[int]):
    """The samples at ``rows`` (increasing) as ``(index, key, {ext: bytes})``: by byte range
    where this node knows where they are, else streamed from the nearest known sample start (and
    the index extended and kept); a compressed tar streamed from its start."""
    where = index_file(filesystem, tar_path)
    known = load_index(where)
    if known is not None and (known.covers(rows) or known.complete):
        # A complete index also knows the tar has no samples past its last: the caller says so.
        inside = [row for row in rows if row + 1 < len(known.offsets)]
        return ranged_samples(filesystem, tar_path, known.offsets, inside)
    if is_compressed(filesystem, tar_path):
        from .webdataset import _samples

        wanted = set(rows)
        return [sample for sample in _samples(filesystem, tar_path, payloads=True) if sample[0] in wanted]
    found, index = stream_samples(filesystem, tar_path, rows, known)
    save_index(where, index)
    return found
