"""Where a filter's time goes: ``jobs/filter.py``'s stages on crawl-like JPEGs.

    python benchmarks/filter_speed.py [--rows 10000] [--copies 0.1] [--keep-fraction 0.3]

Filters ``--rows`` rows of photo-like JPEGs of 256–512 px a side (``data_speed.py``'s, in shards
of 1000 rows), a ``--copies`` share of them given another row's image, with a tiny CLIP at 224 px
(patches of 32 px, 32 wide: so that the figures are the pipeline's: reading, decoding, tokenising, hashing, the duplicate
shuffle, the threshold, the writes; a real CLIP adds its own forward time, on GPU actors at
scale). Prints each stage's seconds and rows/s, and the duplicates found against those planted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import table_header, table_row
from data_speed import crawl_like_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))


def planted_copies(source: Path, out: Path, share: float, seed: int = 0) -> int:
    """The shards of ``source`` in ``out`` with a ``share`` of rows showing another row's image;
    returns how many rows are copies of an earlier distinct image."""
    rng = np.random.default_rng(seed)
    tables = [pq.read_table(file) for file in sorted(source.glob("*.parquet"))]
    images = [image for table in tables for image in table.column("image").to_pylist()]
    targets = rng.choice(len(images), size=int(share * len(images)), replace=False)
    for target in targets:
        images[target] = images[int(rng.integers(len(images)))]
    out.mkdir(parents=True)
    start = 0
    for index, table in enumerate(tables):
        column = table.schema.get_field_index("image")
        rows = images[start:start + table.num_rows]
        start += table.num_rows
        pq.write_table(table.set_column(column, "image", [rows]), out / f"part-{index:05d}.parquet")
    return len(images) - len(set(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--copies", type=float, default=0.1)
    parser.add_argument("--keep-fraction", type=float, default=0.3)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/vcl-dist/benchmarks"))
    args = parser.parse_args()

    import ray
    from pretrained_models import save_tiny_clip

    from vcl_dist.curation.filter_run import Criteria, run_filter
    from vcl_dist.curation.scorer_model import pretrained_scorer

    source = crawl_like_dataset(Path(args.cache), args.rows, 16) / "train"
    work = Path(tempfile.mkdtemp(prefix="filter-speed-"))
    try:
        planted = planted_copies(source, work / "shards", args.copies)
        scorer = pretrained_scorer(str(save_tiny_clip(work / "clip", image_size=224, resize_side=224, patch_size=32)), log=lambda _: None)
        cpus = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        report = run_filter(str(work / "shards"), str(work / "out"), scorer, Criteria(keep_fraction=args.keep_fraction),
                            actors=cpus, batch_size=256)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{report.rows:,} rows in {report.shards} shards, {cpus} CPUs ({cpus} model actors), tiny CLIP at 224 px (patch 32); "
          f"duplicates found {report.duplicates:,} (planted {planted:,}); kept {report.kept:,} "
          f"(--keep-fraction {args.keep_fraction} of {report.candidates:,} distinct good rows)\n")
    print(table_header(["stage", "seconds", "rows/s"], [False, True, True]))
    for stage, seconds in [*report.stage_seconds.items(), ("whole filter", report.seconds)]:
        print(table_row([stage, f"{seconds:.1f}", f"{report.rows / max(seconds, 1e-9):,.0f}"]))


if __name__ == "__main__":
    main()
