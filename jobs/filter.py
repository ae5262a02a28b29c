"""Filter a dataset by how well each image matches its caption, and drop duplicate images.

    python jobs/filter.py --data SHARDS --out OUT --model RUN_OR_EXPORT --keep-fraction 0.3
    python jobs/filter.py --data s3://bucket/laion --out s3://bucket/laion-30 --init open_clip:ViT-B-32 \\
        --init-weights /models/vit_b_32.bin --min-score 0.28

Scores every image–caption pair of the shards at --data (Parquet or WebDataset tars, local or
s3://) with a model — a trained vcl-dist model (--model) or a pretrained CLIP (--init, as
model.init names it) — in a Ray Data job on CPU or GPU actors, removes exact duplicate images
(same bytes; the best-scored copy stays; --no-dedup keeps them), keeps the pairs scoring at
least --min-score or the best --keep-fraction of them, and writes the kept rows as Parquet
shards to --out, one per input shard. Train on them with data.train_path=OUT.

Killed, it resumes where it stopped when run again with the same arguments; run again with
other criteria, it reuses the scores. Bad rows are skipped and counted; OUT/_filter.json (written
last) says what was kept. Exit code 1 on a missing input, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shards to filter: a folder, glob or s3:// prefix of Parquet files or tars")
    parser.add_argument("--out", required=True, help="folder or s3:// prefix for the filtered shards (new, or this filter's)")
    scorer = parser.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", help="a trained model: export, checkpoint or run folder (local or s3://)")
    scorer.add_argument("--init", help="a pretrained CLIP: a Hugging Face CLIPModel (name or local folder) or open_clip:<name>")
    parser.add_argument("--init-weights", help="with --init open_clip:<name>: its weights (a local file or a pretrained tag)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--min-score", type=float, help="keep pairs whose score (the model's similarity) is at least this")
    keep.add_argument("--keep-fraction", type=float, help="keep this fraction of the pairs, the best-scored (0 < f <= 1)")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, default=None,
                        help="most model actors (default: one per GPU; on CPUs one per CPU, each reading its own shards)")
    parser.add_argument("--gpu", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier filter of other data or another model at --out")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. s3.endpoint_url=http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    if args.init_weights and not args.init:
        parser.error("--init-weights goes with --init")
    if args.batch_size < 1 or (args.actors is not None and args.actors < 1):
        parser.error("--batch-size and --actors must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray

    from vcl_dist.curation.filter_run import Criteria, run_filter
    from vcl_dist.curation.scorer_model import pretrained_scorer, trained_scorer
    from vcl_dist.ray_cluster import connect_ray
    from vcl_dist.retrieval.pipeline import check_embedding_fits
    from vcl_dist.runtime.console import say

    criteria = Criteria(args.min_score, args.keep_fraction, dedup=not args.no_dedup)
    if args.model:
        scorer = trained_scorer(args.model, args.overrides)
    else:
        scorer = pretrained_scorer(args.init, args.init_weights, args.overrides, log=say)
    say(connect_ray(2))
    resources = ray.cluster_resources()
    gpu = resources.get("GPU", 0) >= 1 if args.gpu == "auto" else args.gpu == "true"
    check_embedding_fits(resources, gpu)
    # On CPUs Ray Data fuses reading into the model actors: one actor per CPU keeps every CPU busy.
    actors = args.actors or (int(resources.get("GPU", 1)) if gpu else max(1, int(resources.get("CPU", 1))))
    report = run_filter(args.data, args.out, scorer, criteria, s3=scorer.config.s3, use_gpu=gpu, actors=actors,
                        batch_size=args.batch_size)
    bad = sum(report.bad_rows.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.bad_rows.items(), key=lambda item: -item[1]))
    threshold = "" if report.threshold is None else f" (score >= {report.threshold:.4f})"
    say(f"kept {report.kept:,} of {report.rows:,} rows{threshold} in {report.shards_written} shards at {args.out}; "
        f"{report.duplicates:,} duplicate images, {bad:,} bad rows{': ' + reasons if bad else ''}; {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
