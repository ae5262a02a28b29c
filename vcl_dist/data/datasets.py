"""Where the shards are and how they become Ray Datasets for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ..config import DataConfig
from .preprocess import Preprocessor
from .shapes import ensure_shapes_dataset


@dataclass(frozen=True)
class DatasetSource:
    """Resolved locations of one dataset's splits."""

    train: str
    val: str
    classes_path: str | None
    # The shapes cache lives on the driver's disk, which other nodes of a cluster cannot
    # read: such a dataset is loaded by the driver and handed to Ray's object store.
    driver_local: bool = False


def resolve_source(cfg: DataConfig) -> DatasetSource:
    """Generate the built-in dataset when asked for, else check that the shard paths exist."""
    if cfg.source == "shapes":
        s = cfg.shapes
        root = ensure_shapes_dataset(cfg.cache_dir, s.num_train, s.num_val, s.image_size, s.val_captions_per_image, s.seed)
        return DatasetSource(str(root / "train"), str(root / "val"), str(root / "classes.txt"), driver_local=True)
    classes = cfg.classes_path
    if classes is None:
        guess = cfg.val_path.rstrip("/") + "/classes.txt"
        classes = guess if _exists(guess) else None
    for key, path in (("data.train_path", cfg.train_path), ("data.val_path", cfg.val_path)):
        if not _exists(path):
            raise FileNotFoundError(f"{key}: no shards at {path}")
    return DatasetSource(cfg.train_path, cfg.val_path, classes)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def _exists(path: str) -> bool:
    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_class_names(path: str | None) -> list[str] | None:
    """``classes.txt``: one class name per line, in label order."""
    if path is None:
        return None
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as stream:
        names = [line.strip() for line in stream.read().decode().splitlines()]
    return [n for n in names if n] or None


def _parquet(path: str) -> pads.Dataset:
    fs, inner = _filesystem(path)
    return pads.dataset(inner, format="parquet", filesystem=fs)


def count_rows(path: str) -> int:
    """Rows in a split, from the Parquet footers alone."""
    return _parquet(path).count_rows()


def sample_captions(path: str, limit: int = 200_000) -> list[str]:
    """Up to ``limit`` captions of a split, read without the image column (for tokenizer fitting)."""
    captions: list[str] = []
    for batch in _parquet(path).to_batches(columns=["caption"]):
        captions.extend(c for c in batch.column(0).to_pylist() if c)
        if len(captions) >= limit:
            break
    return captions[:limit]


def build_split(path: str, cfg: DataConfig, tokenizer, *, train: bool, driver_local: bool, seed: int = 0):
    """A lazily executed, streaming Ray Dataset of model-ready rows (see :class:`Preprocessor`)."""
    import ray.data

    if driver_local:
        import pyarrow.parquet as pq

        files = sorted(str(p) for p in Path(path).glob("*.parquet"))
        ds = ray.data.from_arrow([pq.read_table(f) for f in files])
    else:
        ds = ray.data.read_parquet(path)
    if train:
        # Read shards in a new order each epoch; the trainer's local buffer shuffles rows.
        ds = ds.randomize_block_order()
    return ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "image_size": cfg.image_size,
            "max_text_length": cfg.max_text_length,
            "augment": train and cfg.augment,
            "seed": seed,
        },
        batch_size=cfg.preprocess_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.preprocess_workers),
        num_cpus=1,
    )
