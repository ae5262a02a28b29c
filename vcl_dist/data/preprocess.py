"""Row preprocessing for Ray Data ``map_batches``: decode, resize, augment, tokenise.

Runs on CPU workers anywhere in the cluster, never in the training process. Images leave as
``uint8 [B, 3, H, W]`` (four times smaller than float in the object store); the training step
converts and normalises them on its device.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image


def stable_id(text: str) -> int:
    """A 63-bit id of a string, equal on every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def decode_image(data: bytes, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Encoded bytes -> ``uint8 [3, size, size]``; with ``rng``, a light random crop-and-resize."""
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


class Preprocessor:
    """A callable class for ``Dataset.map_batches``: raw shard rows -> model-ready arrays.

    Output columns: ``image`` uint8 [B, 3, S, S], ``input_ids`` / ``attention_mask`` int64
    [B, L], ``label`` int64 [B] (-1 when unlabeled), ``group`` int64 [B] (rows sharing it show
    the same image), ``key`` str [B].
    """

    def __init__(self, tokenizer, image_size: int, max_text_length: int, augment: bool, seed: int = 0):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_length = max_text_length
        self.augment = augment
        self.rng = np.random.default_rng(seed) if augment else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        images = np.stack([decode_image(bytes(b), self.image_size, self.rng) for b in batch["image"]])
        tokens = self.tokenizer(
            [str(c) for c in batch["caption"]], padding="max_length", truncation=True,
            max_length=self.max_text_length, return_tensors="np",
        )
        labels = batch.get("label")
        if labels is None:
            labels = np.full(len(keys), -1, dtype=np.int64)
        else:
            labels = np.array([-1 if (v is None or v != v) else int(v) for v in labels], dtype=np.int64)
        image_ids = batch.get("image_id")
        group_source = keys if image_ids is None else [str(i) if i is not None else k for i, k in zip(image_ids, keys)]
        return {
            "key": np.array(keys, dtype=object),
            "image": images,
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "label": labels,
            "group": np.array([stable_id(g) for g in group_source], dtype=np.int64),
        }
