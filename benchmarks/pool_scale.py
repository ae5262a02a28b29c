"""Peak memory and time of one forward + backward of the triplet loss, dense against tiled
(``loss.chunk_size``), as the negative pool grows.

    python benchmarks/pool_scale.py [--anchors 4096] [--pools 8192 65536 262144] [--self-batch 65536]
                                    [--dim 128] [--chunk 4096] [--repeats 3]

One process, float32, normalised embeddings (``TripletLoss``), ``hardest`` and ``all``
negatives. A pool of P rows with A anchors is a batch of A rows plus a negative memory of
P − A rows (the real loss API: the memory's rows are negatives of every anchor); the
"self-batch" row is a batch of that many rows against itself, no memory.

Each measurement runs in a fresh process: its peak is the process's peak resident memory
(VmHWM, counted afresh once the inputs exist) minus its resident memory then, so it counts
what the loss allocates, nothing before. A dense case whose peak, extrapolated from the smallest pool's
bytes per score, would not fit in 80 % of the memory available is not started: "does not fit".
Prints medians of ``--repeats`` and tiled / dense ratios, measured in one run (the machine is
shared: compare within a table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import peak_resident_bytes, reset_peak, resident_bytes, table_row

GIB = 2**30


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure_one(case: dict) -> dict:
    """In this process: build the inputs, then time ``repeats`` forward + backward passes."""
    import torch

    from vcl_dist.losses import NegativeMemory, SigmoidLoss, TripletLoss

    torch.manual_seed(0)
    anchors, pool, dim = case["anchors"], case["pool"], case["dim"]
    image = torch.randn(anchors, dim, requires_grad=True)
    text = torch.randn(anchors, dim, requires_grad=True)
    labels, groups = torch.full((anchors,), -1), torch.arange(anchors)
    memory = None
    if pool > anchors:
        memory = NegativeMemory(pool - anchors)
        rows = torch.nn.functional.normalize(torch.randn(pool - anchors, 2 * dim), dim=-1)
        memory.enqueue(rows[:, :dim], rows[:, dim:], torch.full((pool - anchors,), -1), torch.arange(anchors, pool))
    if case["negatives"] == "sigmoid":
        loss_fn = SigmoidLoss(memory=memory, chunk_size=case["chunk"])
    else:
        loss_fn = TripletLoss(0.2, case["negatives"], memory=memory, chunk_size=case["chunk"])
    if memory is not None:
        memory.enqueue = lambda *batch: None  # keep the pool fixed over the repeats
    baseline = resident_bytes()
    if not reset_peak():  # then the peak of building the inputs may hide a smaller one
        print("cannot reset the peak count (/proc/self/clear_refs): peaks below the input building's are lost",
              file=sys.stderr)
    times = []
    for _ in range(case["repeats"]):
        image.grad = text.grad = None
        start = time.perf_counter()
        loss_fn(image, text, labels, groups).backward()
        times.append(time.perf_counter() - start)
    peak = peak_resident_bytes()
    return {"seconds": statistics.median(times), "peak_above_inputs": max(0, peak - baseline)}


def run_case(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", type=int, default=4096)
    parser.add_argument("--pools", type=int, nargs="+", default=[8192, 65536, 262144])
    parser.add_argument("--self-batch", type=int, default=65536, help="a batch against itself; 0 = leave out")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=4096, help="tiled: pool rows per tile")
    parser.add_argument("--self-chunk", type=int, default=1024, help="tiled, self-batch row: pool rows per tile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--negatives", nargs="+", default=["hardest", "all", "sigmoid"],
                        help="triplet negative modes, and sigmoid: the sigmoid loss")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return

    shapes = [(args.anchors, pool, args.chunk) for pool in args.pools]
    if args.self_batch:
        shapes.append((args.self_batch, args.self_batch, args.self_chunk))
    rows = []
    for negatives in args.negatives:
        bytes_per_score = None  # the dense peak per anchor × pool score, from the first shape
        for anchors, pool, chunk in shapes:
            base = {"anchors": anchors, "pool": pool, "dim": args.dim, "negatives": negatives, "repeats": args.repeats}
            dense = {"skipped": True}
            predicted = bytes_per_score * anchors * pool if bytes_per_score else 0
            if predicted < 0.8 * available_bytes():
                dense = run_case(base | {"chunk": None})
                if bytes_per_score is None and "peak_above_inputs" in dense:
                    bytes_per_score = dense["peak_above_inputs"] / (anchors * pool)
            tiled = run_case(base | {"chunk": chunk, "repeats": args.repeats})
            rows.append((negatives, anchors, pool, chunk, dense, tiled, predicted))
            print(f"  measured {negatives} A={anchors} P={pool}", file=sys.stderr, flush=True)

    import torch

    print(f"\nforward + backward of TripletLoss (by negatives) and SigmoidLoss, d = {args.dim}, float32, "
          f"{torch.get_num_threads()} threads, "
          f"median of {args.repeats}; peak = resident memory above the inputs\n")
    print("| loss | anchors | pool | dense peak GiB | dense s | chunk | tiled peak GiB | tiled s | tiled / dense time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for negatives, anchors, pool, chunk, dense, tiled, predicted in rows:
        if dense.get("skipped"):
            dense_peak, dense_s = f"does not fit (~{predicted / GIB:.0f})", "—"
        elif "error" in dense:
            dense_peak, dense_s = f"failed: {dense['error']}", "—"
        else:
            dense_peak, dense_s = f"{dense['peak_above_inputs'] / GIB:.2f}", f"{dense['seconds']:.2f}"
        tiled_peak = f"{tiled['peak_above_inputs'] / GIB:.2f}" if "seconds" in tiled else f"failed: {tiled.get('error')}"
        tiled_s = f"{tiled['seconds']:.2f}" if "seconds" in tiled else "—"
        ratio = f"{tiled['seconds'] / dense['seconds']:.2f}" if "seconds" in tiled and "seconds" in dense else "—"
        print(table_row([negatives, f"{anchors:,}", f"{pool:,}", dense_peak, dense_s, f"{chunk:,}", tiled_peak, tiled_s, ratio]))


if __name__ == "__main__":
    main()
