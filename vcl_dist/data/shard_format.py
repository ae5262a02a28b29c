"""The shard format and the batch contract: what every reader, the importer, the preprocessor
and the training loop agree on (ARCHITECTURE.md, "Data contract").

- Shards: Parquet with ``key, image, caption, label, image_id`` (`SHARD_SCHEMA`);
  WebDataset tars are turned into the same columns by `to_shard_columns`.
- Cells: a label is a class id, ``-1`` for unlabeled, or no id at all (`parse_label`);
  a caption is UTF-8 text or unusable (`caption_text`, `caption_problem`).
- Class names: `vcl_dist.class_names` (shared with the model wing).
- Model-ready batches: `TENSOR_COLUMNS`, with ``valid = 0`` on bad rows, which
  `drop_bad_rows` takes out where they are counted.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.int64()), ("image_id", pa.string()),
])
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# The columns of a model-ready batch (see data.preprocess.Preprocessor), as the loop collates them.
TENSOR_COLUMNS = ("image", "input_ids", "attention_mask", "label", "group", "valid")


# Class ids are int64 in the shard format, but ids past 2³¹ are no class index any tower can
# hold: such a value is a corrupt cell, not a class.
MAX_LABEL = 2**31 - 1


def parse_label(value, num_classes: int | None = None) -> int | None:
    """A shard's label cell -> class id; ``-1`` for unlabeled (null, empty, or -1 itself);
    ``None`` when it is no usable class id: not an integer (``"3.5"``, ``"cat"``), not finite
    (NaN, ``inf``, JSON ``Infinity``), negative, huge (``1e30``), or, with ``num_classes``
    (the lines of ``classes.txt``), not below it. Never raises."""
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return -1
        try:
            number = int(value)  # exact for long digit strings, which float() would round
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                return None
    elif isinstance(value, (bool, np.bool_)):
        return None
    elif isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        number = float(value)
    else:
        return None
    if isinstance(number, float):
        if not math.isfinite(number) or not number.is_integer():
            return None
        number = int(number)
    if number == -1:
        return -1
    if number < 0 or number > MAX_LABEL or (num_classes is not None and number >= num_classes):
        return None
    return number


# Far beyond any caption (tokenizers keep the first few dozen tokens): a larger cell is junk or hostile.
MAX_CAPTION_BYTES = 64 * 1024


def caption_problem(value) -> str | None:
    """Why a caption cell is unusable, or None: missing, over ``MAX_CAPTION_BYTES``, not UTF-8, or blank."""
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(value)
        if size > MAX_CAPTION_BYTES:
            return "caption too long"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "caption is not UTF-8 text"
    if not isinstance(value, str) or not value.strip():
        return "empty caption"
    return None


def caption_text(value) -> str | None:
    """A caption cell (str, or UTF-8 bytes from a binary column or a tar) -> stripped text;
    None when `caption_problem` finds it unusable (bytes are never decoded with
    replacement characters: a mis-encoded caption is a bad row, not a garbled one)."""
    if caption_problem(value) is not None:
        return None
    return (bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray, memoryview)) else value).strip()


def pylist_columns(table) -> dict[str, np.ndarray]:
    """A ``pyarrow.Table`` (or record batch) -> ``{column: object array}`` with nulls as None.

    Pipelines hand the preprocessor Arrow batches, not numpy ones: numpy turns a nullable
    integer column into floats with NaN for null, and a NaN label is a bad row while a null
    one is an unlabeled row.
    """
    return {name: np.fromiter(table.column(i).to_pylist(), dtype=object, count=table.num_rows)
            for i, name in enumerate(table.schema.names)}


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


def json_object(value) -> dict:
    text = _text(value)
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def to_shard_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """WebDataset columns (``__key__``, ``jpg``, ``txt``, …) -> ``key, image, caption, label, image_id, path``."""
    n = len(batch["__key__"])
    none = np.full(n, None, dtype=object)
    images = none.copy()
    for ext in IMAGE_EXTENSIONS:
        if ext in batch:
            column = batch[ext]
            for i in range(n):
                if images[i] is None and column[i] is not None:
                    images[i] = column[i]
    metas = [json_object(v) for v in batch.get("json", none)]
    labels = np.empty(n, dtype=object)
    image_ids = np.empty(n, dtype=object)
    for i in range(n):
        cls = _text(batch["cls"][i]) if "cls" in batch else None
        labels[i] = cls.strip() if cls and cls.strip() else metas[i].get("label", metas[i].get("cls"))
        image_ids[i] = metas[i].get("image_id")
    return {
        "key": np.array([str(k) for k in batch["__key__"]], dtype=object),
        "image": images,
        # Raw bytes: the preprocessor decodes them strictly (a caption that is not UTF-8 is a bad row).
        "caption": np.array(list(batch.get("txt", none)), dtype=object),
        "label": labels,
        "image_id": image_ids,
        "path": batch.get("path", none),
    }


def drop_bad_rows(batch: dict) -> tuple[dict, int, list[str]]:
    """A collated batch (tensors, plus ``bad_shards``) -> ``(clean batch, rows before, shards of
    the dropped rows)``."""
    bad_shards = batch.pop("bad_shards")
    valid = batch.pop("valid")
    rows = len(valid)
    if bad_shards:
        keep = valid.bool()
        batch = {name: t[keep.to(t.device)] for name, t in batch.items()}
    return batch, rows, bad_shards
