"""Bytes and time of training's reads of WebDataset tars: streamed from the tar's start (each
task to its last row) against reads that resume from known sample offsets (`vcl_dist.data.tar_index`).

    python benchmarks/tar_reads.py [--samples 10000] [--task-rows 1024] [--epochs 2]

Writes one tar of ``--samples`` samples (a random 20–40 KB "image", a caption and a class id each:
LAION-like sizes), then reads it as one training worker's tasks do when a mixing group holds the
tar: ``--task-rows`` consecutive rows per task, the tasks in a random order each epoch. Prints,
per way and epoch, the bytes read from the tar (as a multiple of its size) and the seconds.
Local disk; on an object store the bytes are what the network carries.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from common import table_header, table_row

from vcl_dist.data import tar_index


def write_tar(path: Path, samples: int, rng: np.random.Generator) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            for ext, data in (("jpg", rng.bytes(int(rng.integers(20_000, 40_000)))), ("txt", f"caption {i}".encode()),
                              ("cls", str(i % 100).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class CountingFile(io.RawIOBase):
    """A local file that counts the bytes read from it."""

    def __init__(self, path: str, counter: list[int]):
        self.file, self.counter = open(path, "rb"), counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        n = self.file.readinto(buffer)
        self.counter[0] += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def counting_filesystem(counter: list[int]) -> pafs.FileSystem:
    """The local filesystem, with every byte read from an opened file counted in ``counter[0]``."""
    import fsspec

    class Handler(pafs.FSSpecHandler):
        def open_input_file(self, path):
            return pa.PythonFile(CountingFile(path, counter), mode="r")

    return pafs.PyFileSystem(Handler(fsspec.filesystem("file")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--task-rows", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "shard.tar"
        write_tar(path, args.samples, rng)
        size = path.stat().st_size
        tasks = [list(range(start, min(start + args.task_rows, args.samples)))
                 for start in range(0, args.samples, args.task_rows)]
        print(f"one tar of {args.samples:,} samples, {size / 2**20:,.0f} MiB; {len(tasks)} read tasks of up to "
              f"{args.task_rows} consecutive rows, in a new random order each epoch\n")
        print(table_header(["reads", "epoch", "bytes read (× the tar)", "seconds"], [False, True, True, True]))
        for way in ("streamed from the tar's start", "resumed from known offsets"):
            tar_index.INDEX_DIR = Path(folder) / "index"
            for epoch in range(args.epochs):
                counter = [0]
                fs = counting_filesystem(counter)
                started = time.perf_counter()
                for task in rng.permutation(len(tasks)):
                    rows = tasks[task]
                    if way.startswith("streamed"):
                        found, _ = tar_index.stream_samples(fs, str(path), rows, None)
                    else:
                        found = tar_index.indexed_samples(fs, str(path), rows)
                    assert [index for index, _, _ in found] == rows
                print(table_row([way, epoch + 1, f"{counter[0] / size:.2f}", f"{time.perf_counter() - started:.2f}"]))


if __name__ == "__main__":
    main()
