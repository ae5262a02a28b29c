"""Embedded corpora for the retrieval tests: clustered vectors (what a real corpus's embeddings
look like) written in the corpus format of ``jobs/embed.py``."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vcl_dist.evaluate import similarity
from vcl_dist.retrieval.embed import embedding_table


def clustered(rng: np.random.Generator, rows: int, dim: int, clusters: int, spread: float = 0.35) -> np.ndarray:
    """Vectors around ``clusters`` random centres: what embeddings of a real corpus look like
    (uniform random vectors are the worst case no index is built for)."""
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim))).astype(np.float32)


def write_corpus(folder: Path, images: np.ndarray, texts: np.ndarray, *, normalized: bool, groups=None, files: int = 3,
                 model: str = "runs/m/model") -> Path:
    folder.mkdir(parents=True)
    rows = len(images)
    groups = np.arange(rows) if groups is None else groups
    for part, index in enumerate(np.array_split(np.arange(rows), files)):
        table = embedding_table({"key": [f"k{i}" for i in index], "caption": [f"caption {i}" for i in index],
                                 "label": (index % 7).tolist(), "group": groups[index].tolist(),
                                 "thumbnail": [b"" for _ in index]}, images[index], texts[index])
        pq.write_table(table, folder / f"part-{part}.parquet")
    (folder / "_corpus.json").write_text(json.dumps({"rows": rows, "embed_dim": images.shape[1], "normalized": normalized,
                                                     "model": model}))
    return folder


def exact_top(corpus_images: np.ndarray, queries: np.ndarray, k: int, normalized: bool) -> np.ndarray:
    scores = similarity(torch.from_numpy(queries).double(), torch.from_numpy(corpus_images).double(), normalized)
    return torch.topk(scores, k, dim=1).indices.numpy()
