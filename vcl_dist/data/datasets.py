"""Where the shards are and how they become streaming Ray Datasets for training and evaluation.

Shards are Parquet files in the format of ARCHITECTURE.md, or WebDataset tars as img2dataset
writes them, in a local folder, a glob or an ``s3://`` prefix. Reading, decoding and
tokenising run as Ray Data tasks on any CPU of the cluster, streamed: no split has to fit in
memory. The training split is planned here and read by each worker in its own seeded order
(`build_train_split`, `.epoch_plan`); the validation split is one dataset in file order
(`build_split`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ..class_names import CLASSES_FILE, parse_class_names
from ..config import DataConfig, S3Config, source_name
from ..ray_cluster import use_ray_data_settings
from ..storage import GLOB_CHARACTERS, exists, filesystem_for, list_files, read_text
from .images import ImageGeometry
from .mixture import SourceMix
from .preprocess import Preprocessor
from .shapes import ensure_shapes_dataset
from .train_stream import TrainSplit, TrainUnit, plan_units, put_driver_tables
from .webdataset import webdataset_captions, webdataset_row_count

SHAPES_SHARD = "shapes"
BLOCK_ROWS = 512
# Read units of encoded images: ~700 JPEGs at 224 px, decoded by one task.
READ_UNIT_BYTES = 8 * 2**20
@dataclass(frozen=True)
class DatasetSource:
    """Resolved locations of one dataset's splits, inside ``filesystem``."""

    format: str  # "parquet" | "webdataset"
    train: str
    val: str
    classes_path: str | None
    filesystem: pafs.FileSystem
    # The shapes cache lives on the driver's disk, which other nodes of a cluster cannot
    # read: such a dataset is loaded by the driver and handed to Ray's object store.
    driver_local: bool = False


def resolve_source(cfg: DataConfig, s3: S3Config | None = None) -> DatasetSource:
    """Generate the built-in dataset when asked for, else check that the shard paths exist.

    Raises:
        FileNotFoundError: a split or the bucket cannot be found or reached (one line).
    """
    if cfg.source == "shapes":
        s = cfg.shapes
        root = ensure_shapes_dataset(cfg.cache_dir, s.num_train, s.num_val, s.image_size, s.val_captions_per_image, s.seed)
        return DatasetSource("parquet", str(root / "train"), str(root / "val"), str(root / CLASSES_FILE),
                             pafs.LocalFileSystem(), driver_local=True)
    filesystem, val = filesystem_for(cfg.val_path, s3)
    train = filesystem_for(cfg.train_path, s3)[1] if cfg.train_path else ""  # data.sources: resolve_train_sources
    for key, path in (("data.train_path", train), ("data.val_path", val)) if train else (("data.val_path", val),):
        if any(c in path for c in GLOB_CHARACTERS):
            try:
                list_files(filesystem, path, "tar" if cfg.source == "webdataset" else "parquet")
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{key}: {err}") from None
        elif not exists(filesystem, path):
            raise FileNotFoundError(f"{key}: nothing at {getattr(cfg, key.split('.')[1])}")
    if cfg.classes_path:
        classes = filesystem_for(cfg.classes_path, s3)[1]
        if not exists(filesystem, classes):
            raise FileNotFoundError(f"data.classes_path: nothing at {cfg.classes_path}")
    else:
        guess = f"{val.rstrip('/')}/{CLASSES_FILE}"
        classes = guess if exists(filesystem, guess) else None
    return DatasetSource(cfg.source, train, val, classes, filesystem)


def resolve_train_sources(cfg: DataConfig, s3: S3Config | None = None) -> list[DatasetSource]:
    """Each of ``data.sources`` as a dataset of its own (its ``train`` the source's shards), in order.

    Raises:
        FileNotFoundError: a source's shards cannot be found or reached (one line).
    """
    resolved = []
    for spec in cfg.sources:
        name = spec.name or source_name(spec.path)
        filesystem, path = filesystem_for(spec.path, s3)
        kind = spec.format or cfg.source
        try:
            found = bool(list_files(filesystem, path, "tar" if kind == "webdataset" else "parquet"))
        except FileNotFoundError:
            found = False
        if not found:
            raise FileNotFoundError(f"data.sources[{name}]: no {kind} shards at {spec.path}")
        resolved.append(DatasetSource(kind, path, "", None, filesystem))
    return resolved


def train_mixture(cfg: DataConfig) -> tuple[SourceMix, ...]:
    """``data.sources`` as the mixture the training split draws (none without sources)."""
    return tuple(SourceMix(spec.name or source_name(spec.path), spec.weight, spec.replacement) for spec in cfg.sources)


def read_class_names(source: DatasetSource) -> list[str] | None:
    """``classes.txt``: one class name per line, in label order."""
    if source.classes_path is None:
        return None
    return parse_class_names(read_text(source.filesystem, source.classes_path))


def _parquet(source: DatasetSource, path: str) -> pads.Dataset:
    """The split's ``*.parquet`` files (a ``classes.txt`` or other files beside them are no shards)."""
    return pads.dataset(list_files(source.filesystem, path, "parquet"), format="parquet", filesystem=source.filesystem)


def count_rows(source: DatasetSource, path: str) -> int:
    """Rows in a split: from the Parquet footers, or by listing the tars' members."""
    if source.format == "webdataset":
        return webdataset_row_count(source.filesystem, path)
    return _parquet(source, path).count_rows()


def sample_captions(source: DatasetSource, path: str, limit: int = 200_000) -> list[str]:
    """Up to ``limit`` captions of a split, read without the images (for tokenizer fitting)."""
    if source.format == "webdataset":
        return webdataset_captions(source.filesystem, path, limit)
    captions: list[str] = []
    for batch in _parquet(source, path).to_batches(columns=["caption"]):
        captions.extend(c for c in batch.column(0).to_pylist() if isinstance(c, str) and c.strip())
        if len(captions) >= limit:
            break
    return captions[:limit]


def read_split(source: DatasetSource, path: str):
    """The raw rows of a split as a lazy Ray Dataset, in file order."""
    import ray.data

    use_ray_data_settings()
    if source.driver_local:
        import pyarrow.parquet as pq

        tables = [pq.read_table(file) for file in sorted(Path(path).glob("*.parquet"))]
        # Small blocks: the blocks are the units of parallel preprocessing. from_blocks takes
        # their metadata here, where from_arrow waits for a Ray task to read it (≈ 2 s of a
        # run's start-up on a busy 2-CPU node).
        return ray.data.from_blocks([table.slice(start, BLOCK_ROWS) for table in tables
                                     for start in range(0, table.num_rows, BLOCK_ROWS)])
    files = list_files(source.filesystem, path, "tar" if source.format == "webdataset" else "parquet")
    if source.format == "webdataset":
        return ray.data.read_webdataset(files, filesystem=source.filesystem, decoder=None, include_paths=True,
                                        file_extensions=["tar"])
    return ray.data.read_parquet(files, filesystem=source.filesystem, include_paths=True)


def build_split(source: DatasetSource, path: str, cfg: DataConfig, tokenizer, *, num_classes: int | None = None):
    """A lazily executed, streaming Ray Dataset of model-ready rows (see `Preprocessor`),
    unaugmented, in file order: for evaluation. ``num_classes``: the size of the label space,
    outside which a label is a bad row."""
    # Stateless tasks rather than an actor pool: every epoch re-executes the pipeline, and a
    # new pool would start fresh actor processes each time (seconds of start-up per epoch),
    # where tasks reuse Ray's pooled worker processes.
    import ray.data

    if source.format == "parquet" and not source.driver_local:
        # Reading and preprocessing in one task per read unit (see parquet_source).
        from .parquet_source import PreprocessedParquet, plan_read_units

        use_ray_data_settings()
        units = plan_read_units(source.filesystem, _parquet(source, path).files, READ_UNIT_BYTES)
        make_preprocessor = functools.partial(Preprocessor, tokenizer, ImageGeometry.of(cfg), cfg.max_text_length,
                                              augment=False, num_classes=num_classes)
        return ray.data.read_datasource(
            PreprocessedParquet(source.filesystem, units, cfg.preprocess_batch_size, make_preprocessor),
            override_num_blocks=len(units), num_cpus=1,
            **({"concurrency": cfg.preprocess_workers} if cfg.preprocess_workers else {}),
        )
    return read_split(source, path).map_batches(
        preprocess_batch,
        fn_kwargs={
            "tokenizer": tokenizer,
            "image_size": ImageGeometry.of(cfg),
            "max_text_length": cfg.max_text_length,
            "augment": False,
            "default_shard": SHAPES_SHARD if source.driver_local else "unknown",
            "num_classes": num_classes,
        },
        batch_size=cfg.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.preprocess_workers),
        num_cpus=1,
    )


def plan_train_units(source: DatasetSource, path: str, sources: list[DatasetSource] = ()) -> list[TrainUnit]:
    """The read units of a training split (see `.train_stream.plan_units`); with
    ``sources`` (``data.sources``), those of every source, each unit marked with its source."""
    if not sources:
        return plan_units(source, path, READ_UNIT_BYTES, BLOCK_ROWS)
    return [replace(unit, source=index) for index, each in enumerate(sources)
            for unit in plan_units(each, each.train, READ_UNIT_BYTES, BLOCK_ROWS)]


def build_train_split(source: DatasetSource, units: str | list[TrainUnit], cfg: DataConfig, tokenizer, *, seed: int,
                      num_classes: int | None = None, sources: list[DatasetSource] = ()) -> TrainSplit:
    """The training split for the workers to read in their seeded order: ``units`` from
    `plan_train_units`, or the split's path to plan them from. Blocks of the built-in data
    are put in Ray's object store here: call with Ray connected."""
    if isinstance(units, str):
        units = plan_train_units(source, units)
    if source.driver_local:
        units = put_driver_tables(units)
    mixture = train_mixture(cfg)
    return TrainSplit(source.filesystem, units, tokenizer, ImageGeometry.of(cfg), cfg.max_text_length, cfg.augment, seed,
                      cfg.shuffle_buffer, cfg.preprocess_batch_size, num_classes, cfg.preprocess_workers,
                      decode=cfg.decode, filesystems=tuple(each.filesystem for each in sources), mixture=mixture,
                      epoch_rows=(cfg.epoch_rows or sum(u.rows for u in units)) if mixture else None)


def preprocess_batch(batch, *, tokenizer, image_size: int | ImageGeometry, max_text_length: int, augment: bool, default_shard: str,
                     num_classes: int | None = None):
    """One ``map_batches`` task: a `Preprocessor` on one batch."""
    return Preprocessor(tokenizer, image_size, max_text_length, augment, default_shard=default_shard,
                        num_classes=num_classes)(batch)
