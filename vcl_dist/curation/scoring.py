"""Score every pair of a set of shards with a model: a Ray Data job, one score file per shard.

Read tasks (one CPU each, anywhere in the cluster) stream a shard's rows in batches, decode and
tokenise them as evaluation does and hash each image; a pool of model actors (a GPU each when
the cluster has GPUs, else a CPU each) embeds both sides and scores each pair. The driver
collects a shard's scores and writes its file when the last row is in, so a killed job loses
only the shards it was in the middle of.

A score file (``<index>.parquet``, `SCORE_SCHEMA`) has one row per input row: ``score``
is the model's own similarity of the pair (cosine for models ranked by cosine, pretrained CLIP
among them; minus the squared distance for VCRL models), NaN for a bad row; ``image_sha256`` the
SHA-256 of the image's bytes (null for a bad row); ``problem`` why a row is bad (null if good).
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from ..data.preprocess import Preprocessor
from ..data.shard_format import caption_problem, parse_label
from ..retrieval.embed import ModelActor
from ..storage import write_bytes_atomically
from .shards import InputShard, shard_batches

SCORE_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("row", pa.int64()), ("key", pa.string()), ("score", pa.float32()),
    ("image_sha256", pa.binary(32)), ("problem", pa.string()),
])
BAD_LABEL = "label is no class id"
BAD_IMAGE = "unusable image"


def score_file(folder: str, index: int) -> str:
    return f"{folder}/{index:06d}.parquet"


def read_shards(batch: dict, *, filesystem: pafs.FileSystem, shards: list[InputShard], kind: str, tokenizer, geometry,
                max_text_length: int, batch_rows: int):
    """A ``map_batches`` function: a batch of shard indices -> their rows, model-ready, ``batch_rows`` at a time."""
    prepare = Preprocessor(tokenizer, geometry, max_text_length, augment=False)
    for index in batch["shard"]:
        shard = shards[int(index)]
        for columns in shard_batches(filesystem, shard, kind, batch_rows):
            yield prepared_rows(prepare, shard, columns)


def prepared_rows(prepare: Preprocessor, shard: InputShard, columns: dict) -> dict:
    """One batch of a shard's raw rows -> model inputs, with each row's place, image hash and problem."""
    rows = prepare(columns)
    n = len(rows["key"])
    good = rows["valid"] == 1
    labels = columns.get("label", np.full(n, None, dtype=object))
    # Empty, not None: an all-None column would reach the actor as floats. The actor makes them null.
    problems = np.full(n, "", dtype=object)
    hashes = np.full(n, b"", dtype=object)
    for i in range(n):
        if good[i]:
            hashes[i] = hashlib.sha256(bytes(columns["image"][i])).digest()
        else:
            problems[i] = caption_problem(columns["caption"][i]) or (BAD_LABEL if parse_label(labels[i]) is None else BAD_IMAGE)
    return {
        "shard": np.full(n, shard.index, dtype=np.int32), "row": np.asarray(columns["row"], dtype=np.int64),
        "key": rows["key"], "image": rows["image"], "input_ids": rows["input_ids"],
        "attention_mask": rows["attention_mask"], "valid": rows["valid"], "image_sha256": hashes, "problem": problems,
    }


def pair_scores(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """The model's similarity of each image with its own caption: ``[N]`` float32."""
    image = model.encode_pixels(images).double()
    text = model.encode_tokens(input_ids, attention_mask).double()
    if model.normalized:
        image = torch.nn.functional.normalize(image, dim=1)
        text = torch.nn.functional.normalize(text, dim=1)
        return (image * text).sum(dim=1).float().numpy()
    return (-((image - text) ** 2).sum(dim=1)).float().numpy()


class ScorePairs(ModelActor):
    """A ``map_batches`` actor: loads the model once, then scores batch after batch."""

    def __call__(self, rows: dict) -> pa.Table:
        good = np.asarray(rows["valid"]) == 1
        scores = np.full(len(good), np.nan, dtype=np.float32)
        if good.any():
            scores[good] = pair_scores(self.model, torch.from_numpy(np.ascontiguousarray(rows["image"][good])),
                                       torch.from_numpy(np.asarray(rows["input_ids"])[good]),
                                       torch.from_numpy(np.asarray(rows["attention_mask"])[good]))
            broken = good & ~np.isfinite(scores)
            if broken.any():
                key = rows["key"][np.flatnonzero(broken)[0]]
                raise ValueError(f"the model scored row {key!r} (shard {rows['shard'][0]}) {scores[broken][0]}: "
                                 "its weights give non-finite embeddings")
        return pa.table({
            "shard": pa.array(rows["shard"], pa.int32()), "row": pa.array(rows["row"], pa.int64()),
            "key": pa.array([str(k) for k in rows["key"]], pa.string()), "score": pa.array(scores, pa.float32()),
            "image_sha256": pa.array([bytes(h) or None for h in rows["image_sha256"]], pa.binary(32)),
            "problem": pa.array([str(p) or None for p in rows["problem"]], pa.string()),
        }, schema=SCORE_SCHEMA)


def scoring_dataset(filesystem: pafs.FileSystem, shards: list[InputShard], todo: list[int], kind: str, model,
                    model_ref, *, use_gpu: bool, actors: int, batch_size: int):
    """The lazy Ray Dataset of score rows of the shards at ``todo`` (indices into ``shards``)."""
    import ray.data

    from ..ray_cluster import use_ray_data_settings

    use_ray_data_settings()
    reads = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=max(1, len(todo)))
    prepared = reads.map_batches(
        read_shards, fn_kwargs=dict(
            filesystem=filesystem, shards=shards, kind=kind, tokenizer=model.tokenizer, geometry=model.image_geometry,
            max_text_length=model.config.data.max_text_length, batch_rows=batch_size),
        batch_size=1, num_cpus=1)
    # batch_size=None: the model takes the read's batches as they come. A batch size here would
    # make Ray Data bundle that many shards into one task of the fused read + model operator
    # (on CPUs), and one actor would read them all while the others idle.
    return prepared.map_batches(
        ScorePairs, fn_constructor_kwargs={"model_ref": [model_ref], "use_gpu": use_gpu}, batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=1 if use_gpu else 0)


def write_score_file(filesystem: pafs.FileSystem, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table.sort_by("row"), buffer)
    write_bytes_atomically(filesystem, path, buffer.getvalue())


def collect_scores(dataset, shards: list[InputShard], todo: list[int], write: Callable[[int, pa.Table], None],
                   progress: Callable[[int, int, float], None]) -> None:
    """Stream the score rows to this process; ``write(index, table)`` each shard once all its rows
    are in; ``progress(shards_done, rows_done, seconds)`` after each.

    Raises:
        ValueError: a shard gave other rows than it was counted to have (changed while filtering?).
    """
    pending: dict[int, list[pa.Table]] = {}
    counts = dict.fromkeys(todo, 0)
    started, done, rows_done = time.perf_counter(), 0, 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for index in np.unique(batch.column("shard").to_numpy()):
            part = batch.filter(pc.equal(batch.column("shard"), pa.scalar(int(index), pa.int32())))
            pending.setdefault(int(index), []).append(part)
            counts[int(index)] += part.num_rows
            if counts[int(index)] > shards[index].rows:
                raise ValueError(f"{shards[index].path}: more rows than the {shards[index].rows} it was counted to have")
            if counts[int(index)] == shards[index].rows:
                write(int(index), pa.concat_tables(pending.pop(int(index))))
                done, rows_done = done + 1, rows_done + shards[index].rows
                progress(done, rows_done, time.perf_counter() - started)
    short = [index for index in todo if counts[index] != shards[index].rows and shards[index].rows]
    if short:
        shard = shards[short[0]]
        raise ValueError(f"{shard.path}: read {counts[short[0]]} rows, counted {shard.rows} (changed while filtering?)")
    for index in todo:  # shards of no rows: an empty score file marks them done
        if shards[index].rows == 0:
            write(index, SCORE_SCHEMA.empty_table())
