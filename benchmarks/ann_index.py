"""Approximate indexes on a million vectors: build time, size, recall@10 against exact search,
queries/s and latency, through vcl-dist's own build path (``jobs/index.py``'s ``build_index``:
Ray Data streaming over the corpus Parquet).

    python benchmarks/ann_index.py [--vectors 1000000] [--dim 128] [--queries 1000] [--kinds hnsw,ivfpq]

The corpus is synthetic and clustered (vectors around 1,000 centres with spread, not uniform:
uniform random vectors have no neighbours worth finding), written once into ``--cache`` as an
embedded corpus. Queries are other vectors from the same centres (as text queries are not
corpus images). Truth: the exact top 10 by brute force (FAISS ``IndexFlatIP``). Per index:
build seconds (training included), bytes on disk and against the raw vectors, recall@10, and
search speed with one thread: one query at a time (queries/s, p50 and p99 latency) and in
batches of 100. Targets: HNSW recall@10 ≥ 0.95 at ≥ 1,000 queries/s single-threaded;
IVF-PQ at most 1/8 of the raw vectors' size at recall@10 ≥ 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def clustered(rng: np.random.Generator, rows: int, dim: int, centres: np.ndarray, spread: float) -> np.ndarray:
    picks = rng.integers(0, len(centres), rows)
    return (centres[picks] + spread * rng.standard_normal((rows, dim), dtype=np.float32)).astype(np.float32)


def write_corpus(folder: Path, vectors: np.ndarray, files: int = 16) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "_corpus.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    for part, rows in enumerate(np.array_split(np.arange(len(vectors)), files)):
        lists = pa.FixedSizeListArray.from_arrays(pa.array(vectors[rows].reshape(-1)), dim)
        pq.write_table(pa.table({"key": pa.array([f"v{i}" for i in rows]), "caption": pa.array([""] * len(rows)),
                                 "label": pa.array(np.full(len(rows), -1)), "image_group": pa.array(rows),
                                 "image_embedding": lists, "text_embedding": lists,
                                 "thumbnail": pa.array([b""] * len(rows), pa.binary())}), folder / f"part-{part:03d}.parquet")
    (folder / "_corpus.json").write_text(json.dumps({"rows": len(vectors), "embed_dim": dim, "normalized": True,
                                                     "model": "synthetic"}))


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="hnsw,ivfpq")
    parser.add_argument("--memory-gb", type=float, default=8.0)
    parser.add_argument("--cache", default="~/.cache/vcl-dist/bench-ann")
    args = parser.parse_args()

    import faiss
    import ray

    from vcl_dist.retrieval.ann_index import LoadedIndex, build_index
    from vcl_dist.retrieval.search import Corpus

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    folder = Path(args.cache).expanduser() / f"corpus-{args.vectors}-{args.dim}"
    if not (folder / "_corpus.json").exists():
        write_corpus(folder, clustered(rng, args.vectors, args.dim, centres, 0.6))
    queries = normalise(clustered(np.random.default_rng(1), args.queries, args.dim, centres, 0.6))
    corpus = Corpus(str(folder))
    vectors = normalise(corpus.dataset.to_table(columns=["image_embedding"]).column(0).combine_chunks().flatten()
                        .to_numpy().reshape(-1, args.dim))
    faiss.omp_set_num_threads(1)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    started = time.perf_counter()
    _, truth = exact.search(queries, 10)
    exact_qps = args.queries / (time.perf_counter() - started)
    raw_bytes = vectors.nbytes
    del vectors, exact
    faiss.omp_set_num_threads(2)  # the build uses both cores, as jobs/index.py does

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    rows = [("exact (brute force)", "-", f"{raw_bytes / 2**20:.0f} MiB", "1.000", f"{exact_qps:.0f}", "-", "-", "-")]
    for kind in args.kinds.split(","):
        info = build_index(corpus, "image", kind, args.memory_gb, log=lambda line: print(line, flush=True))
        index = LoadedIndex(corpus, "image")
        faiss.omp_set_num_threads(1)
        _, found = index.search(queries, 10)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        latencies = []
        for query in queries:
            t0 = time.perf_counter()
            index.search(query[None], 10)
            latencies.append(time.perf_counter() - t0)
        batch_started = time.perf_counter()
        for start in range(0, len(queries), 100):
            index.search(queries[start:start + 100], 10)
        batch_qps = len(queries) / (time.perf_counter() - batch_started)
        faiss.omp_set_num_threads(2)
        latencies.sort()
        rows.append((index.description, f"{info.build_s:.0f} s", f"{info.size_bytes / 2**20:.0f} MiB "
                     f"({info.size_bytes / raw_bytes:.2f}× the raw vectors)", f"{recall:.3f}",
                     f"{len(latencies) / sum(latencies):.0f}", f"{1000 * statistics.median(latencies):.2f} ms",
                     f"{1000 * latencies[int(0.99 * len(latencies)) - 1]:.2f} ms", f"{batch_qps:.0f}"))
    ray.shutdown()
    header = ("index", "build", "size", "recall@10", "q/s (1 at a time)", "p50", "p99", "q/s (batches of 100)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{args.vectors:,} clustered {args.dim}-d vectors, {args.queries} queries, search on 1 thread")
    for row in [header, *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
