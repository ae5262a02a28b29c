"""One training step of the dual encoder with the towers' memory and speed levers: activation
checkpointing (``train.activation_checkpointing``) and patch dropout (``model.image.patch_dropout``),
alone and together, against the plain step.

    python benchmarks/tower_step.py [--arch vit_b_32] [--batch 32] [--repeats 3] [--device cpu]

One process per case, so each peak is its own: the step's time (median of ``--repeats``, after
one warm-up step) and its peak memory above what the process held before the first step (CPU:
resident memory, VmHWM; GPU: ``torch.cuda.max_memory_allocated``), which holds the gradients and
AdamW's state (the same in every case, shown apart) and the step's activations. The towers: ``--arch`` image
tower at 224 px, the BERT-style text tower at 12 layers × 512 wide, InfoNCE, AdamW. Prints one
table with ratios to the plain step, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import median_seconds, peak_resident_bytes, reset_peak, resident_bytes, table_header, table_row

CASES = {
    "plain": [],
    "activation checkpointing": ["train.activation_checkpointing=true"],
    "patch dropout 0.5": ["model.image.patch_dropout=0.5"],
    "patch dropout 0.75": ["model.image.patch_dropout=0.75"],
    "both (0.5)": ["train.activation_checkpointing=true", "model.image.patch_dropout=0.5"],
}
MIB = 2**20


def measure(case: str, args: argparse.Namespace) -> dict:
    import torch

    from vcl_dist.config import load_config
    from vcl_dist.losses import InfoNCELoss
    from vcl_dist.models import build_dual_encoder
    from vcl_dist.train.schedule import build_optimizer, build_scheduler
    from vcl_dist.train.step import train_step
    from vcl_dist.train.tower_options import prepare_towers

    cfg = load_config(None, [f"model.image.arch={args.arch}", "model.text.num_layers=12", "model.text.hidden_size=512",
                             "model.text.num_heads=8", "model.text.intermediate_size=2048", *CASES[case]])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_dual_encoder(cfg.model, cfg.model.text.vocab_size, 32)
    prepare_towers(model, cfg.train)
    model.to(device)
    criterion = InfoNCELoss().to(device)
    optimizer = build_optimizer([model, criterion], 1e-4, 0.05)
    scheduler = build_scheduler(optimizer, 0, 100, 0.1)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(1, cfg.model.text.vocab_size, (args.batch, 32), generator=g),
             "attention_mask": torch.ones(args.batch, 32, dtype=torch.long), "label": torch.full((args.batch,), -1),
             "group": torch.arange(args.batch)}
    use_amp = device.type == "cuda"

    def step():
        train_step(model, criterion, optimizer, scheduler, batch, device, use_amp, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    baseline = resident_bytes()
    reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    seconds = median_seconds(step, args.repeats)  # its warm-up step creates AdamW's state
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident_bytes()
    # Gradients and AdamW's two moments: the same in every case.
    fixed = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"seconds": seconds, "peak_above": max(0, peak - baseline), "fixed": fixed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_b_32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    rows = {}
    for case in args.cases:
        proc = subprocess.run([sys.executable, __file__, "--one", case, "--arch", args.arch, "--batch", str(args.batch),
                               "--repeats", str(args.repeats), "--device", args.device], capture_output=True, text=True)
        rows[case] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                      {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1][:80]})
        print(f"  measured {case}", file=sys.stderr, flush=True)
    import torch

    threads = torch.get_num_threads() if args.device == "cpu" else None
    print(f"\none training step: {args.arch} at 224 px + 12-layer, 512-wide text tower, batch {args.batch}, "
          f"{args.device}{f' ({threads} threads)' if threads else ', bf16 autocast'}, median of {args.repeats}; "
          "peak = memory above the built model\n")
    print(table_header(["case", "step s", "× plain time", "peak MiB", "of it gradients + AdamW MiB", "rest (activations) MiB",
                        "× plain activations"], [False] + [True] * 6))
    plain = rows.get("plain", {})
    for case, row in rows.items():
        if "error" in row:
            print(table_row([case, f"failed: {row['error']}", *["—"] * 5]))
            continue
        rest = row["peak_above"] - row["fixed"]
        time_ratio = f"{row['seconds'] / plain['seconds']:.2f}" if "seconds" in plain else "—"
        plain_rest = plain["peak_above"] - plain["fixed"] if "peak_above" in plain else 0
        rest_ratio = f"{rest / plain_rest:.2f}" if plain_rest > 0 else "—"
        print(table_row([case, f"{row['seconds']:.2f}", time_ratio, f"{row['peak_above'] / MIB:.0f}",
                         f"{row['fixed'] / MIB:.0f}", f"{rest / MIB:.0f}", rest_ratio]))


if __name__ == "__main__":
    main()
