"""The baseline of ``benchmarks/train_speed.py``: the training vcl-dist does, written as a plain
``torchrun`` DDP script with a torch ``DataLoader`` — no Ray anywhere.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/plain_ddp.py [overrides]

Same config file and overrides as ``jobs/train.py``; the same model, loss, optimizer, schedule
and step function (``vcl_dist.train.step.train_step``), the same built-in Parquet shards, the
same preprocessing (decode, seeded augmentation, tokenisation by a WordPiece tokenizer trained on
the training captions) — run in ``train.cpus_per_worker`` ``DataLoader`` processes per rank, as
vcl-dist gives each worker that many CPUs. Every epoch a fresh seeded shuffle, split across ranks
by ``DistributedSampler``; what it leaves out: vcl-dist's evaluation, checkpoints, tracking and
row-exact resume. Rank 0 prints ``first step done`` after its first step and one JSON line per
epoch (steps, seconds of the training loop, its mean loss, samples/s).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vcl_dist.class_names import CLASSES_FILE, parse_class_names  # noqa: E402
from vcl_dist.config import load_config  # noqa: E402
from vcl_dist.data.images import ImageGeometry  # noqa: E402
from vcl_dist.data.preprocess import Preprocessor  # noqa: E402
from vcl_dist.data.shapes import ensure_shapes_dataset  # noqa: E402
from vcl_dist.data.shard_format import drop_bad_rows  # noqa: E402
from vcl_dist.data.tokenizer import train_wordpiece  # noqa: E402
from vcl_dist.losses import build_loss  # noqa: E402
from vcl_dist.models import build_dual_encoder  # noqa: E402
from vcl_dist.train.schedule import build_optimizer, build_scheduler  # noqa: E402
from vcl_dist.train.step import collate_rows, train_step  # noqa: E402


class ShardRows(Dataset):
    """Rows of Parquet shards held as Arrow columns (the built-in split is small)."""

    def __init__(self, files: list[Path]):
        self.table = pq.read_table(files)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitems__(self, indices: list[int]) -> dict:
        return self.table.take(indices).to_pydict()


class PreprocessBatch:
    """The ``collate_fn``: a batch of raw rows through the project's preprocessing (in the loader's
    worker processes), then to tensors."""

    def __init__(self, preprocessor: Preprocessor):
        self.preprocessor = preprocessor

    def __call__(self, columns: dict) -> dict:
        return collate_rows(self.preprocessor(columns))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(ROOT / "jobs/configs/default.yaml", sys.argv[1:])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    s = cfg.data.shapes

    def shapes_root() -> Path:
        return ensure_shapes_dataset(Path(cfg.data.cache_dir).expanduser(), s.num_train, s.num_val, s.image_size,
                                     s.val_captions_per_image, s.seed)

    if rank == 0:  # generated once (a no-op when cached), then read by every rank
        shapes_root()
    dist.barrier()
    root = shapes_root()
    files = sorted((root / "train").glob("*.parquet"))
    captions = pq.read_table(files, columns=["caption"]).column(0).to_pylist()
    tokenizer = train_wordpiece(captions, cfg.model.text.vocab_size)
    num_classes = len(parse_class_names((root / CLASSES_FILE).read_text()) or [])

    rows = ShardRows(files)
    local_batch = cfg.train.batch_size // world
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True)
    loaders = max(1, int(cfg.train.cpus_per_worker))
    preprocess = PreprocessBatch(Preprocessor(tokenizer, ImageGeometry.of(cfg.data), cfg.data.max_text_length,
                                              cfg.data.augment, num_classes=num_classes))
    loader = DataLoader(rows, batch_size=local_batch, sampler=sampler, drop_last=True, collate_fn=preprocess,
                        num_workers=loaders, prefetch_factor=4, persistent_workers=True)

    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    model = DistributedDataParallel(build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length,
                                                       tokenizer.pad_token_id or 0, cfg.similarity))
    criterion = build_loss(cfg.loss, num_classes=num_classes, embed_dim=cfg.model.embed_dim)
    optimizer = build_optimizer([model.module, criterion], cfg.train.lr, cfg.train.weight_decay)
    steps_per_epoch = len(sampler) // local_batch
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, steps_per_epoch * cfg.train.epochs, cfg.train.min_lr_ratio,
                                reference_batch=cfg.train.batch_size)
    for epoch in range(cfg.train.epochs):
        sampler.set_epoch(epoch)
        started, trained, loss_sum = time.perf_counter(), 0, 0.0
        for batch in loader:
            batch, _, _ = drop_bad_rows(batch)
            loss_sum += train_step(model, criterion, optimizer, scheduler, batch, device, False, cfg.train.grad_clip_norm)
            trained += 1
            if rank == 0 and epoch == 0 and trained == 1:
                print("first step done", flush=True)
        elapsed = time.perf_counter() - started
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "steps": trained, "seconds": elapsed, "rank0_loss": loss_sum / trained,
                              "samples_per_s": trained * cfg.train.batch_size / elapsed}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
