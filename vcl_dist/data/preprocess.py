"""Row preprocessing for Ray Data ``map_batches``: decode, resize, augment, tokenise.

Runs on CPU workers anywhere in the cluster, never in the training process. Images leave as
``uint8 [B, 3, H, W]`` (four times smaller than float in the object store); the training step
converts and normalises them on its device.

Bad rows (missing or undecodable image bytes, a missing, blank or non-UTF-8 caption, a label
that is no class id) are kept with ``valid = 0`` and a blank image rather than dropped here: the training
loop then counts them per shard, reports the count and stops the run with the shard's name
when too many are bad, which a silently shrinking dataset would never do.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .images import ImageGeometry, UnusableImageError, decode_image
from .shard_format import caption_text, parse_label, pylist_columns, to_shard_columns
from .train_decode import decode_for_training, jpeg_header, training_crop


def stable_id(text: str) -> int:
    """A 63-bit id of a string, equal on every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class Preprocessor:
    """A callable class for ``Dataset.map_batches``: raw shard rows (an Arrow batch, or columns
    with None for null) -> model-ready arrays. ``num_classes``: the size of the label space
    (``classes.txt``, the label tower); a label outside it is a bad row.

    Output columns: ``image`` uint8 [B, 3, S, S], ``input_ids`` / ``attention_mask`` int64
    [B, L], ``label`` int64 [B] (-1 when unlabeled), ``group`` int64 [B] (rows sharing it show
    the same image), ``valid`` uint8 [B] (0: a bad row, to be skipped and counted), ``key``
    and ``shard`` str [B]. With ``device_decode``, also ``jpeg`` (the encoded bytes of the rows
    left to the device, else empty), ``crop`` int32 [B, 6] (left, top, width, height of the crop
    in the upright picture, then the size it is resized to) and ``orientation`` uint8 [B] (the
    EXIF orientation; 0: decoded here).
    """

    def __init__(self, tokenizer, image_size: int | ImageGeometry, max_text_length: int, augment: bool,
                 seed: int | Sequence[int] = 0, default_shard: str = "unknown", num_classes: int | None = None,
                 decode_images: bool = True, fast_decode: bool = False, device_decode: bool = False):
        self.tokenizer = tokenizer
        # True: JPEGs the fast way (`.train_decode`: training); False: Pillow's, exactly as
        # evaluation, embedding and serving see a picture.
        self.decode = decode_for_training if fast_decode else decode_image
        # True: JPEGs are left encoded, with their crop drawn here, for the training device to
        # decode (``data.decode=gpu``: vcl_dist.train.device_decode); other pictures decode here.
        self.device_decode = device_decode
        # False: the pictures' features come from elsewhere (a locked tower's, computed once);
        # the batch gets no ``image`` column here and its rows are judged by caption and label.
        self.decode_images = decode_images
        self.num_classes = num_classes
        # ``image_size``: the geometry of the tower's input (a side alone: the whole picture squashed to it).
        self.geometry = image_size if isinstance(image_size, ImageGeometry) else ImageGeometry(image_size)
        self.max_text_length = max_text_length
        self.augment = augment
        # Augmentation draws from a stream of its own per row, seeded by (seed, row key): the same
        # row is augmented alike by whichever task, worker or restart reads it (training passes
        # (train.seed, epoch), so each epoch differs).
        self.seed = [int(s) for s in np.atleast_1d(seed)]
        self.default_shard = default_shard

    def __call__(self, batch) -> dict[str, np.ndarray]:
        if not isinstance(batch, dict):  # an Arrow batch
            batch = pylist_columns(batch)
        if "__key__" in batch:
            batch = to_shard_columns(batch)
        keys = [str(k) for k in batch["key"]]
        n = len(keys)
        valid = np.ones(n, dtype=np.uint8)
        side = self.geometry.size
        images = np.zeros((n, 3, side, side) if self.decode_images else (n, 0), dtype=np.uint8)
        encoded = np.full(n, b"", dtype=object)
        crops, orientations = np.zeros((n, 6), dtype=np.int32), np.zeros(n, dtype=np.uint8)
        for i, data in enumerate(batch["image"] if self.decode_images else ()):
            try:
                rng = np.random.default_rng([*self.seed, stable_id(keys[i])]) if self.augment else None
                header = jpeg_header(data) if self.device_decode else None
                if header is not None:
                    box, size = training_crop(*header, self.geometry, rng)
                    encoded[i], crops[i], orientations[i] = bytes(data), (*box, *size), header[2]
                else:
                    images[i] = self.decode(data, self.geometry, rng)
            except UnusableImageError:
                valid[i] = 0  # missing, truncated, too large, or not an image of an accepted format
        captions = [caption_text(c) for c in batch["caption"]]
        labels = np.full(n, -1, dtype=np.int64)
        for i, value in enumerate(batch.get("label", [None] * n)):
            parsed = parse_label(value, self.num_classes)
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
        device_columns = {"jpeg": encoded, "crop": crops, "orientation": orientations} if self.device_decode else {}
        return {
            **device_columns,
            "key": np.array(keys, dtype=object),
            "image": images,
            "input_ids": tokens["input_ids"].astype(np.int64),
            "attention_mask": tokens["attention_mask"].astype(np.int64),
            "label": labels,
            "group": np.array([stable_id(g) for g in groups], dtype=np.int64),
            "valid": valid,
            "shard": np.array([str(p) for p in paths] if paths is not None else [self.default_shard] * n, dtype=object),
        }
