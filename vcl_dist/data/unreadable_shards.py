"""A shard that cannot be read any more, told apart from storage that cannot be reached.

A training read task that fails to read its rows asks the storage about the shard. When the
storage answers (the shard is there but its bytes do not parse, or it is gone), the shard is
unreadable: after one more try its rows become bad rows, which the run skips and counts
against ``data.max_bad_fraction`` like corrupt images. When the storage does not answer (an
endpoint down, a network cut), nothing is counted: the read waits and tries again, and past
`WAIT_FOR_STORAGE_S` it fails, so that the worker group restarts from its checkpoint
rather than train without the rows.
"""

from __future__ import annotations

import tarfile
import time
import zlib
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..runtime.console import one_line, say

# How long a read waits for storage that does not answer before it fails (an object store's
# outages are usually shorter; a longer one restarts the group from its checkpoint).
WAIT_FOR_STORAGE_S = 120.0
# What reading a shard raises when its bytes are not a shard (Parquet and Arrow errors, a tar
# or gzip cut short) or the storage failed: programming errors (TypeError, …) are not caught.
READ_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException)


def read_or_mark_unreadable(read: Callable[[], dict[str, np.ndarray]], filesystem: pafs.FileSystem, path: str,
                            rows: np.ndarray, sleep: Callable[[float], None] = time.sleep) -> dict[str, np.ndarray]:
    """``read()`` (the shard columns of ``rows`` of the shard ``path``), or, when the shard
    cannot be read while its storage answers, the same rows as bad rows (`unreadable_rows`).

    Raises:
        OSError: the storage did not answer for `WAIT_FOR_STORAGE_S`.
    """
    waited, delay, tries_while_answering = 0.0, 1.0, 0
    while True:
        try:
            return read()
        except READ_ERRORS as err:
            failure = err
        if storage_answers(filesystem, path):
            tries_while_answering += 1
            if tries_while_answering >= 2:  # the second failure with the storage up: the shard itself
                say(f"warning: shard {path} is unreadable ({type(failure).__name__}: {one_line(failure, 160)}): "
                    f"{len(rows)} of its rows counted as bad rows")
                return unreadable_rows(path, rows)
            continue
        if waited >= WAIT_FOR_STORAGE_S:
            raise OSError(f"cannot read shard {path}: its storage has not answered for {waited:.0f} s "
                          f"({type(failure).__name__}: {one_line(failure, 160)})") from failure
        sleep(delay)
        waited += delay
        delay = min(2 * delay, 16.0)


def storage_answers(filesystem: pafs.FileSystem, path: str) -> bool:
    """Whether the storage holding ``path`` answers a question about it (whatever the answer)."""
    try:
        filesystem.get_file_info(path)
        return True
    except OSError:
        return False


def unreadable_rows(path: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Shard columns for ``rows`` of ``path`` that the preprocessor turns into bad rows (no image,
    no caption); their keys name the shard and the row, since the shard cannot say them."""
    n = len(rows)
    return {"key": np.array([f"{path}#{int(row)}" for row in rows], dtype=object),
            "image": np.full(n, b"", dtype=object), "caption": np.full(n, None, dtype=object),
            "label": np.full(n, None, dtype=object)}
