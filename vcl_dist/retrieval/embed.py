"""Batch inference with Ray Data: shards in, Parquet of embeddings out.

Decoding runs in CPU tasks anywhere in the cluster; the model runs in a pool of actors (one
GPU each when the cluster has GPUs, else one CPU each), which load the model once and then
take batch after batch: the usual Ray batch-inference shape. The model travels to the actors
through the object store, so actors on other nodes need no access to the driver's disk.

Output columns (one row per good input row; bad rows are skipped and counted):

| column | type | meaning |
|---|---|---|
| ``key`` | string | the pair's key |
| ``caption`` | string | its caption |
| ``label`` | int64 | class id, -1 when unlabeled |
| ``image_group`` | int64 | equal for rows that show the same image |
| ``image_embedding`` | fixed_size_list<float32>[D] | the image tower's embedding, not normalised |
| ``text_embedding`` | fixed_size_list<float32>[D] | the text tower's embedding, not normalised |
| ``thumbnail`` | binary | a small JPEG of the image (empty when thumbnails are off) |

Plain Arrow types only, so pandas, DuckDB or an ANN index builder read the files as they are.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import torch

from ..data.datasets import SHAPES_SHARD, DatasetSource, read_split
from ..data.images import UnusableImageError, open_image
from ..data.preprocess import Preprocessor
from ..data.shard_format import caption_text, pylist_columns, to_shard_columns
from ..storage import write_text_atomically

# The leading underscore keeps readers of the folder (pyarrow, pandas, Spark) from taking it for data.
CORPUS_INFO_FILE = "_corpus.json"


def thumbnail_jpeg(data, size: int) -> bytes:
    """A JPEG at most ``size`` pixels on its longer side; empty bytes for undecodable input."""
    try:
        image = open_image(data, min_side=size)
    except UnusableImageError:
        return b""
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def prepare_rows(table: pa.Table, *, tokenizer, image_size, max_text_length: int, thumbnail_size: int, default_shard: str,
                 num_classes: int | None = None):
    """One CPU task: raw shard rows (an Arrow batch) -> model-ready rows (`Preprocessor`; ``image_size``:
    a side or an ``ImageGeometry``)
    plus the caption text and a thumbnail, which the Parquet output keeps."""
    batch = pylist_columns(table)
    if "__key__" in batch:
        batch = to_shard_columns(batch)
    rows = Preprocessor(tokenizer, image_size, max_text_length, augment=False, default_shard=default_shard,
                        num_classes=num_classes)(batch)
    rows["caption"] = np.array([caption_text(c) or "" for c in batch["caption"]], dtype=object)
    rows["thumbnail"] = np.array(
        [thumbnail_jpeg(data, thumbnail_size) if ok and thumbnail_size else b"" for data, ok in zip(batch["image"], rows["valid"])],
        dtype=object,
    )
    return rows


def embedding_table(rows: dict, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> pa.Table:
    """A corpus's Parquet rows: the batch's columns with its ``[B, D]`` image and text embeddings as fixed-size
    lists.
    """
    dim = image_embeddings.shape[1]

    def vectors(values: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float32).reshape(-1)), dim)

    return pa.table({
        "key": pa.array([str(k) for k in rows["key"]], pa.string()),
        "caption": pa.array([str(c) for c in rows["caption"]], pa.string()),
        "label": pa.array(rows["label"], pa.int64()),
        "image_group": pa.array(rows["group"], pa.int64()),
        "image_embedding": vectors(image_embeddings),
        "text_embedding": vectors(text_embeddings),
        "thumbnail": pa.array([bytes(t) for t in rows["thumbnail"]], pa.binary()),
    })


class ModelActor:
    """A ``map_batches`` actor's start: loads the model once (on its GPU, else on its one CPU)."""

    def __init__(self, model_ref: list, use_gpu: bool):
        import ray

        from .model import load_model_files

        if not use_gpu:
            torch.set_num_threads(1)  # one reserved CPU per actor
        # The reference comes wrapped in a list so that Ray hands it over unresolved: the
        # actor fetches the bytes itself, from whichever node holds them.
        self.model = load_model_files(ray.get(model_ref[0]), "cuda" if use_gpu else "cpu")


class EmbedRows(ModelActor):
    """A ``map_batches`` actor: loads the model once, then embeds batch after batch."""

    def __call__(self, rows: dict) -> pa.Table:
        keep = np.asarray(rows["valid"]) == 1
        rows = {name: np.asarray(values)[keep] for name, values in rows.items()}
        if not keep.any():
            dim = self.model.embed_dim
            return embedding_table(rows, np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32))
        images = self.model.encode_pixels(torch.from_numpy(np.ascontiguousarray(rows["image"])))
        texts = self.model.encode_tokens(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["attention_mask"]))
        return embedding_table(rows, images.numpy(), texts.numpy())


def embedding_dataset(source: DatasetSource, path: str, model, model_ref, *, use_gpu: bool, actors: int,
                      batch_size: int, thumbnail_size: int, num_classes: int | None = None):
    """A lazy Ray Dataset of embedding rows (see the module docstring) for the split at ``path``.

    ``model``: the `vcl_dist.retrieval.model.RetrievalModel` (for its tokenizer and
    input sizes); ``model_ref``: ``ray.put(model_files(...))``; ``num_classes``: rows whose
    label is outside ``range(num_classes)`` are bad rows.
    """
    import ray.data

    rows = read_split(source, path).map_batches(
        prepare_rows,
        fn_kwargs={
            "tokenizer": model.tokenizer,
            "image_size": model.image_geometry,
            "max_text_length": model.config.data.max_text_length,
            "thumbnail_size": thumbnail_size,
            "default_shard": SHAPES_SHARD if source.driver_local else "unknown",
            "num_classes": num_classes,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=1,
    )
    return rows.map_batches(
        EmbedRows,
        fn_constructor_kwargs={"model_ref": [model_ref], "use_gpu": use_gpu},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )


def write_corpus_info(filesystem, path: str, info: dict) -> None:
    """``_corpus.json`` beside the Parquet files: rows, bad rows, embedding size, how to rank."""
    write_text_atomically(filesystem, f"{path}/{CORPUS_INFO_FILE}", json.dumps(info, indent=2))
