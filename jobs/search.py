"""Search an embedded corpus: ``python jobs/search.py --model RUN --corpus PATH (--text "…" | --image FILE)``.

Embeds the query with the model, ranks the corpus that ``jobs/embed.py`` wrote (exact search
by matrix product, streamed; with ``--index``, the corpus's FAISS index from ``jobs/index.py``,
or one at a given folder), prints the top-k keys, scores and captions and which index answered,
and writes a contact-sheet PNG of the top-k images. No Ray needed.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, checkpoint folder or run folder (local or s3://)")
    parser.add_argument("--corpus", required=True, help="the folder or s3:// prefix jobs/embed.py wrote")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption to search with")
    query.add_argument("--image", help="an image file to search with")
    parser.add_argument("--target", choices=["image", "text"], default="image",
                        help="rank the corpus's images (default) or its captions")
    parser.add_argument("-k", "--top-k", type=int, default=8)
    parser.add_argument("--index", nargs="?", const="corpus", default=None,
                        help="answer with an approximate index: the corpus's own (no value), or the index folder given")
    parser.add_argument("--sheet", default="search.png", help="contact-sheet PNG of the top images (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="s3.* settings, e.g. s3.endpoint_url=http://127.0.0.1:9000")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from vcl_dist.retrieval.contact_sheet import contact_sheet
    from vcl_dist.retrieval.pipeline import load_model_and_config
    from vcl_dist.retrieval.search import Corpus
    from vcl_dist.runtime.tables import print_hits

    if args.top_k < 1:
        raise ValueError("--top-k must be positive")
    model, cfg = load_model_and_config(args.model, args.overrides)
    corpus = Corpus(args.corpus, cfg.s3)
    query = model.encode_texts([args.text]) if args.text is not None else model.encode_images([args.image])
    index = None
    if args.index is not None:
        from vcl_dist.retrieval.ann_index import LoadedIndex

        index = LoadedIndex(corpus, args.target, folder=None if args.index == "corpus" else args.index)
    hits = corpus.search(query[0], model.similarity, target=args.target, k=args.top_k, index=index)
    print(f"answered by: {index.description if index is not None else f'an exact scan of {len(corpus)} rows'}")
    shown = args.text if args.text is not None else args.image
    print_hits(hits, model.class_names, title=f"top {len(hits)} {args.target}s for {shown!r} in {len(corpus)} rows")
    if args.target == "image" and args.sheet:
        sheet = contact_sheet([h.thumbnail for h in hits], [f"{h.rank}. {h.score:.3f} {h.caption}" for h in hits],
                              title=f"query: {shown}")
        sheet.save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
