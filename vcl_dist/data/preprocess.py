"""Row preprocessing for Ray Data ``map_batches``: decode, resize, augment, tokenise.

Runs on CPU workers anywhere in the cluster, never in the training process. Images leave as
``uint8 [B, 3, H, W]`` (four times smaller than float in the object store); the training step
converts and normalises them on its device.

Bad rows (missing or undecodable image bytes, a missing or empty caption, a label that is no
integer) are kept with ``valid = 0`` and a blank image rather than dropped here: the training
loop then counts them per shard, reports the count and stops the run with the shard's name
when too many are bad, which a silently shrinking dataset would never do.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from .webdataset import to_shard_columns


def stable_id(text: str) -> int:
    """A 63-bit id of a string, equal on every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def decode_image(data: bytes, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Encoded bytes -> ``uint8 [3, size, size]``; with ``rng``, a light random crop-and-resize.

    Raises:
        OSError, ValueError: the bytes are no image PIL can decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if rng is not None:
            # Keep at least 85% of each side: captions name positions, so no flips and no
            # crops that could move an object into another third of the frame.
            w, h = image.size
            scale = rng.uniform(0.85, 1.0)
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((x0, y0, x0 + cw, y0 + ch))
        image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array.transpose(2, 0, 1)


def parse_label(value) -> int | None:
    """A shard's label cell -> class id, ``-1`` for unlabeled, ``None`` when it is no integer."""
    if value is None or (isinstance(value, float) and value != value):
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return -1
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number == int(number) and number >= -1 else None


def caption_text(value) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    return value.strip() if isinstance(value, str) and value.strip() else None


class Preprocessor:
    """A callable class for ``Dataset.map_batches``: raw shard rows -> model-ready arrays.

    Output columns: ``image`` uint8 [B, 3, S, S], ``input_ids`` / ``attention_mask`` int64
    [B, L], ``label`` int64 [B] (-1 when unlabeled), ``group`` int64 [B] (rows sharing it show
    the same image), ``valid`` uint8 [B] (0: a bad row, to be skipped and counted), ``key``
    and ``shard`` str [B].
    """

    def __init__(self, tokenizer, image_size: int, max_text_length: int, augment: bool, seed: int | None = 0,
                 default_shard: str = "unknown"):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_length = max_text_length
        self.rng = np.random.default_rng(seed) if augment else None
        self.default_shard = default_shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "__key__" in batch:
            batch = to_shard_columns(batch)
        keys = [str(k) for k in batch["key"]]
        n = len(keys)
        valid = np.ones(n, dtype=np.uint8)
        images = np.zeros((n, 3, self.image_size, self.image_size), dtype=np.uint8)
        for i, data in enumerate(batch["image"]):
            try:
                images[i] = decode_image(bytes(data), self.image_size, self.rng)
            except (OSError, ValueError, TypeError, Image.DecompressionBombError):
                valid[i] = 0  # missing (None), truncated or not an image at all
        captions = [caption_text(c) for c in batch["caption"]]
        labels = np.full(n, -1, dtype=np.int64)
        for i, value in enumerate(batch.get("label", [None] * n)):
            parsed = parse_label(value)
            if parsed is None:
                valid[i] = 0
            else:
                labels[i] = parsed
        for i, caption in enumerate(captions):
            if caption is None:
                valid[i] = 0
        tokens = self.tokenizer(
            [c or "" for c in captions], padding="max_length", truncation=True,
            max_length=self.max_text_length, return_tensors="np",
        )
        image_ids = batch.get("image_id")
        groups = [str(i) if i is not None else k for i, k in zip(image_ids, keys)] if image_ids is not None else keys
        paths = batch.get("path")
        return {
            "key": np.array(keys, dtype=object),
            "image": images,
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "label": labels,
            "group": np.array([stable_id(g) for g in groups], dtype=np.int64),
            "valid": valid,
            "shard": np.array([str(p) for p in paths] if paths is not None else [self.default_shard] * n, dtype=object),
        }
