"""The training data plan at the scale of LAION-400M and beyond, by simulation: no data is read.

    python benchmarks/plan_scale.py [--shards 41456 200000] [--rows-per-shard 10000] [--workers 16]

For each size, the metadata of ``--shards`` WebDataset tars of about ``--rows-per-shard``
samples each is faked (as img2dataset's ``_stats.json`` files would give it), and the real code
runs on it:

- **driver**: the training split built from the units (`vcl_dist.data.train_stream.TrainSplit`),
  pickled as it travels to every worker; the epoch's shares (``fresh_ranges``); the position a
  checkpoint inside an epoch keeps (``epoch_rows_state``) after an elastic history (16 → 12 →
  16 workers, so the shares are fragmented), as the JSON the checkpoint writes, and the shares
  a restart deals from it (``resume_ranges``);
- **worker**: one worker's epoch — the epoch order (``EpochOrder``) and the reads of its share
  of a fresh epoch, part by part as the worker reads them (``worker_chapters``): the time to
  its first part (what the epoch's first batch waits for) and to the whole.

Prints driver wall time and peak memory, the bytes of the checkpointed position and running
sums (what a restart needs: independent of the row count), the worker's time and peak memory,
and — apart, since it is a log for the epoch's report, not a position — the checkpoint's record
of the epoch's loss at every step so far (8 bytes or so a step), one row per size. Peak memory is the process's high-water
mark (VmHWM), reset between the driver's part and the worker's.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import time

import numpy as np
import pyarrow.fs as pafs
from common import peak_resident_bytes, reset_peak, resident_bytes, table_header

from vcl_dist.data.epoch_plan import fresh_ranges, range_rows, resume_ranges
from vcl_dist.data.images import ImageGeometry
from vcl_dist.data.train_stream import MAX_TASK_ROWS, TrainSplit, TrainUnit
from vcl_dist.train.resume import epoch_progress_to_save, epoch_rows_state

MIB = 2**20


def fake_units(shards: int, rows_per_shard: int, seed: int = 0) -> list[TrainUnit]:
    """WebDataset tars as the planner lists them: an S3 path each and its sample count (a crawl
    loses some of each shard's downloads: 93–100 % of ``rows_per_shard``)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(int(rows_per_shard * 0.93), rows_per_shard + 1, size=shards)
    return [TrainUnit("tar", f"s3://crawl/laion400m-data/{i:06d}.tar", int(n)) for i, n in enumerate(rows)]


def driver(shards: int, rows_per_shard: int, workers: int, mix_rows: int, local_batch: int) -> dict:
    reset_peak()
    started = time.perf_counter()
    units = fake_units(shards, rows_per_shard)
    split = TrainSplit(pafs.LocalFileSystem(), units, tokenizer=None, image_size=ImageGeometry(224), max_text_length=77,
                       augment=True, seed=0, mix_rows=mix_rows, batch_rows=128)
    shipped = pickle.dumps(split)
    shares = fresh_ranges(split.rows, workers)
    planned = time.perf_counter() - started

    # An elastic history inside one epoch: 16 workers train a third, a node goes (12 workers),
    # they train another third, the node comes back (16 workers) and trains on.
    steps = range_rows(shares[0]) // local_batch // 3
    shrunk = resume_ranges(shares, [steps * local_batch] * workers, workers * 3 // 4)
    grown = resume_ranges(shrunk, [steps * local_batch] * len(shrunk), workers)
    started = time.perf_counter()
    position = json.dumps(epoch_rows_state(split, grown, steps * local_batch)).encode()
    saved = time.perf_counter() - started
    driver_peak = peak_resident_bytes()
    # The workers' running sums at that point (two thirds of the epoch's steps), as the checkpoint
    # pickles them: the sums, and the epoch's loss at every step so far (a log for the epoch's report).
    rng = np.random.default_rng(0)
    progress = [{"loss_sum": 1.0, "steps": 2 * steps, "losses": rng.random(2 * steps).tolist()} for _ in range(workers)]
    records = epoch_progress_to_save(progress)
    log = pickle.dumps(records[0].pop("losses"))
    started = time.perf_counter()
    restored = json.loads(position)
    resumed = resume_ranges([[tuple(r) for r in s] for s in restored["ranges"]], restored["consumed"], workers)
    restarted = time.perf_counter() - started
    assert sum(range_rows(s) for s in resumed) <= split.rows
    return {"rows": split.rows, "plan_s": planned, "split_bytes": len(shipped), "position_bytes": len(position),
            "sums_bytes": len(pickle.dumps(records)), "log_bytes": len(log), "epoch_steps": 3 * steps,
            "save_s": saved, "restart_s": restarted, "driver_peak": driver_peak, "split": split,
            "share": shares[0]}


def worker(split: TrainSplit, share) -> dict:
    """One worker's epoch plan, part by part as the worker reads it (one part held at a time)."""
    reset_peak()
    started = time.perf_counter()
    split.orders.clear()
    parts = split.order(1).worker_chapters(share, MAX_TASK_ROWS, lead_rows=256)
    first = next(parts)
    first_s = time.perf_counter() - started
    reads, rows = len(first.reads), first.rows
    del first
    for part in parts:
        reads, rows = reads + len(part.reads), rows + part.rows
    assert rows == range_rows(share)
    return {"first_s": first_s, "worker_s": time.perf_counter() - started, "reads": reads,
            "worker_peak": peak_resident_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[41_456, 200_000])
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=1024, help="data.shuffle_buffer: rows of a mixing group")
    parser.add_argument("--local-batch", type=int, default=256)
    args = parser.parse_args()

    print(f"\n{args.workers} workers, data.shuffle_buffer={args.shuffle_buffer}, local batch {args.local_batch}, "
          f"{MAX_TASK_ROWS} rows per read at most\n")
    print(table_header(["shards", "rows", "driver: plan (s)", "driver: split sent to workers (MiB)",
                        "driver peak (MiB)", "checkpoint: position (bytes)", "checkpoint: running sums (bytes)",
                        "restart: deal (s)", "worker: first part planned (s)", "worker: whole epoch planned (s)",
                        "worker: reads", "worker peak (MiB)",
                        "steps per epoch", "checkpoint: the epoch's step-loss log (KiB)"],
                       [True] * 14))
    baseline = resident_bytes()
    for shards in args.shards:
        gc.collect()
        d = driver(shards, args.rows_per_shard, args.workers, args.shuffle_buffer, args.local_batch)
        w = worker(d["split"], d["share"])
        print(f"| {shards:,} | {d['rows']:,} | {d['plan_s']:.2f} | {d['split_bytes'] / MIB:.1f} | "
              f"{d['driver_peak'] / MIB:,.0f} | {d['position_bytes']:,} | {d['sums_bytes']:,} | {d['restart_s']:.3f} | "
              f"{w['first_s']:.2f} | {w['worker_s']:.1f} | {w['reads']:,} | {w['worker_peak'] / MIB:,.0f} | {d['epoch_steps']:,} | "
              f"{d['log_bytes'] / 1024:,.0f} |")
        del d, w
    print(f"\nPeak memory is the whole process's; with vcl_dist imported and nothing planned it is {baseline / MIB:,.0f} MiB.")


if __name__ == "__main__":
    main()
