"""A worker's model and what moves it: the dual encoder (wrapped for DDP), the loss, AdamW and
the learning-rate schedule, and one training step with them."""

from __future__ import annotations

import torch

from ..config import Config
from ..losses import build_loss
from ..losses.gather import host_group
from ..models import build_dual_encoder
from ..runtime.console import one_line
from ..runtime.step_verdict import NonFiniteStepError, PendingVerdict
from .fatal import ModelBuildError
from .schedule import build_optimizer, build_scheduler
from .sharding import bare_model, shard_model
from .step import train_step
from .tower_options import prepare_towers


class TrainingModel:
    """The model, loss, optimizer and schedule of one worker, and the global step count."""

    def __init__(self, cfg: Config, tokenizer, class_names: list[str] | None, device: torch.device, world: int,
                 lr: float, local_batch: int, split_rows: int, shares: int | None = None):
        """``shares``: how many shares of the rows each step takes (`.global_batch`;
        default ``world``): more than the workers, and each worker's shares run as micro-batches."""
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        try:
            model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length,
                                       tokenizer.pad_token_id or 0, cfg.similarity)
            self.criterion = build_loss(cfg.loss, num_classes=len(class_names) if class_names else None,
                                        embed_dim=cfg.model.embed_dim)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise ModelBuildError(f"the config builds no model: {one_line(err, 300)}") from None
        if hasattr(model, "logit_scale") and hasattr(self.criterion, "logit_scale"):
            self.criterion.logit_scale.data.copy_(model.logit_scale)  # InfoNCE starts at CLIP's temperature
        if cfg.train.dtype == "float64":  # the batches follow: uint8 pixels meet float64 buffers, tokens float64 tables
            model.to(torch.float64)
            self.criterion.to(torch.float64)
        self.tower_options = prepare_towers(model, cfg.train)
        self.use_amp = cfg.train.dtype == "float32" and (cfg.train.amp is True or (cfg.train.amp == "auto" and
                                                                                  device.type == "cuda"))
        self.model = shard_model(model, cfg.train.strategy, device, world, self.use_amp)
        if cfg.train.strategy == "fsdp":
            self.tower_options.append(f"towers sharded over {world} workers (FSDP)")
        self.raw_model = bare_model(self.model)
        self.criterion.to(device)
        self.optimizer = build_optimizer([self.raw_model, self.criterion], lr, cfg.train.weight_decay)
        # On a GPU the step's finiteness verdict stays on the device (fused AdamW skips a failed
        # step there) and is read every run.log_every_steps steps: see runtime.step_verdict.
        self.verdict_on_device = device.type == "cuda" and bool(self.optimizer.defaults.get("fused"))
        if world > 1:
            host_group()  # made here, by every rank at once (dist.new_group is a collective)
        # The schedule runs over the planned samples (steps of the planned global batch), whatever
        # the world size does on the way (elastic): see schedule.WarmupCosineBySamples.
        self.planned_steps_per_epoch = split_rows // cfg.train.num_workers // local_batch
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_steps,
                                         self.planned_steps_per_epoch * cfg.train.epochs, cfg.train.min_lr_ratio,
                                         reference_batch=local_batch * cfg.train.num_workers)
        self.step = 0
        self.micro_batch_size = cfg.train.micro_batch_size
        if (shares or world) > world:  # one micro-batch per share, each the size of a planned worker's batch
            self.micro_batch_size = min(cfg.train.micro_batch_size or local_batch, local_batch)
        # Micro-batches on: every step of every worker takes the cached-gradient way, even one
        # whose batch is a single micro-batch (see train.step.train_step).
        self.cached_always = bool(self.micro_batch_size and (self.micro_batch_size < local_batch or (shares or world) > world))

    def train_step(self, batch: dict, epoch: int) -> float | PendingVerdict:
        """One step on ``batch``; a non-finite one ends the run, naming the step."""
        train = self.cfg.train
        try:
            outcome = train_step(self.model, self.criterion, self.optimizer, self.scheduler, batch, self.device,
                                 self.use_amp, train.grad_clip_norm, self.micro_batch_size,
                                 verdict_on_device=self.verdict_on_device, channels_last=train.channels_last,
                                 cached_always=self.cached_always)
        except FloatingPointError as err:
            raise NonFiniteStepError(f"step {self.step + 1} (epoch {epoch + 1}): {one_line(err)}") from None
        self.step += 1
        return outcome

    def reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def monitored(self) -> dict:
        """The loss's own numbers worth watching (a temperature, a violation fraction)."""
        return self.criterion.monitored() if hasattr(self.criterion, "monitored") else {}
