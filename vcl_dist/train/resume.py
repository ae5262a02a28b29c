"""Where a worker group starts, and what a checkpoint must hold for the next one to start there.

A group starts at the beginning, at an epoch boundary, or inside an epoch (a checkpoint taken
every ``train.checkpoint_every_steps``, or at ``train.max_steps``). Inside an epoch, every
worker passes over the batches it had trained on before the checkpoint and carries on with its
running loss sums; at another world size (an elastic restart) the position is rescaled to as
many rows at the new size's steps, with the saved ranks' mean loss, and the learning rate is
rebased on the new world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist

from ..losses.gather import distributed_world
from ..models.artifacts import load_checkpoint
from .fatal import CheckpointLoadError


@dataclass
class ResumePoint:
    epoch: int = 0  # the first epoch this group runs (0-based)
    skip_steps: int = 0  # batches of that epoch trained on before the checkpoint
    carried: dict = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0})  # this rank's sums of that epoch
    step: int = 0  # global step
    history: list[dict] = field(default_factory=list)

    @classmethod
    def restore(cls, checkpoint: ray.train.Checkpoint | None, *, model, criterion, optimizer, scheduler, lr: float,
                device: torch.device) -> ResumePoint:
        """Load ``checkpoint`` (None: start from scratch) into the given objects; where to go on.

        Raises:
            CheckpointLoadError: the checkpoint cannot be read (not retried: it would fail again).
        """
        if checkpoint is None:
            return cls()
        try:
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(folder, model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler)
        except Exception as err:  # torch, pickle, zip, JSON and shape errors alike: it fails the same way next time
            raise CheckpointLoadError(f"cannot resume from the checkpoint {checkpoint.path}: {type(err).__name__}: "
                                      f"{' '.join(str(err).split())[:300]}") from None
        rank, world = distributed_world()
        saved_world = len(state["rng"] or []) or world
        point = cls(epoch=state["epoch"] + 1, step=state["step"], history=state["history"])
        if state["epoch_step"]:  # saved inside an epoch: finish that epoch
            point.epoch, point.skip_steps, saved = state["epoch"], state["epoch_step"], state["epoch_progress"]
            if saved_world == world:
                point.carried = saved[rank]
            else:
                point.skip_steps = point.skip_steps * saved_world // world
                mean_loss = sum(p["loss_sum"] for p in saved) / max(1, sum(p["steps"] for p in saved))
                point.carried = {"loss_sum": mean_loss * point.skip_steps, "steps": point.skip_steps}
        if saved_world != world:
            rescale_learning_rate(optimizer, scheduler, lr)
        restore_rng_state(state["rng"], rank, world, device)
        return point

    def position(self, epoch: int) -> tuple[int, dict]:
        """``(batches to pass over, running sums)`` at the start of ``epoch``."""
        if epoch == self.epoch and self.skip_steps:
            return self.skip_steps, dict(self.carried)
        return 0, {"loss_sum": 0.0, "steps": 0}

    def describe(self) -> str:
        where = f"step {self.skip_steps} of epoch {self.epoch + 1}" if self.skip_steps else f"the end of epoch {self.epoch}"
        return f"resumed from the checkpoint at {where} (global step {self.step})"


def rescale_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make ``lr`` the base of the schedule (a restored optimizer carries the old world size's)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)


def restore_rng_state(states: list[dict] | None, rank: int, world: int, device: torch.device) -> None:
    """Put back this rank's RNG state; a checkpoint of another world size has no state for it."""
    if not states or len(states) != world:
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def gather_worker_states(device: torch.device, progress: dict | None) -> list[dict]:
    """Every worker's torch RNG state (dropout draws from it) and epoch progress, in rank order:
    what rank 0 saves so that each rank can resume as itself. A collective."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    state = {"rng": rng, "progress": progress}
    _, world = distributed_world()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states
