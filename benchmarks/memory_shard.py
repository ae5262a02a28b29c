"""What a sharded negative memory (``loss.memory_shard``) saves each worker, and what it costs.

    python benchmarks/memory_shard.py [--workers 2 4] [--memory 1048576] [--batch 1024]
                                      [--dim 128] [--chunk 65536] [--negatives hardest] [--steps 3]

For each world size, W gloo processes on this machine fill a negative memory of ``--memory``
rows (random unit vectors, a quarter of them unlabeled, 1,000 classes) and take ``--steps``
triplet-loss steps (forward + backward) with a ``--batch``-row global batch, tiled in chunks of
``--chunk`` rows, once with a replicated memory and once with a sharded one. It prints, per
run: the memory's rows and bytes on each worker, the largest peak resident memory of any
worker, the median step time, and the largest difference between the two runs' per-step loss
values (the same losses, up to float32 rounding of differently ordered sums).

On a machine with fewer cores than workers the times are those of oversubscribed processes;
the per-worker arithmetic is the same in both layouts (``N · M / W`` scores a worker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import peak_resident_bytes

from vcl_dist.losses import NegativeMemory, TripletLoss


def _worker(rank: int, world: int, args, sharded: bool, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous-{sharded}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    memory = NegativeMemory(args.memory, shard=sharded)
    # Every worker enqueues the same global rows (as training does), in large blocks.
    g = torch.Generator().manual_seed(0)
    for start in range(0, args.memory, 65536):
        rows = min(65536, args.memory - start)
        image = torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=g), dim=1)
        text = torch.nn.functional.normalize(image + 0.5 * torch.randn(rows, args.dim, generator=g), dim=1)
        labels = torch.randint(-250, 1000, (rows,), generator=g).clamp_min(-1)
        memory.enqueue(image, text, labels, torch.arange(start, start + rows) + 10**9)
    loss = TripletLoss(0.2, args.negatives, memory=memory, chunk_size=args.chunk)
    local = args.batch // world
    losses, times = [], []
    for step in range(args.steps + 1):  # the first step warms up
        g = torch.Generator().manual_seed(100 + step)
        image = torch.randn(args.batch, args.dim, generator=g)[rank * local:(rank + 1) * local].requires_grad_()
        text = torch.randn(args.batch, args.dim, generator=g)[rank * local:(rank + 1) * local].requires_grad_()
        labels = torch.randint(0, 1000, (args.batch,), generator=g)[rank * local:(rank + 1) * local]
        groups = torch.arange(args.batch)[rank * local:(rank + 1) * local] + step * args.batch
        dist.barrier()
        started = time.perf_counter()
        value = loss(image, text, labels, groups)
        value.backward()
        total = value.detach().clone()
        dist.all_reduce(total)
        if step:
            times.append(time.perf_counter() - started)
            losses.append(total.item() / world)
    memory_bytes = sum(t.numel() * t.element_size() for t in (memory.image, memory.text, memory.labels, memory.groups))
    peak = torch.tensor([float(peak_resident_bytes()), memory_bytes, memory.image.shape[0]])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save({"losses": losses, "step_s": statistics.median(times), "peak_rss": peak[0].item(),
                    "memory_bytes": peak[1].item(), "rows": int(peak[2].item())}, f"{folder}/result-{sharded}.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--memory", type=int, default=1_048_576)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--negatives", default="hardest", choices=["hardest", "semi_hard", "all"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"triplet {args.negatives}, memory {args.memory:,} rows, global batch {args.batch:,}, d = {args.dim}, "
          f"chunk {args.chunk:,}, {args.steps} timed steps, {os.cpu_count()} cores\n")
    print("| workers | memory | rows per worker | memory MiB per worker | peak RSS GiB, largest worker | step s (median) "
          "| largest loss difference |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for world in args.workers:
        results = {}
        with tempfile.TemporaryDirectory() as folder:
            for sharded in (False, True):
                mp.spawn(_worker, args=(world, args, sharded, folder), nprocs=world, join=True)
                results[sharded] = torch.load(f"{folder}/result-{sharded}.pt")
        difference = max(abs(a - b) for a, b in zip(results[False]["losses"], results[True]["losses"]))
        for sharded, result in results.items():
            print(f"| {world} | {'sharded' if sharded else 'replicated'} | {result['rows']:,} | "
                  f"{result['memory_bytes'] / 2**20:,.0f} | {result['peak_rss'] / 2**30:.2f} | {result['step_s']:.2f} | "
                  f"{difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
