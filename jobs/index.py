"""Build an approximate index of an embedded corpus: ``python jobs/index.py --corpus PATH [--kind auto|flat|hnsw|ivfpq] [--memory-gb N]``.

Reads the corpus that ``jobs/embed.py`` wrote (local or ``s3://``) in one streaming pass with
Ray Data and builds a FAISS index of its image embeddings (``--target text``: its captions'),
saved beside it in ``_index/<target>/``. ``--kind auto`` picks as autofaiss does: exact below
100k vectors, HNSW while vectors and graph fit ``--memory-gb``, IVF-PQ beyond. Search with it:
``jobs/search.py --index``. Prints what was built: kind, vectors, size, build time.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the folder or s3:// prefix jobs/embed.py wrote")
    parser.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivfpq"], default="auto")
    parser.add_argument("--target", choices=["image", "text"], default="image", help="which embeddings to index")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory the index may take (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="s3.* settings, e.g. s3.endpoint_url=http://127.0.0.1:9000")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from vcl_dist.config import ConfigError, load_config
    from vcl_dist.ray_cluster import connect_ray
    from vcl_dist.retrieval.ann_index import build_index, index_folder
    from vcl_dist.retrieval.search import Corpus
    from vcl_dist.runtime.console import say
    from vcl_dist.storage import display_uri

    if args.memory_gb <= 0:
        raise ValueError("--memory-gb must be positive")
    others = [o for o in args.overrides if not o.strip().startswith("s3.")]
    if others:
        raise ConfigError(f"{others[0]!r}: jobs/index.py takes only s3.* settings")
    s3 = load_config(None, args.overrides).s3
    corpus = Corpus(args.corpus, s3)
    say(connect_ray(2))
    info = build_index(corpus, args.target, args.kind, args.memory_gb)
    say(f"built {info.params.factory()} ({info.params.metric}) over {info.vectors} {args.target} vectors in "
        f"{info.build_s:.1f} s, {info.size_bytes / 2**20:.1f} MiB: {display_uri(index_folder(corpus, args.target), corpus.filesystem)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
