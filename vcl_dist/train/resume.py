"""Where a worker group starts, and what a checkpoint must hold for the next one to start there.

A group starts at the beginning, at an epoch boundary, or inside an epoch (a checkpoint taken
every ``train.checkpoint_every_steps``, or at ``train.max_steps``). Inside an epoch, every
worker passes over the batches it had trained on before the checkpoint and carries on with its
running loss sums; at another world size (an elastic restart) the position is rescaled to as
many rows at the new size's steps, with the saved ranks' mean loss, and the learning rate is
rebased on the new world size.

Which checkpoint: Ray Train's latest, else the ones it registered before it, newest first
(:func:`checkpoints_to_resume_from`); one that some worker cannot read is skipped with a warning
by every worker alike (:meth:`ResumePoint.restore`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist

from ..losses.gather import distributed_world
from ..models.artifacts import checkpoint_problem, load_checkpoint, registered_checkpoints
from .fatal import CheckpointLoadError


@dataclass
class ResumePoint:
    epoch: int = 0  # the first epoch this group runs (0-based)
    skip_steps: int = 0  # batches of that epoch trained on before the checkpoint
    carried: dict = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0})  # this rank's sums of that epoch
    step: int = 0  # global step
    history: list[dict] = field(default_factory=list)

    @classmethod
    def restore(cls, checkpoints: list[ray.train.Checkpoint], *, model, criterion, optimizer, scheduler, lr: float,
                device: torch.device) -> ResumePoint:
        """Load the first of ``checkpoints`` (newest first; none: start from scratch) that every
        worker can read into the given objects; where to go on. A checkpoint that some worker
        cannot read is skipped with a warning, on every worker alike.

        Raises:
            CheckpointLoadError: no checkpoint can be read (not retried: it would fail again).
        """
        rank, world = distributed_world()
        if world > 1:  # rank 0's list for all: every worker must try the same checkpoints, in step
            listed = [[c.path for c in checkpoints]]
            dist.broadcast_object_list(listed, src=0)
            filesystem = checkpoints[0].filesystem if checkpoints else None
            checkpoints = [ray.train.Checkpoint(path, filesystem=filesystem) for path in listed[0]]
        if not checkpoints:
            return cls()
        problems = []
        for checkpoint in checkpoints:
            try:
                problem = checkpoint_problem(checkpoint.filesystem, checkpoint.path)
                if problem is None:
                    with checkpoint.as_directory() as folder:
                        state = load_checkpoint(folder, model=model, criterion=criterion, optimizer=optimizer,
                                                scheduler=scheduler)
            except Exception as err:  # torch, pickle, zip, JSON and shape errors alike: it fails the same way next time
                problem = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if all_workers_agree(problem is None, device):
                break
            problems.append(f"{checkpoint.path}: {problem or 'unreadable on another worker'}")
            if rank == 0:
                print(f"vcl-dist: warning: skipped the checkpoint {problems[-1]}", flush=True)
        else:
            raise CheckpointLoadError(f"cannot resume from the checkpoint {problems[0]}"
                                      + (f" (nor from {len(problems) - 1} earlier ones)" if len(problems) > 1 else ""))
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


def checkpoints_to_resume_from() -> list[ray.train.Checkpoint]:
    """Ray Train's latest checkpoint, then the earlier ones it registered, newest first: the
    fallbacks when the latest cannot be read."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    run_path = latest.path.rstrip("/").rsplit("/", 1)[0]
    try:
        registered = registered_checkpoints(latest.filesystem, run_path) or []
    except OSError:
        registered = []
    return [latest] + [ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in registered
                       if path.rstrip("/") != latest.path.rstrip("/")]


def all_workers_agree(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every worker (a collective)."""
    _, world = distributed_world()
    if world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
