"""Convert image–caption collections into the Parquet shard format, as a Ray Data job.

Inputs: (a) a folder of images plus a CSV or JSONL table with ``image`` (a path relative to
the folder), ``caption`` and optional ``label`` (a class id, or a class name: names become ids
and a ``classes.txt``) and ``image_id`` (default: the image path, so several captions of one
image form one group); (b) WebDataset tars. Every image is read and decoded once, on Ray Data
workers; rows whose image is missing or undecodable, whose caption is empty or whose label is
unknown are left out and reported with their reasons. Rows are split into train and val by a
hash of their ``image_id`` (all captions of an image land in the same split) and written as
shards of about ``rows_per_shard`` rows. Streaming throughout: nothing has to fit in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..class_names import CLASSES_FILE, format_class_names, has_control_character
from ..storage import built_beside, filesystem_for, is_empty_folder, write_text_atomically
from .images import UnusableImageError, open_image
from .shard_format import SHARD_SCHEMA, caption_problem, caption_text, parse_label, pylist_columns, to_shard_columns

OUTSIDE_IMAGE_FOLDER = "outside the image folder"
BAD_IMAGE_PATH = "control character in image path"
INTEGER = re.compile(r"[+-]?[0-9]+")
# CSV is read in blocks this large: a row must fit in one (a caption past MAX_CAPTION_BYTES
# is then a bad row, not a failed import). pyarrow's default of 1 MiB ended imports on long captions.
READ_BLOCK_BYTES = 64 * 2**20


@dataclass
class ImportReport:
    rows_written: dict[str, int] = field(default_factory=dict)
    bad_rows: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[tuple[str, str]] = field(default_factory=list)  # (row, reason), a few
    classes: list[str] | None = None


class BadRowLog:
    """A Ray actor that the validating workers tell about every row they leave out."""

    def __init__(self):
        self.reasons: Counter = Counter()
        self.examples: list[tuple[str, str]] = []

    def record(self, rows: list[tuple[str, str]]) -> None:
        for row, reason in rows:
            self.reasons[reason] += 1
            if len(self.examples) < 20:
                self.examples.append((row, reason))

    def summary(self):
        return dict(self.reasons), self.examples


def split_of(image_id: str, val_fraction: float) -> str:
    bucket = int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"


def check_image(data) -> str | None:
    """Why the bytes are no usable image, or None: the decoder training uses, run in full
    (``verify`` alone misses truncated files), so what is imported is what can be trained on."""
    try:
        open_image(data)
    except UnusableImageError as err:
        return err.reason
    return None


class RowValidator:
    """``map_batches`` callable: read image bytes (folder inputs), validate, tag the split."""

    def __init__(self, log, images_root: str | None, class_ids: dict[str, int] | None, val_fraction: float):
        self.log, self.class_ids, self.val_fraction = log, class_ids, val_fraction
        self.root = os.path.realpath(images_root) if images_root is not None else None

    def _read(self, relative) -> bytes | str:
        """The bytes of an image named relative to the image folder, or why there are none.
        A path that is absolute or leads out of the folder (``../``, a symlink) is never opened."""
        if not isinstance(relative, str) or not relative.strip():
            return "missing image"
        if has_control_character(relative):  # a NUL byte ends open() with a ValueError
            return BAD_IMAGE_PATH
        path = os.path.realpath(os.path.join(self.root, relative))
        if os.path.isabs(relative) or os.path.commonpath([path, self.root]) != self.root:
            return OUTSIDE_IMAGE_FOLDER
        try:
            with open(path, "rb") as stream:
                return stream.read()
        except OSError:
            return "missing image"

    def _label(self, value) -> int | None:
        if self.class_ids is not None and isinstance(value, str):
            name = value.strip()
            return self.class_ids.get(name) if name else -1
        return parse_label(value)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = pylist_columns(table)  # nulls stay None (numpy batches turn null ints into NaN)
        if "__key__" in batch:
            batch = to_shard_columns(batch)
            sources = [str(k) for k in batch["key"]]
            images = list(batch["image"])
        else:
            sources = [str(p) for p in batch["image"]]
            images = [self._read(p) for p in batch["image"]]
        n = len(sources)
        labels = [self._label(v) for v in batch.get("label", [None] * n)]
        image_ids = batch.get("image_id")
        given_splits = batch.get("split")  # a Karpathy file's, else drawn from the image id
        out = {name: [] for name in ("key", "image", "caption", "label", "image_id", "split")}
        bad = []
        for i in range(n):
            reason = images[i] if isinstance(images[i], str) else check_image(images[i])
            reason = reason or caption_problem(batch["caption"][i])
            if reason is None and labels[i] is None:
                reason = "bad label"
            if reason is None and given_splits is not None and given_splits[i] not in ("train", "val", "test"):
                reason = "bad split"
            if reason:
                bad.append((sources[i], reason))
                continue
            image_id = str(image_ids[i]) if image_ids is not None and image_ids[i] not in (None, "") else sources[i]
            caption = caption_text(batch["caption"][i])
            key = hashlib.blake2b(f"{sources[i]}\0{caption}".encode(), digest_size=12).hexdigest()
            out["key"].append(batch["key"][i] if "key" in batch else key)
            out["image"].append(bytes(images[i]))
            out["caption"].append(caption)
            out["label"].append(labels[i] if labels[i] >= 0 else None)
            out["image_id"].append(image_id)
            out["split"].append(given_splits[i] if given_splits is not None else split_of(image_id, self.val_fraction))
        if bad:
            import ray

            ray.get(self.log.record.remote(bad))
        # An explicit schema: a batch whose labels are all null must still write int64.
        return pa.table(out, schema=SHARD_SCHEMA.append(pa.field("split", pa.string())))


def _class_names(ds) -> list[str] | None:
    """Class names when the label column holds names: its distinct values, sorted, become ids
    0..K-1. Numbers, or text that is all integers, are ids: those are checked row by row (a
    ``-5``, ``3.5``, ``nan`` or ``1e30`` there is a bad row, not a class). Read from the values,
    not the schema: a JSONL table's blocks are pandas frames."""
    if "label" not in ds.columns():
        return None
    values = {v.strip() for v in ds.unique("label") if isinstance(v, str) and v.strip()}
    if not values or all(INTEGER.fullmatch(v) for v in values):
        return None
    hostile = sorted(v for v in values if has_control_character(v))
    if hostile:  # classes.txt holds one name a line: a newline inside one would shift every later id
        labels = ds.select_columns(["label"])
        # Ray Data hands out blocks as they finish unless told to keep the table's order.
        labels.context.execution_options.preserve_order = True
        row = next(i for i, r in enumerate(labels.iter_rows())
                   if r["label"] is not None and str(r["label"]).strip() == hostile[0])
        raise ValueError(f"row {row + 1} of the captions table: the class name {hostile[0][:60]!r} holds a control "
                         "character (a newline, a tab, …): class names are one line each in classes.txt")
    return sorted(values)


def check_inputs(captions: str | None, images: str | None, webdataset: str | None) -> None:
    """Raise a one-line error for inputs that cannot work, before any Ray work starts."""
    if (captions is None) == (webdataset is None):
        raise ValueError("give either --captions (with --images) or --webdataset")
    if captions is not None:
        if images is None or not os.path.isdir(images):
            raise FileNotFoundError(f"--images: no folder at {images}")
        if not os.path.isfile(captions):
            raise FileNotFoundError(f"--captions: no file at {captions}")
        with open(captions, "rb") as table:  # Ray Data's reader fails on an empty file with its whole traceback
            if not table.read(4096).strip():
                raise ValueError(f"--captions {captions} is empty: it needs a row per caption (image, caption[, label])")


def check_out(out: str, overwrite: bool, s3=None) -> None:
    """Refuse, in one line, an ``out`` that holds anything unless ``overwrite`` is given, and
    even then a folder that is not an imported dataset (no ``train/`` or ``val/`` in it)."""
    fs, path = filesystem_for(out, s3)
    if is_empty_folder(fs, path):
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} is not empty: pass --overwrite to replace it (the new import is built "
                              "beside it and swapped in when it is complete)")
    if fs.get_file_info(path).type != pafs.FileType.Directory or not any(
            fs.get_file_info(f"{path}/{split}").type == pafs.FileType.Directory for split in ("train", "val")):
        raise FileExistsError(f"--out {out} holds no imported dataset (no train/ or val/ folder): "
                              "refusing to replace it; choose another --out")


def import_dataset(*, out: str, captions: str | None = None, images: str | None = None, webdataset: str | None = None,
                   karpathy: str | None = None, rows_per_shard: int = 10_000, val_fraction: float = 0.1,
                   s3=None, overwrite: bool = False, extra_files=None) -> ImportReport:
    """Write ``out/train``, ``out/val`` (Parquet shards) and ``out/val/classes.txt`` (class names);
    from a Karpathy split file (``karpathy``, images under ``images``), its own train (with
    restval), val and test splits, and ``out/test/folds.json`` (the 1K test folds).

    Everything is written into a folder beside ``out`` and moved to ``out`` when complete: a
    failed import leaves ``out`` as it was, and ``overwrite`` replaces it whole (never a mix of
    two imports). ``extra_files(report) -> {relative path: text}``: more files for the import.
    """
    if karpathy is not None:
        return import_karpathy(out=out, karpathy=karpathy, images=images, rows_per_shard=rows_per_shard, s3=s3,
                               overwrite=overwrite)
    check_inputs(captions, images, webdataset)
    check_out(out, overwrite, s3)
    out_fs, out_path = filesystem_for(out, s3)
    with built_beside(out_fs, out_path) as staging:
        report = _import_into(out_fs, staging, captions=captions, images=images, webdataset=webdataset,
                              rows_per_shard=rows_per_shard, val_fraction=val_fraction, s3=s3)
        for relative, text in (extra_files(report) if extra_files else {}).items():
            write_text_atomically(out_fs, f"{staging}/{relative}", text)
    return report


def _import_into(out_fs, out_path: str, *, captions, images, webdataset, rows_per_shard, val_fraction, s3) -> ImportReport:
    import ray
    import ray.data

    if captions is not None:
        if captions.endswith((".jsonl", ".json")):
            ds = ray.data.read_json(captions, lines=True)  # pandas reads lines of any length
        else:
            import pyarrow.csv as pacsv

            # Only an empty cell is missing: pyarrow would also read "nan", "NULL", "N/A", … as
            # null, which would turn a corrupt label into an unlabeled row instead of a bad one.
            # Captions are read as bytes: one that is not UTF-8 is a bad row, not a failed import.
            # Quoted cells may hold newlines (multi-line captions; hostile class names, refused).
            ds = ray.data.read_csv(captions, read_options=pacsv.ReadOptions(block_size=READ_BLOCK_BYTES),
                                   parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                   convert_options=pacsv.ConvertOptions(
                                       null_values=[""], strings_can_be_null=True, column_types={"caption": pa.binary()}))
        columns = ds.columns()
        if columns is None:  # a header and no row: Ray Data knows no schema
            raise ValueError(f"--captions {captions} has no rows: it needs a row per caption (image, caption[, label])")
        missing = {"image", "caption"} - set(columns)
        if missing:
            raise ValueError(f"{captions}: missing column(s) {sorted(missing)}; expected image, caption[, label, image_id]")
    else:
        fs, path = filesystem_for(webdataset, s3)
        ds = ray.data.read_webdataset(path, filesystem=fs, decoder=None, file_extensions=["tar"])

    classes = _class_names(ds) if captions is not None else None
    log = ray.remote(BadRowLog).remote()
    validated = ds.map_batches(
        RowValidator,
        fn_constructor_kwargs={"log": log, "images_root": images, "class_ids": {c: i for i, c in enumerate(classes)} if classes else None,
                               "val_fraction": val_fraction},
        batch_size=256,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.available_resources().get("CPU", 1)))),
    )
    staging = f"{out_path}/_staging"
    validated.write_parquet(staging, filesystem=out_fs, partition_cols=["split"], min_rows_per_file=rows_per_shard,
                            max_rows_per_file=rows_per_shard)
    report = ImportReport(classes=classes)
    for split in ("train", "val", "test"):
        source = f"{staging}/split={split}"
        target = f"{out_path}/{split}"
        if out_fs.get_file_info(source).type == pafs.FileType.NotFound:
            if split != "test":  # only Karpathy files have a test split
                report.rows_written[split] = 0
            continue
        out_fs.create_dir(target, recursive=True)
        rows = 0
        for number, info in enumerate(sorted(out_fs.get_file_info(pafs.FileSelector(source)), key=lambda f: f.path)):
            destination = f"{target}/{split}-{number:05d}.parquet"
            out_fs.move(info.path, destination)
            rows += pq.ParquetFile(out_fs.open_input_file(destination)).metadata.num_rows
        report.rows_written[split] = rows
    out_fs.delete_dir(staging)
    if classes:
        out_fs.create_dir(f"{out_path}/val", recursive=True)
        write_text_atomically(out_fs, f"{out_path}/val/{CLASSES_FILE}", format_class_names(classes))
    reasons, examples = ray.get(log.summary.remote())
    report.bad_rows.update(reasons)
    report.examples = examples
    return report


def import_karpathy(*, out: str, karpathy: str, images: str | None, rows_per_shard: int, s3=None,
                    overwrite: bool = False) -> ImportReport:
    """`import_dataset` of a Karpathy split file (see `.karpathy`)."""
    import json
    import tempfile

    from .karpathy import FOLDS_FILE, read_karpathy, write_rows_jsonl

    if images is None or not os.path.isdir(images):
        raise FileNotFoundError(f"--images: no folder at {images}")
    check_out(out, overwrite, s3)
    dataset = read_karpathy(karpathy)
    folds = dataset.test_folds()

    def folds_file(report: ImportReport) -> dict[str, str]:
        if not (report.rows_written.get("test") and folds):
            return {}
        return {f"test/{FOLDS_FILE}": json.dumps({"protocol": f"{dataset.name}-1k", "folds": folds})}

    with tempfile.TemporaryDirectory() as folder:
        table = os.path.join(folder, f"{dataset.name}.jsonl")
        write_rows_jsonl(dataset.rows, table)
        return import_dataset(out=out, captions=table, images=images, rows_per_shard=rows_per_shard, s3=s3,
                              overwrite=overwrite, extra_files=folds_file)
