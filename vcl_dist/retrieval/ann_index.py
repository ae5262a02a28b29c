"""Approximate nearest-neighbour indexes (FAISS) over an embedded corpus, for corpora too large
to scan per query.

``build_index`` picks the index as autofaiss does (`choose_index`): exact (``Flat``) below
100k vectors, ``HNSW`` when the vectors and the graph fit the memory budget, ``IVF-PQ`` beyond
(vectors compressed to ``dim / 2`` bytes each). It trains on a sample (IVF-PQ) and then adds the
corpus in one streaming pass (Ray Data over the corpus files, batch by batch: memory holds the
index and one batch). Cosine models' vectors are L2-normalised and searched by inner product;
VCRL models' by squared L2 distance, scored as minus that distance (the model's own ranking).

IVF-PQ codes are 4-bit fast-scan (``dim / 2`` sub-quantizers: fast to train and to scan), and
its candidates are re-ranked exactly: the top ``refine × k`` by the codes are rescored with the
vectors themselves, kept beside the index as float16 in ``vectors.f16.npy`` and read through a
memory map (disk, not RAM: the index in memory is the codes and ids only).

For ``target="image"`` the index holds one vector per distinct image (``image_group``): a corpus
has a row per caption and the rows of one image share its embedding; exact image search
returns distinct images too. ``ids.npy`` maps index positions to corpus rows (absent when every row is indexed, in order).

Saved beside the corpus in ``_index/<target>/`` with ``index.json`` (kind, parameters, metric,
the corpus version and model it covers); loading refuses an index whose corpus or model differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np

from ..storage import display_uri, exists, read_text, write_text_atomically

INDEX_DIR = "_index"
RERANK_FILE = "vectors.f16.npy"
KINDS = ("auto", "flat", "hnsw", "ivfpq")
# autofaiss's thresholds: exact search is fast enough below this many vectors.
EXACT_BELOW = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
TRAIN_SAMPLE = 100_000  # vectors an IVF-PQ index trains on (at least 39 per list, FAISS's rule)


@dataclass
class IndexParams:
    """How an index is built: its kind, metric, dimension and the kind's own parameters."""
    kind: str  # flat | hnsw | ivfpq
    metric: str  # ip (cosine, normalised vectors) | l2 (squared distance)
    dim: int
    hnsw_m: int = HNSW_M
    ef_search: int = HNSW_EF_SEARCH
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 0
    refine: int = 0  # IVF-PQ: candidates re-ranked exactly, as a multiple of k

    def factory(self) -> str:
        """The FAISS ``index_factory`` string of these parameters (``HNSW32,Flat``, ``IVF4000,PQ64x4fs``)."""
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m},Flat", "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}x4fs"}[self.kind]

    def bytes_per_vector(self) -> float:
        """Memory the index takes per vector."""
        if self.kind == "flat":
            return 4 * self.dim
        if self.kind == "hnsw":
            return 4 * self.dim + 2 * 4 * self.hnsw_m * 1.1  # the vectors and ~2M neighbour ids per level-0 node
        return self.pq_m / 2 + 8  # the 4-bit codes and the id (the re-rank vectors stay on disk)


@dataclass
class IndexInfo:
    """What ``index.json`` says of a built index: its parameters, what it covers and what it cost."""
    params: IndexParams
    target: str
    vectors: int
    corpus_version: str
    model: str
    normalized: bool
    build_s: float = 0.0
    trained_on: int = 0
    size_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as ``index.json``'s text."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "IndexInfo":
        """The record of an ``index.json`` text."""
        raw = json.loads(text)
        return cls(**{**raw, "params": IndexParams(**raw["params"])})


def pq_subquantizers(dim: int) -> int:
    """4-bit sub-quantizers of two dimensions each."""
    return dim // 2


def choose_index(kind: str, vectors: int, dim: int, normalized: bool, memory_gb: float) -> IndexParams:
    """The index for ``vectors`` of ``dim`` within ``memory_gb`` (``kind="auto"``), or the one asked for.

    Raises:
        ValueError: an unknown kind, or one that cannot fit the budget (one line).
    """
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    metric = "ip" if normalized else "l2"
    nlist = max(1, min(int(4 * math.sqrt(max(vectors, 1))), vectors // 39 or 1))
    candidates = {
        "flat": IndexParams("flat", metric, dim),
        "hnsw": IndexParams("hnsw", metric, dim),
        "ivfpq": IndexParams("ivfpq", metric, dim, nlist=nlist, pq_m=pq_subquantizers(dim),
                             nprobe=max(1, min(nlist, int(round(nlist / 16)))), refine=30),
    }
    budget = memory_gb * 2**30
    if kind == "auto":
        if vectors < EXACT_BELOW and candidates["flat"].bytes_per_vector() * vectors <= budget:
            return candidates["flat"]
        if candidates["hnsw"].bytes_per_vector() * vectors <= budget:
            return candidates["hnsw"]
        kind = "ivfpq"
    params = candidates[kind]
    if kind == "ivfpq" and dim % 4:
        raise ValueError(f"an ivfpq index needs an embedding size divisible by 4 (two dimensions per 4-bit code, "
                         f"codes in pairs), not {dim}: use --kind hnsw")
    if params.bytes_per_vector() * vectors > budget:
        raise ValueError(f"a {kind} index of {vectors} {dim}-d vectors needs about "
                         f"{params.bytes_per_vector() * vectors / 2**30:.2f} GiB, more than --memory-gb {memory_gb:g}")
    return params


def corpus_version(corpus) -> str:
    """What an index covers: the corpus's Parquet files (names and sizes) and its ``_corpus.json``."""
    import pyarrow.fs as pafs

    digest = hashlib.sha256()
    for path in sorted(corpus.dataset.files):
        info = corpus.filesystem.get_file_info(path)
        size = info.size if info.type == pafs.FileType.File else -1
        digest.update(f"{path.rsplit('/', 1)[-1]}:{size}\n".encode())
    digest.update(json.dumps(corpus.info, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _new_index(params: IndexParams):
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if params.metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(params.dim, params.factory(), metric)
    if params.kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def _prepare(vectors: np.ndarray, normalized: bool, holder: str = "the corpus", hint: str = ": embed it again") -> np.ndarray:
    """float32, contiguous, L2-normalised for cosine models.

    Raises:
        ValueError: a NaN or infinite value (one line, naming its ``holder``).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if normalized:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{holder} holds NaN or infinite embeddings{hint}")
    return vectors


def indexed_rows(corpus, target: str) -> np.ndarray:
    """Corpus rows to index, in corpus order: every row for text; for images, each image
    group's first row (a pass over the ``image_group`` column only)."""
    rows = len(corpus)
    if target != "image" or "image_group" not in corpus.dataset.schema.names:
        return np.arange(rows, dtype=np.int64)
    groups = corpus.dataset.to_table(columns=["image_group"]).column(0).to_numpy()
    _, first = np.unique(groups, return_index=True)
    return np.sort(first).astype(np.int64)


def build_index(corpus, target: str = "image", kind: str = "auto", memory_gb: float = 4.0, batch_rows: int = 65_536,
                seed: int = 0, log=print) -> IndexInfo:
    """Build, save beside the corpus and return the info of an index of ``corpus``'s ``target``
    embeddings (see the module docstring). Uses Ray Data for the streaming pass.

    Raises:
        ValueError: an empty corpus, NaN embeddings, a kind or budget that cannot work (one line).
    """
    import ray.data

    from .search import EMBEDDING_COLUMNS, fixed_size_lists_to_numpy

    started = time.perf_counter()
    normalized = bool(corpus.info.get("normalized", True))
    rows = indexed_rows(corpus, target)
    if len(rows) == 0:
        raise ValueError(f"the corpus {corpus.uri} is empty")
    params = choose_index(kind, len(rows), corpus.embed_dim, normalized, memory_gb)
    index = _new_index(params)
    column = EMBEDDING_COLUMNS[target]
    keep = np.zeros(len(corpus), dtype=bool)
    keep[rows] = True
    trained_on = 0
    if not index.is_trained:  # IVF-PQ: k-means and codebooks on a random sample of the vectors
        sample = np.sort(np.random.default_rng(seed).choice(rows, size=min(len(rows), TRAIN_SAMPLE), replace=False))
        vectors = corpus.dataset.take(sample, columns=[column]).column(0)
        training = _prepare(fixed_size_lists_to_numpy(vectors), normalized)
        log(f"vcl-dist: training {params.factory()} on {len(training)} vectors")
        index.train(training)
        trained_on = len(training)
    # The streaming pass: Ray Data reads the files in order (preserve_order), so a batch's rows
    # continue the corpus's row numbering; only the rows to index are added.
    stream = ray.data.read_parquet(list(corpus.dataset.files), filesystem=corpus.filesystem).select_columns([column])
    stream.context.execution_options.preserve_order = True  # this dataset's own copy of the context
    staging = tempfile.mkdtemp(prefix="vcl-dist-index-")
    try:
        # IVF-PQ re-ranks with the vectors themselves: written as float16 beside the index, as they stream by.
        rerank = (np.lib.format.open_memmap(f"{staging}/{RERANK_FILE}", mode="w+", dtype=np.float16,
                                            shape=(len(rows), params.dim)) if params.kind == "ivfpq" else None)
        offset, added, last_report = 0, 0, time.monotonic()
        for batch in stream.iter_batches(batch_size=batch_rows, batch_format="pyarrow"):
            size = batch.num_rows
            mask = keep[offset:offset + size]
            if mask.any():
                vectors = _prepare(fixed_size_lists_to_numpy(batch.column(0))[mask], normalized)  # only the rows kept
                index.add(vectors)
                if rerank is not None:
                    rerank[added:added + len(vectors)] = vectors
                added += len(vectors)
            offset += size
            if time.monotonic() - last_report >= 30:
                log(f"vcl-dist: added {added}/{len(rows)} vectors ({100 * added / len(rows):.0f}%)")
                last_report = time.monotonic()
        if added != len(rows):
            raise ValueError(f"the corpus {corpus.uri} changed while it was indexed: {added} of {len(rows)} vectors added")
        if rerank is not None:
            rerank.flush()
            del rerank
        info = IndexInfo(params, target, added, corpus_version(corpus), str(corpus.info.get("model", "")), normalized,
                         build_s=time.perf_counter() - started, trained_on=trained_on)
        save_index(corpus, index, rows, info, staging)
    finally:  # every exit, a failed pass too, removes the staging folder
        shutil.rmtree(staging, ignore_errors=True)
    return info


def index_folder(corpus, target: str) -> str:
    """Where a corpus's index of ``target`` (image or text) lives: ``<corpus>/_index/<target>``."""
    return f"{corpus.path}/{INDEX_DIR}/{target}"


def save_index(corpus, index, rows: np.ndarray, info: IndexInfo, staging: str) -> None:
    """Write ``index.faiss``, ``ids.npy`` (and IVF-PQ's re-rank vectors, already in ``staging``),
    then ``index.json`` last: its presence marks a complete index (a crash mid-write leaves
    none that loads). ``info.size_bytes``: the index in memory (codes or vectors, graph, ids)."""
    import faiss
    import pyarrow.fs as pafs

    folder = index_folder(corpus, info.target)
    faiss.write_index(index, f"{staging}/index.faiss")
    if not np.array_equal(rows, np.arange(len(rows))):  # every row indexed: positions are rows, no map needed
        np.save(f"{staging}/ids.npy", rows)
    info.size_bytes = sum(os.path.getsize(f"{staging}/{name}") for name in ("index.faiss", "ids.npy")
                          if os.path.exists(f"{staging}/{name}"))
    if os.path.exists(f"{staging}/{RERANK_FILE}"):
        info.extra["rerank_file_bytes"] = os.path.getsize(f"{staging}/{RERANK_FILE}")
    if exists(corpus.filesystem, f"{folder}/index.json"):
        corpus.filesystem.delete_file(f"{folder}/index.json")
    corpus.filesystem.create_dir(folder, recursive=True)
    for name in sorted(os.listdir(staging)):
        pafs.copy_files(f"{staging}/{name}", f"{folder}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=corpus.filesystem)
    write_text_atomically(corpus.filesystem, f"{folder}/index.json", info.to_json())


class LoadedIndex:
    """An index read back for a corpus; ``search`` returns corpus rows and the model's scores."""

    def __init__(self, corpus, target: str = "image", folder: str | None = None):
        import faiss
        import pyarrow.fs as pafs

        self.folder = folder or index_folder(corpus, target)
        shown = display_uri(self.folder, corpus.filesystem)
        if not exists(corpus.filesystem, f"{self.folder}/index.json"):
            raise FileNotFoundError(f"no index at {shown}: build one with jobs/index.py --corpus {corpus.uri}")
        self.info = IndexInfo.from_json(read_text(corpus.filesystem, f"{self.folder}/index.json"))
        if self.info.target != target:
            raise ValueError(f"the index at {shown} is of {self.info.target} embeddings, not {target}")
        if self.info.corpus_version != corpus_version(corpus):
            raise ValueError(f"the index at {shown} was built for another version of the corpus {corpus.uri}: "
                             "rebuild it with jobs/index.py")
        if self.info.params.dim != corpus.embed_dim or self.info.model != str(corpus.info.get("model", "")):
            raise ValueError(f"the index at {shown} was built for another model's embeddings: rebuild it with jobs/index.py")
        names = (["index.faiss"] + (["ids.npy"] if exists(corpus.filesystem, f"{self.folder}/ids.npy") else [])
                 + ([RERANK_FILE] if self.info.params.kind == "ivfpq" else []))
        if isinstance(corpus.filesystem, pafs.LocalFileSystem):
            local = self.folder
        else:  # object storage: a local copy for this process's life (the re-rank file is memory-mapped)
            local = tempfile.mkdtemp(prefix="vcl-dist-index-")
            weakref.finalize(self, shutil.rmtree, local, True)
            for name in names:
                pafs.copy_files(f"{self.folder}/{name}", f"{local}/{name}", source_filesystem=corpus.filesystem,
                                destination_filesystem=pafs.LocalFileSystem())
        self.index = faiss.read_index(f"{local}/index.faiss")
        self.rows = np.load(f"{local}/ids.npy") if "ids.npy" in names else np.arange(self.info.vectors)
        self.vectors = np.load(f"{local}/{RERANK_FILE}", mmap_mode="r") if self.info.params.kind == "ivfpq" else None
        self.tune()

    def tune(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Search-time knobs: HNSW's ``efSearch``, IVF's ``nprobe`` (more: better recall, slower)."""
        import faiss

        params = self.info.params
        if params.kind == "hnsw":
            self.index.hnsw.efSearch = ef_search or params.ef_search
        elif params.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = nprobe or params.nprobe

    @property
    def description(self) -> str:
        """The index and its search-time knobs as set now (`tune`)."""
        import faiss

        p = self.info.params
        knob = ""
        if p.kind == "hnsw":
            knob = f", efSearch {self.index.hnsw.efSearch}"
        elif p.kind == "ivfpq":
            knob = f", nprobe {faiss.extract_index_ivf(self.index).nprobe}, top {p.refine}×k re-ranked exactly"
        return f"{p.factory()} ({p.metric}{knob}) over {self.info.vectors} {self.info.target} vectors"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[Q, D]`` queries -> ``(scores [Q, k], corpus rows [Q, k])``, best first; rows of
        missing results (fewer than k vectors) are -1. Scores are the model's: cosine, or minus
        the squared distance."""
        queries = _prepare(np.atleast_2d(queries), self.info.normalized, holder="the query", hint="")
        k = min(k, self.info.vectors)
        if self.vectors is None:
            distances, ids = self.index.search(queries, k)
            scores = distances if self.info.params.metric == "ip" else -distances
        else:
            scores, ids = self._reranked(queries, k)
        rows = np.where(ids >= 0, self.rows[np.maximum(ids, 0)], -1)
        return scores, rows

    def _reranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ: the top ``refine × k`` by the codes, rescored with the vectors, best ``k`` kept."""
        _, candidates = self.index.search(queries, min(self.info.params.refine * k, self.info.vectors))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = np.sort(found[found >= 0])  # sorted: sequential reads of the map
            vectors = np.asarray(self.vectors[found], dtype=np.float32)
            exact = vectors @ query if self.info.params.metric == "ip" else -((vectors - query) ** 2).sum(axis=1)
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, :len(best)], ids[row, :len(best)] = exact[best], found[best]
        return scores, ids
