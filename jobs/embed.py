"""Embed a corpus with a trained model: ``python jobs/embed.py --model RUN --out PATH [section.key=value ...]``.

Reads a split of the model's dataset (``--split``; ``data.*`` overrides point at other shards,
local or ``s3://``), decodes it in Ray Data CPU tasks, runs both towers in a pool of model
actors (GPU actors when the cluster has GPUs) and writes Parquet of (key, caption, label,
image_group, image_embedding, text_embedding, thumbnail) to ``--out``, local or ``s3://``.
``_corpus.json`` is written last: its presence marks a complete corpus. Everything is written
into a folder beside ``--out`` and moved there when complete; ``--overwrite`` replaces only a
folder that is itself an embedded corpus.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, checkpoint folder or run folder (local or s3://)")
    parser.add_argument("--out", required=True, help="folder or s3:// prefix for the embedding Parquet")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=None, help="most model actors (default: one per GPU, or half the CPUs)")
    parser.add_argument("--gpu", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--thumbnail-size", type=int, default=96, help="longer side of stored thumbnails; 0 = none")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing corpus at --out, once the new one is complete")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the model's config, e.g. data.val_path=…")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import time

    from vcl_dist.retrieval.embed import CORPUS_INFO_FILE, write_corpus_info
    from vcl_dist.retrieval.pipeline import load_model_and_config, plan_embedding
    from vcl_dist.retrieval.search import Corpus
    from vcl_dist.runtime.console import say
    from vcl_dist.storage import built_beside, display_uri, exists, filesystem_for, is_empty_folder

    if args.batch_size < 1 or args.thumbnail_size < 0 or (args.actors is not None and args.actors < 1):
        raise ValueError("--batch-size and --actors must be positive, --thumbnail-size not negative")
    model, cfg = load_model_and_config(args.model, args.overrides)
    filesystem, out = filesystem_for(args.out, cfg.s3)
    if not is_empty_folder(filesystem, out):
        if not args.overwrite:
            raise FileExistsError(f"{args.out} is not empty: pass --overwrite to replace it")
        if not exists(filesystem, f"{out}/{CORPUS_INFO_FILE}"):
            raise FileExistsError(f"{args.out} is no embedded corpus (no {CORPUS_INFO_FILE}): refusing to replace it; "
                                  "choose another --out")
    gpu = {"auto": "auto", "true": True, "false": False}[args.gpu]
    job = plan_embedding(args.model, model, cfg, args.split, use_gpu=gpu, actors=args.actors,
                         batch_size=args.batch_size, thumbnail_size=args.thumbnail_size)
    say(f"embedding {job.input_rows} rows of {display_uri(job.split_path, job.source.filesystem)} "
          f"on {'GPU' if job.use_gpu else 'CPU'} actors")
    started = time.perf_counter()
    with built_beside(filesystem, out) as staging:
        job.dataset.write_parquet(staging, filesystem=filesystem)
        seconds = time.perf_counter() - started
        rows = len(Corpus(display_uri(staging, filesystem), cfg.s3, require_info=False))
        info = {
            "rows": rows, "bad_rows": job.input_rows - rows, "embed_dim": model.embed_dim,
            "normalized": model.normalized, "model": args.model,
            "source": display_uri(job.split_path, job.source.filesystem), "seconds": seconds,
        }
        write_corpus_info(filesystem, staging, info)
    say(f"wrote {rows} embeddings to {args.out} ({info['bad_rows']} bad rows skipped) "
          f"in {seconds:.1f} s, {rows / max(seconds, 1e-9):.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
