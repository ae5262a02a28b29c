"""Images per second of training's input path against a torch DataLoader doing the same work.

    python benchmarks/data_speed.py [--images 10000] [--size 224] [--processes 2]

Every path reads the same Parquet shards of JPEGs (photo-like pictures of 256–512 px a side,
as a web crawl's are after img2dataset) and does the same per-row work: decode, the training
crop, resize to ``--size``, tokenise (`vcl_dist.data.preprocess.Preprocessor`), with the
same number of worker processes and the same batch size; the consumer only counts rows.

- *torch DataLoader, Pillow decode*: the baseline — a map-style Dataset in a DataLoader, and
  Pillow decoding and resizing, as OpenCLIP's input does;
- *torch DataLoader, fast decode*: the same DataLoader with training's JPEG decoder
  (`vcl_dist.data.train_decode`), to show what the decoder alone brings;
- *planned reads*: what one training worker reads (its planned reads as Ray Data tasks, put
  in stream order), with either decoder — the fast one is training's default (``data.decode=cpu``).

Prints a table of median images/s over ``--epochs`` rounds — in each, every path reads two epochs
back to back, as training does, and the second is timed — and the ratio to the baseline (per
core: every path has ``--processes`` processes). The data are generated on first use into ``--cache``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import machine, table_header
from PIL import Image

from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.data.shapes import ensure_shapes_dataset
from vcl_dist.data.tokenizer import train_wordpiece


def crawl_like(image: Image.Image, rng: np.random.Generator) -> bytes:
    """``image`` as a JPEG of 256–512 px a side with a photo's texture (flat shapes alone decode
    faster than photos do)."""
    width, height = (int(side) for side in rng.integers(256, 513, size=2))
    picture = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.int16)
    texture = np.asarray(Image.fromarray(rng.integers(0, 255, (height // 6 + 1, width // 6 + 1, 3), dtype=np.uint8))
                         .resize((width, height), Image.BICUBIC), dtype=np.int16)
    picture = np.clip(picture + (texture - 128) // 4 + rng.integers(-6, 7, picture.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def jpeg_shards(cache: Path, images: int) -> Path:
    """The shapes dataset's training rows as crawl-like JPEGs (`crawl_like`), in shards of 1000 rows."""
    return crawl_like_dataset(cache, images, 16) / "train"


def crawl_like_dataset(cache: Path, num_train: int, num_val: int) -> Path:
    """The shapes dataset with every picture a crawl-like JPEG (`crawl_like`): ``train/``
    and ``val/`` Parquet shards of 1000 rows and ``val/classes.txt``, as ``data.source=parquet``
    reads them."""
    out = cache / f"crawl-jpeg-{num_train}-{num_val}"
    if (out / "_SUCCESS").exists():
        return out
    source = ensure_shapes_dataset(cache, num_train, num_val, 128, 1, seed=0)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        table = pq.read_table(sorted((source / split).glob("*.parquet"))).to_pydict()
        table["image"] = [crawl_like(Image.open(io.BytesIO(data)), rng) for data in table["image"]]
        full = pa.table(table)
        (out / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, full.num_rows, 1000):
            pq.write_table(full.slice(start, 1000), out / split / f"part-{start // 1000:05d}.parquet")
    (out / "val" / "classes.txt").write_text((source / "classes.txt").read_text())
    (out / "_SUCCESS").write_text("")
    return out


class ParquetRows:
    """A map-style torch Dataset over the shards, batched by the same Preprocessor."""

    def __init__(self, folder: Path, preprocessor: Preprocessor, batch_size: int):
        self.files = sorted(folder.glob("*.parquet"))
        self.preprocessor, self.batch_size = preprocessor, batch_size
        self.chunks = [(f, start) for f in self.files for start in range(0, pq.ParquetFile(f).metadata.num_rows, batch_size)]

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, index):
        file, start = self.chunks[index]
        table = pq.read_table(file).slice(start, self.batch_size)
        return self.preprocessor({name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "vcl-dist"))
    args = parser.parse_args()

    import ray
    import torch
    from torch.utils.data import DataLoader

    from vcl_dist.config import DataConfig
    from vcl_dist.data.datasets import DatasetSource, build_train_split
    from vcl_dist.data.epoch_plan import fresh_ranges
    from vcl_dist.ray_cluster import use_ray_data_settings

    folder = jpeg_shards(Path(args.cache), args.images)
    captions = pq.read_table(sorted(folder.glob("*.parquet")), columns=["caption"]).column(0).to_pylist()
    tokenizer = train_wordpiece(captions, 4000)

    def loader(fast_decode: bool) -> DataLoader:
        preprocessor = Preprocessor(tokenizer, args.size, 32, augment=True, fast_decode=fast_decode)
        return DataLoader(ParquetRows(folder, preprocessor, args.batch_size), batch_size=None, shuffle=True,
                          num_workers=args.processes, persistent_workers=True)

    loaders = {"pillow": loader(False), "fast": loader(True)}
    use_ray_data_settings()  # as every vcl-dist pipeline gets them
    ray.init(num_cpus=args.processes, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    import pyarrow.fs as pafs

    source = DatasetSource("parquet", str(folder), str(folder), None, pafs.LocalFileSystem())
    splits = {decode: build_train_split(source, str(folder), DataConfig(image_size=args.size, decode=decode,
                                                                      preprocess_batch_size=args.batch_size),
                                        tokenizer, seed=0)
              for decode in ("pillow", "cpu")}
    epochs = iter(range(10**6))

    def planned(decode: str):
        # What one training worker reads: its planned reads as Ray Data tasks, in stream order.
        split = splits[decode]
        return lambda: split.batches(next(epochs), fresh_ranges(split.rows, 1)[0], args.batch_size, 2)

    paths = {
        "torch DataLoader, Pillow decode": lambda: iter(loaders["pillow"]),
        "torch DataLoader, fast decode": lambda: iter(loaders["fast"]),
        "planned reads (one training worker's stream), Pillow decode": planned("pillow"),
        "planned reads (one training worker's stream), fast decode: training's default": planned("cpu"),
    }
    # Rounds alternate between the paths, so that a busy spell of this shared machine slows all
    # alike. In a round, each path reads two epochs back to back and the second is timed: in
    # training an epoch follows another at once (the next one's reads start as one ends), while
    # a path left idle for the others' epochs would start cold (Ray's idle worker processes go).
    timings: dict[str, list[tuple[float, float, int]]] = {name: [] for name in paths}
    for _ in range(args.epochs):
        for name, epoch in paths.items():
            time_epoch(epoch())
            timings[name].append(time_epoch(epoch()))
    ray.shutdown()

    print(
        f"\n{args.images} JPEGs of 256–512 px to {args.size} px, {args.processes} worker processes, batch {args.batch_size}, "
        f"median of {args.epochs} timed epochs, torch {torch.__version__}, ray {ray.__version__}; {machine()}\n"
    )
    print(table_header(["path", "images/s", "× DataLoader", "first batch (s)", "images/s after the first batch", "× DataLoader"],
                       [False, True, True, True, True, True]))
    base = base_steady = None
    for name, runs in timings.items():
        rate = statistics.median(rows / total for total, _, rows in runs)
        steady = statistics.median(rows / (total - first) for total, first, rows in runs)
        first = statistics.median(first for _, first, _ in runs)
        base, base_steady = base or rate, base_steady or steady
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {first:.2f} | {steady:.0f} | {steady / base_steady:.2f} |")


def time_epoch(batches) -> tuple[float, float, int]:
    """(seconds for the epoch, seconds to its first batch, rows) of one pass over ``batches``."""
    start = time.perf_counter()
    first, rows = None, 0
    for batch in batches:
        first = first if first is not None else time.perf_counter() - start
        rows += len(batch["key"])
    return time.perf_counter() - start, first, rows


if __name__ == "__main__":
    main()
