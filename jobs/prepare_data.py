"""Convert images + captions, or WebDataset tars, into vcl-dist's Parquet shards (a Ray Data job).

    python jobs/prepare_data.py --images DIR --captions captions.csv --out OUT [--val-fraction 0.1]
    python jobs/prepare_data.py --webdataset DIR_OR_S3_PREFIX --out OUT [--rows-per-shard 10000]
    python jobs/prepare_data.py --karpathy dataset_coco.json --images COCO_DIR --out OUT

The table (CSV or JSONL) has columns image (a path relative to --images), caption, and
optionally label (class id or class name) and image_id. Rows with a missing or undecodable
image, an empty caption or an unknown label are left out and reported. A Karpathy split file
(COCO, Flickr30K) keeps its own splits: train (with restval), val and test, and the test
split's 1K folds in OUT/test/folds.json (jobs/evaluate.py --split test --protocol 1k). Exit
code 1 on a missing input, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="CSV or JSONL: image, caption[, label, image_id]")
    source.add_argument("--webdataset", help="folder, glob or s3:// prefix of WebDataset tars")
    source.add_argument("--karpathy", help="a Karpathy split file (dataset_coco.json, dataset_flickr30k.json); "
                        "its image paths are relative to --images")
    parser.add_argument("--images", help="folder the table's image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (gets train/ and val/); must be empty")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier import at --out whole, once the new one is complete")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint; credentials from the AWS environment")
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1 or args.rows_per_shard < 1:
        parser.error("--val-fraction must be in [0, 1) and --rows-per-shard positive")

    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray

    from vcl_dist.class_names import CLASSES_FILE
    from vcl_dist.config import S3Config
    from vcl_dist.data.importer import check_inputs, check_out, import_dataset
    from vcl_dist.ray_cluster import connect_ray
    from vcl_dist.runtime.console import say

    if args.karpathy is not None:
        from vcl_dist.data.karpathy import read_karpathy

        read_karpathy(args.karpathy)  # a malformed file stops here, before Ray starts
        if args.images is None or not os.path.isdir(args.images):
            raise FileNotFoundError(f"--images: no folder at {args.images}")
    else:
        check_inputs(args.captions, args.images, args.webdataset)
    check_out(args.out, args.overwrite, S3Config(endpoint_url=args.s3_endpoint_url))
    say(connect_ray(2))
    try:
        report = import_dataset(out=args.out, captions=args.captions, images=args.images, webdataset=args.webdataset,
                                karpathy=args.karpathy, rows_per_shard=args.rows_per_shard, val_fraction=args.val_fraction,
                                s3=S3Config(endpoint_url=args.s3_endpoint_url), overwrite=args.overwrite)
    finally:
        ray.shutdown()
    written = report.rows_written
    test = f" and {written['test']} test" if "test" in written else ""
    print(f"wrote {written.get('train', 0)} train, {written.get('val', 0)} val{test} rows to {args.out}")
    if report.classes:
        print(f"{len(report.classes)} classes -> {args.out}/val/{CLASSES_FILE}")
    total_bad = sum(report.bad_rows.values())
    print(f"left out {total_bad} row{'' if total_bad == 1 else 's'}" + (": " + ", ".join(f"{n} {r}" for r, n in report.bad_rows.most_common()) if total_bad else ""))
    for row, reason in report.examples[:5]:
        print(f"  {row}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
