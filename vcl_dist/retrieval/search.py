"""Exact search over an embedded corpus (the Parquet that `.embed` writes).

The corpus is streamed in record batches and only a running top-k is kept, so memory holds
one batch of embeddings at a time: exact search by matrix product, for corpora of any size
that one machine can scan. Past a few tens of millions of rows, build an approximate index
instead (docs/guides/serving.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from ..config import S3Config
from ..evaluate import distinct_images
from ..storage import display_uri, exists, filesystem_for, list_files, read_text
from .embed import CORPUS_INFO_FILE

EMBEDDING_COLUMNS = {"image": "image_embedding", "text": "text_embedding"}


@dataclass
class Hit:
    """One search result: its rank, score and the corpus row's key, caption, label and thumbnail."""
    rank: int
    score: float
    key: str
    caption: str
    label: int
    thumbnail: bytes


class Corpus:
    """An embedded corpus at a local path or ``s3://`` URI.

    ``_corpus.json`` says how its vectors rank (cosine or squared distance) and is written last,
    so a corpus without it is incomplete or no corpus: refused unless ``require_info`` is off
    (``jobs/embed.py`` counting what it has just written).

    Raises:
        FileNotFoundError: nothing at the path, no embedding Parquet or no ``_corpus.json`` in it (one line).
    """

    def __init__(self, uri: str, s3: S3Config | None = None, scan_rows: int = 65_536, require_info: bool = True):
        self.uri = uri
        self.filesystem, self.path = filesystem_for(uri, s3)
        if not exists(self.filesystem, self.path):
            raise FileNotFoundError(f"no corpus at {uri}")
        try:
            files = list_files(self.filesystem, self.path, "parquet")
        except FileNotFoundError:
            raise FileNotFoundError(f"no Parquet files in {uri}: run jobs/embed.py first") from None
        self.dataset = pads.dataset(files, format="parquet", filesystem=self.filesystem)
        missing = {"key", *EMBEDDING_COLUMNS.values()} - set(self.dataset.schema.names)
        if missing:
            raise ValueError(f"{uri} is no embedded corpus: it lacks the columns {', '.join(sorted(missing))}")
        info_path = f"{self.path}/{CORPUS_INFO_FILE}"
        if exists(self.filesystem, info_path):
            self.info = json.loads(read_text(self.filesystem, info_path))
        elif require_info:
            raise FileNotFoundError(f"{uri} has no {CORPUS_INFO_FILE}: an unfinished or foreign corpus (jobs/embed.py "
                                    "writes it last, with how the model ranks); embed it again")
        else:
            self.info = {}
        self.scan_rows = scan_rows

    @property
    def embed_dim(self) -> int:
        """The size ``D`` of the corpus's embeddings."""
        return self.dataset.schema.field("image_embedding").type.list_size

    def __len__(self) -> int:
        return self.dataset.count_rows()

    def search(self, query: torch.Tensor, similarity, *, target: str = "image", k: int = 8, index=None) -> list[Hit]:
        """The ``k`` rows whose ``target`` embedding scores highest against ``query [D]``.

        ``similarity(queries [Q, D], items [N, D]) -> [Q, N]``: the model's ranking (cosine or
        minus squared distance, see `RetrievalModel.similarity`). ``index``: a
        `vcl_dist.retrieval.ann_index.LoadedIndex` of this corpus's ``target``
        embeddings answers instead of the exact scan (a flat index gives the scan's hits).

        Raises:
            ValueError: the query's size differs from the corpus's embeddings (another model).
        """
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"the corpus {display_uri(self.path, self.filesystem)} holds {self.embed_dim}-d embeddings "
                             f"but the model makes {query.shape[-1]}-d ones: embed the corpus with this model")
        if index is not None:
            scores, rows = index.search(query.reshape(1, -1).float().numpy(), k)
            found = rows[0] >= 0
            return self._hits(torch.from_numpy(scores[0][found].astype(np.float64)), torch.from_numpy(rows[0][found]))
        query = query.reshape(1, -1).double()
        # Image search returns distinct images: a corpus has one row per caption, and rows of
        # one image share its embedding. Scores are reduced to one per image_group (in each
        # batch and across batches), which keeps the running top-k exact.
        distinct = target == "image" and "image_group" in self.dataset.schema.names
        columns = [EMBEDDING_COLUMNS[target]] + (["image_group"] if distinct else [])
        best_scores = torch.empty(0, dtype=torch.float64)
        best_rows = torch.empty(0, dtype=torch.long)
        best_groups = torch.empty(0, dtype=torch.long)
        offset = 0
        for batch in self.dataset.to_batches(columns=columns, batch_size=self.scan_rows):
            vectors = fixed_size_lists_to_numpy(batch.column(0))
            # A NaN row (a broken embedding) must never crowd out real answers: it ranks last.
            scores = similarity(query, torch.from_numpy(vectors).double())[0].nan_to_num(nan=float("-inf"))
            rows = torch.arange(offset, offset + len(vectors))
            groups = torch.tensor(batch.column(1).to_numpy(zero_copy_only=False)) if distinct else rows
            best_scores, best_rows, best_groups = _top_k_per_group(
                torch.cat([best_scores, scores]), torch.cat([best_rows, rows]), torch.cat([best_groups, groups]), k)
            offset += len(vectors)
        if offset == 0:
            raise ValueError(f"the corpus {self.uri} is empty")
        return self._hits(best_scores, best_rows)

    def _hits(self, best_scores: torch.Tensor, best_rows: torch.Tensor) -> list[Hit]:
        columns = [c for c in ("key", "caption", "label", "thumbnail") if c in self.dataset.schema.names]
        rows = self.dataset.take(pa.array(best_rows.numpy()), columns=columns).to_pylist()
        return [
            Hit(rank + 1, float(score), str(row["key"]), row.get("caption") or "",
                -1 if row.get("label") is None else int(row["label"]), row.get("thumbnail") or b"")
            for rank, (score, row) in enumerate(zip(best_scores.tolist(), rows))
        ]


def _top_k_per_group(scores: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor, k: int):
    """The ``k`` best-scored groups, each by its best row, best first."""
    if len(scores) == 0:
        return scores, rows, groups
    order = torch.argsort(scores, descending=True, stable=True)
    scores, rows, groups = scores[order], rows[order], groups[order]
    keep = distinct_images(groups)[:k]  # in score order, a group's first row is its best
    return scores[keep], rows[keep], groups[keep]


def fixed_size_lists_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list<float>[D]`` column -> ``float32 [N, D]`` without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)  # a writable copy
