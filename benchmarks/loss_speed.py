"""Forward + backward time of every loss beside the matmul floor and pytorch-metric-learning.

    python benchmarks/loss_speed.py [--sizes 512 2048] [--dim 256] [--repeats 9]

The floor is the bare similarity matmul of the same shapes plus its two backward matmuls
(``S = U Vᵀ``; ``dU = G V``, ``dV = Gᵀ U``): no loss can need less. PML is
``TripletMarginLoss`` with ``BatchHardMiner`` (its batch-hard path) on the same inputs, one
direction with every pair its own class, as in tests/unit/losses/test_pml_agreement.py. Prints medians and
ratios to the floor and to InfoNCE, and each loss's peak resident memory above the inputs
(one more call after the timing, the kernel's peak count reset first), measured in one run (the machine is shared: compare within a table).
"""

from __future__ import annotations

import argparse

import torch
from common import median_seconds, peak_resident_bytes, reset_peak, resident_bytes, table_header, table_row
from loss_candidates import loss_candidates

from vcl_dist.runtime.memory import keep_freed_memory_for_reuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--malloc-cache", action="store_true",
                        help="keep freed blocks for reuse (vcl_dist.runtime.memory), as training workers on CPU do")
    args = parser.parse_args()
    if args.malloc_cache and not keep_freed_memory_for_reuse():
        print("could not set glibc's malloc thresholds: measuring with the default allocator")

    rows = []
    for batch in args.sizes:
        g = torch.Generator().manual_seed(0)
        image = torch.randn(batch, args.dim, generator=g, requires_grad=True)
        text = torch.randn(batch, args.dim, generator=g, requires_grad=True)
        labels = torch.randint(0, 100, (batch,), generator=g)
        groups = torch.arange(batch)

        candidates = loss_candidates(image, text, labels, groups, label_tower_classes=100)
        try:
            from pytorch_metric_learning.distances import LpDistance
            from pytorch_metric_learning.losses import TripletMarginLoss
            from pytorch_metric_learning.miners import BatchHardMiner

            distance = LpDistance(normalize_embeddings=True, p=2, power=2)
            pml_loss, pml_miner = TripletMarginLoss(margin=0.2, distance=distance), BatchHardMiner(distance=distance)
            pair_labels, ref_labels = torch.arange(batch), torch.arange(batch)

            def pml():
                tuples = pml_miner(image, pair_labels, text, ref_labels)
                pml_loss(image, pair_labels, tuples, ref_emb=text, ref_labels=ref_labels).backward()

            candidates["pml TripletMarginLoss + BatchHardMiner (1 direction)"] = pml
        except ImportError:
            print("pytorch-metric-learning is not installed: its row is left out")

        timings = {name: median_seconds(step, args.repeats) for name, step in candidates.items()}
        peaks = {name: peak_above_now(step) for name, step in candidates.items()}
        for name, seconds in timings.items():
            rows.append((batch, name, seconds * 1000, seconds / timings["matmul floor"], seconds / timings["infonce"],
                         peaks[name]))

    allocator = "freed blocks kept for reuse" if args.malloc_cache else "default glibc allocator"
    print(f"\nforward + backward, d = {args.dim}, float32, {torch.get_num_threads()} threads, {allocator}, median of {args.repeats}\n")
    print(table_header(["B", "loss", "ms", "× floor", "× infonce", "peak MiB"], [True, False, True, True, True, True]))
    for batch, name, ms, ratio, versus_infonce, peak in rows:
        print(table_row([batch, name, f"{ms:.1f}", f"{ratio:.2f}", f"{versus_infonce:.2f}",
                         "—" if peak is None else f"{peak / 2**20:.0f}"]))


def peak_above_now(step) -> int | None:
    """Resident memory one call of ``step`` takes above what the process holds before it (None
    where the kernel's peak count cannot be reset)."""
    before = resident_bytes()
    if not reset_peak():
        return None
    step()
    return max(0, peak_resident_bytes() - before)


if __name__ == "__main__":
    main()
