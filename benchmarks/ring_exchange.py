"""The sigmoid loss's exchanges on W CPU workers (gloo): forward + backward time per step and each
worker's peak resident memory, for ``loss.gather`` local, full and ring.

    python benchmarks/ring_exchange.py [--workers 2 4] [--rows 1024] [--dim 256] [--repeats 5]

Each worker holds ``--rows`` image and caption embeddings (the global batch is W × rows); the
loss is the same in every mode (tests/unit/losses/test_sigmoid_loss.py), only the exchange and
the score matrices each worker builds differ: local and full all-gather the captions and score
``[rows, W·rows]`` (full: ``[W·rows, W·rows]``), ring passes the caption blocks round the
workers and scores ``[rows, rows]`` at a time. One thread per worker; with more workers than
cores the workers share them (say so beside any figure).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import median_seconds, peak_resident_bytes, reset_peak, resident_bytes, table_header, table_row

from vcl_dist.losses import SigmoidLoss

MODES = ("local", "full", "ring")


def _worker(rank: int, world: int, args: argparse.Namespace, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    image = torch.randn(args.rows, args.dim, generator=g, requires_grad=True)
    text = torch.randn(args.rows, args.dim, generator=g, requires_grad=True)
    labels, groups = torch.full((args.rows,), -1), torch.arange(args.rows) + rank * args.rows
    results = {}
    for mode in MODES:
        loss_fn = SigmoidLoss(gather=mode)

        def step():
            image.grad = text.grad = None
            loss_fn(image, text, labels, groups).backward()

        dist.barrier()
        seconds = median_seconds(step, args.repeats, sync=dist.barrier)
        before = resident_bytes()
        peak = None
        if reset_peak():
            step()
            peak = max(0, peak_resident_bytes() - before)
        results[mode] = (seconds, peak)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, f"{folder}/results.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rows", type=int, default=1024, help="rows per worker")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for world in args.workers:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_worker, args=(world, args, folder), nprocs=world, join=True)
            per_worker = torch.load(f"{folder}/results.pt")
        for mode in MODES:
            seconds = max(result[mode][0] for result in per_worker)  # a step ends when the slowest worker does
            peaks = [result[mode][1] for result in per_worker]
            peak = "—" if None in peaks else f"{max(peaks) / 2**20:.0f}"
            rows.append((world, mode, seconds, peak))
    print(f"\nSigmoidLoss forward + backward, {args.rows} rows per worker, d = {args.dim}, float32, gloo, 1 thread per "
          f"worker on {os.cpu_count()} cores, median of {args.repeats}; peak = the largest worker's new resident memory\n")
    print(table_header(["workers", "gather", "ms per step", "× local", "peak MiB per worker"], [True, False, True, True, True]))
    local = {world: seconds for world, mode, seconds, _ in rows if mode == "local"}
    for world, mode, seconds, peak in rows:
        print(table_row([world, mode, f"{seconds * 1000:.1f}", f"{seconds / local[world]:.2f}", peak]))


if __name__ == "__main__":
    main()
