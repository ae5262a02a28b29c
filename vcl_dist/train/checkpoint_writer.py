"""When a worker group checkpoints, and the report that carries the checkpoint: every worker
reports (a barrier); rank 0 attaches the training state with every worker's RNG state and, inside
an epoch, every worker's running sums and rows; with a sharded memory every worker attaches its
shard too (Ray Train merges the files into one checkpoint folder). Sharded towers (FSDP) are
gathered whole for it by every worker together."""

from __future__ import annotations

import tempfile
import time

import ray.train
import torch
import torch.distributed as dist

from ..config import Config, dump_config
from .checkpoint import save_checkpoint, save_memory_shard
from .resume import epoch_progress_to_save, gather_worker_states
from .sharding import is_sharded
from .state_dicts import whole_state
from .worker_model import TrainingModel


class CheckpointWriter:
    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, tokenizer, class_names):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tokenizer, self.class_names = tokenizer, class_names
        self.config_yaml = dump_config(cfg)
        self.last_time = time.monotonic()  # the group's start counts as one (checkpoint_every_minutes)

    def due(self, step: int) -> bool:
        """Whether to checkpoint after step ``step``: every ``checkpoint_every_steps`` steps, or once
        ``checkpoint_every_minutes`` have passed since the last checkpoint by rank 0's clock (one
        tiny collective, so that every worker reports at the same step)."""
        every, minutes = self.cfg.train.checkpoint_every_steps, self.cfg.train.checkpoint_every_minutes
        due = bool(every) and step % every == 0
        if minutes:
            late = self.rank == 0 and time.monotonic() - self.last_time >= 60 * minutes
            if self.world > 1:
                flag = torch.tensor([1 if late else 0], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                late = bool(flag.item())
            due = due or late
        return due

    def report(self, trained: TrainingModel, history: list[dict], metrics: dict, epoch: int,
               running_sums: dict | None, epoch_rows: dict | None = None) -> None:
        """Report ``metrics`` with a checkpoint of ``trained`` at ``epoch`` (inside it when
        ``running_sums`` are given)."""
        workers = gather_worker_states(self.device, running_sums)
        self.last_time = time.monotonic()
        # Sharded towers are gathered by every worker together (rank 0 keeps the whole state).
        state = whole_state(trained.model, trained.criterion, trained.optimizer) if is_sharded(trained.model) else None
        memory = getattr(trained.criterion, "memory", None)
        sharded_memory = memory if memory is not None and memory.sharded else None
        if self.rank != 0 and sharded_memory is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            if sharded_memory is not None:
                save_memory_shard(folder, sharded_memory)
            if self.rank == 0:
                save_checkpoint(folder, model=trained.raw_model, criterion=trained.criterion, optimizer=trained.optimizer,
                                scheduler=trained.scheduler, epoch=epoch, step=trained.step, history=history,
                                config_yaml=self.config_yaml, tokenizer=self.tokenizer, class_names=self.class_names,
                                epoch_step=running_sums["steps"] if running_sums else 0,
                                epoch_progress=epoch_progress_to_save([w["progress"] for w in workers]) if running_sums else None,
                                epoch_rows=epoch_rows,
                                rng=[w["rng"] for w in workers], state=state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
