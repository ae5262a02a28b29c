"""What each worker holds of the model under DDP and FSDP (``train.strategy``): parameters,
gradients and AdamW's state, in bytes, on W gloo workers on the CPU, after one training step.

    python benchmarks/sharded_memory.py [--workers 2 3] [--image-arch vit_b_32] [--text-layers 12]
                                        [--text-hidden 512]

The dual encoder is vcl-dist's own (``model.image.arch`` any torchvision model, the BERT-style
text tower at the given size), built from a config as a run builds it. Bytes are those of the
tensors a worker keeps (its shards under FSDP), counted exactly; "peak RSS" is the worker
process's peak resident memory, for context (it also holds the step's activations and, under
FSDP, the gathered blocks). Prints one table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import peak_resident_bytes, table_header, table_row

MIB = 2**20


def local_bytes(tensors) -> int:
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)


def _worker(rank: int, world: int, strategy: str, args: argparse.Namespace, rendezvous: str, out: str) -> None:
    from vcl_dist.config import load_config
    from vcl_dist.losses import InfoNCELoss
    from vcl_dist.models import build_dual_encoder
    from vcl_dist.train.schedule import build_optimizer, build_scheduler
    from vcl_dist.train.sharding import bare_model, shard_model
    from vcl_dist.train.step import train_step

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.image.arch={args.image_arch}", f"model.text.num_layers={args.text_layers}",
                             f"model.text.hidden_size={args.text_hidden}", f"model.text.num_heads={args.text_hidden // 64}",
                             f"model.text.intermediate_size={4 * args.text_hidden}", "model.embed_dim=512"])
    torch.manual_seed(0)
    model = shard_model(build_dual_encoder(cfg.model, cfg.model.text.vocab_size, 32), strategy, torch.device("cpu"),
                        world, use_amp=False)
    criterion = InfoNCELoss()
    optimizer = build_optimizer([bare_model(model), criterion], 1e-4, 0.05)
    scheduler = build_scheduler(optimizer, 0, 10, 0.1)
    batch = {"image": torch.randint(0, 256, (2, 3, args.image_size, args.image_size), dtype=torch.uint8),
             "input_ids": torch.randint(1, cfg.model.text.vocab_size, (2, 32)),
             "attention_mask": torch.ones(2, 32, dtype=torch.long), "label": torch.full((2,), -1),
             "group": torch.arange(2) + 2 * rank}
    train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    params = list(bare_model(model).parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    row = {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for p in params),
           "optimizer": local_bytes(state), "count": sum(p.numel() for p in bare_model(model).state_dict().values()),
           "peak": peak_resident_bytes()}
    gathered = [None] * world
    dist.all_gather_object(gathered, row)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--image-arch", default="vit_b_32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--text-hidden", type=int, default=512)
    args = parser.parse_args()
    measured = {}
    for world in args.workers:
        for strategy in ("ddp", "fsdp"):  # each in fresh processes: peaks of their own
            with tempfile.TemporaryDirectory() as folder:
                out = os.path.join(folder, "rows.pt")
                mp.spawn(_worker, args=(world, strategy, args, os.path.join(folder, "rendezvous"), out), nprocs=world,
                         join=True)
                measured[world, strategy] = torch.load(out)
    count = measured[args.workers[0], "ddp"][0]["count"]
    print(f"\nper worker after one AdamW step: {args.image_arch} image tower + {args.text_layers}-layer, "
          f"{args.text_hidden}-wide text tower ({count / 1e6:.1f} M parameters), float32, gloo on the CPU\n")
    print(table_header(["workers", "strategy", "parameters MiB", "gradients MiB", "AdamW state MiB", "held MiB",
                        "held / DDP's", "1/W", "peak RSS MiB"], [True, False] + [True] * 7))
    for world in args.workers:
        ddp_held = max(r["parameters"] + r["gradients"] + r["optimizer"] for r in measured[world, "ddp"])
        for strategy in ("ddp", "fsdp"):
            # The most loaded worker's tensors, and the highest peak of any worker.
            worst = max(measured[world, strategy], key=lambda r: r["parameters"] + r["gradients"] + r["optimizer"])
            held = worst["parameters"] + worst["gradients"] + worst["optimizer"]
            peak = max(r["peak"] for r in measured[world, strategy])
            print(table_row([world, strategy, f"{worst['parameters'] / MIB:.1f}", f"{worst['gradients'] / MIB:.1f}",
                             f"{worst['optimizer'] / MIB:.1f}", f"{held / MIB:.1f}", f"{held / ddp_held:.3f}",
                             f"{1 / world:.3f}", f"{peak / MIB:.0f}"]))


if __name__ == "__main__":
    main()
