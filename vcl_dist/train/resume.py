"""Where a worker group starts, and what a checkpoint must hold for the next one to start there.

A group starts at the beginning, at an epoch boundary, or inside an epoch (a checkpoint taken
every ``train.checkpoint_every_steps`` or ``checkpoint_every_minutes``, or at
``train.max_steps``). Inside an epoch, the checkpoint holds every worker's share of the epoch's
row stream and how many of its rows were trained on (`vcl_dist.data.epoch_plan`): at the
same world size every worker continues its own share with the very next row, and carries on
with its running loss sums; at another world size (an elastic restart) the rows nobody trained
on yet are dealt anew, the saved ranks' mean loss is carried, and the learning rate is rebased
on the new world size.

Which checkpoint: Ray Train's latest, else the ones it registered before it, newest first
(`checkpoints_to_resume_from`); one whose files some worker finds broken is skipped with a
warning by every worker alike (`ResumePoint.restore`). One that cannot be read because its
storage does not answer or the local disk is full is not skipped: the group fails and Ray Train
restarts it to try again (``train.max_failures``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray.train
import torch
import torch.distributed as dist

from ..data.epoch_plan import Ranges, fresh_ranges, resume_ranges
from ..data.train_stream import TrainSplit
from ..losses.gather import distributed_world
from ..models.locate import registered_checkpoints
from ..runtime.console import one_line, say
from .checkpoint import checkpoint_problem, load_checkpoint
from .fatal import CheckpointLoadError


@dataclass
class ResumePoint:
    epoch: int = 0  # the first epoch this group runs (0-based)
    epoch_step: int = 0  # steps of that epoch taken before the checkpoint
    ranges: list | None = None  # every new rank's share of that epoch's rows still to train on
    carried: dict = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0})  # this rank's sums of that epoch
    step: int = 0  # global step
    history: list[dict] = field(default_factory=list)
    checkpoint: str = ""  # the folder it was restored from

    @classmethod
    def restore(cls, checkpoints: list[ray.train.Checkpoint], *, model, criterion, optimizer, scheduler, lr: float,
                device: torch.device, data: TrainSplit, local_batch: int, shares: int | None = None) -> ResumePoint:
        """Load the first of ``checkpoints`` (newest first; none: start from scratch) that every
        worker can read into the given objects (`load_first_readable`); where to go on.
        ``shares``: how many shares the epoch's rows are dealt into (default: one per worker; see
        `.global_batch`)."""
        rank, world = distributed_world()
        if world > 1:  # rank 0's list for all: every worker must try the same checkpoints, in step
            listed = [[c.path for c in checkpoints]]
            dist.broadcast_object_list(listed, src=0)
            filesystem = checkpoints[0].filesystem if checkpoints else None
            checkpoints = [ray.train.Checkpoint(path, filesystem=filesystem) for path in listed[0]]
        if not checkpoints:
            return cls()
        checkpoint, state = load_first_readable(checkpoints, device, model=model, criterion=criterion,
                                                optimizer=optimizer, scheduler=scheduler)
        saved_world = len(state["rng"] or []) or world
        point = cls(epoch=state["epoch"] + 1, step=state["step"], history=state["history"],
                    checkpoint=checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
        if state["epoch_step"]:  # saved inside an epoch: finish that epoch
            point.epoch, point.epoch_step, saved = state["epoch"], state["epoch_step"], state["epoch_progress"]
            saved_rows = state.get("epoch_rows")
            saved_shares = len(saved_rows["ranges"]) if saved_rows else saved_world
            point.ranges = epoch_rows_to_resume(saved_rows, data, saved_shares, shares or world,
                                                point.epoch_step * local_batch, rank)
            losses = [sum(step) / len(step) for step in zip(*(p["losses"] for p in saved if "losses" in p))]
            if saved_world == world:
                point.carried = {"loss_sum": saved[rank]["loss_sum"], "steps": saved[rank]["steps"], "losses": losses}
            else:
                mean_loss = sum(p["loss_sum"] for p in saved) / max(1, sum(p["steps"] for p in saved))
                point.carried = {"loss_sum": mean_loss * point.epoch_step, "steps": point.epoch_step, "losses": losses}
        if saved_world != world:
            rescale_learning_rate(optimizer, scheduler, lr)
        restore_rng_state(state["rng"], rank, world, device)
        return point

    def position(self, epoch: int, data: TrainSplit, world: int) -> tuple[list[Ranges], dict]:
        """``(every rank's share of the rows of ``epoch`` to train on, this rank's running sums)``."""
        if epoch == self.epoch and self.ranges is not None:
            return self.ranges, dict(self.carried)
        return fresh_ranges(data.rows, world), {"loss_sum": 0.0, "steps": 0}

    def describe(self) -> str:
        where = f"step {self.epoch_step} of epoch {self.epoch + 1}" if self.epoch_step else f"the end of epoch {self.epoch}"
        return f"resumed from the checkpoint {self.checkpoint} at {where} (global step {self.step})"


def load_first_readable(checkpoints: list[ray.train.Checkpoint], device: torch.device, **objects):
    """``(checkpoint, its state)``: the first of ``checkpoints`` that every worker can read,
    loaded into ``objects`` (model, criterion, optimizer, scheduler). One whose files some worker
    finds broken is skipped with a warning, on every worker alike.

    Raises:
        CheckpointUnavailableError: a checkpoint could not be read for its storage or the local
            disk (retried by Ray Train: skipping it would go back to an older one, or end the
            run, for a passing fault).
        CheckpointLoadError: no checkpoint can be read (not retried: it would fail again).
    """
    rank, _ = distributed_world()
    problems = []
    for checkpoint in checkpoints:
        problem, unavailable = None, None
        try:
            problem = checkpoint_problem(checkpoint.filesystem, checkpoint.path)
            if problem is None:
                with checkpoint.as_directory() as folder:
                    state = load_checkpoint(folder, **objects)
        except OSError as err:  # storage that does not answer, a full local disk: not the checkpoint's fault
            unavailable = f"{type(err).__name__}: {one_line(err, 300)}"
        except Exception as err:  # torch, pickle, zip, JSON and shape errors alike: it fails the same way next time
            problem = f"{type(err).__name__}: {one_line(err, 300)}"
        verdict = worst_verdict(2 if unavailable else 1 if problem else 0, device)
        if verdict == 2:
            raise CheckpointUnavailableError(
                f"cannot read the checkpoint {checkpoint.path} now: "
                f"{unavailable or 'its storage or local disk failed on another worker'}")
        if verdict == 0:
            return checkpoint, state
        problems.append(f"{checkpoint.path}: {problem or 'unreadable on another worker'}")
        if rank == 0:
            say(f"warning: skipped the checkpoint {problems[-1]}")
    raise CheckpointLoadError(f"cannot resume from the checkpoint {problems[0]}"
                              + (f" (nor from {len(problems) - 1} earlier ones)" if len(problems) > 1 else ""))


def epoch_rows_state(data: TrainSplit, ranges: list[Ranges], consumed: int) -> dict:
    """What a checkpoint inside an epoch keeps of the epoch's rows: every rank's share and how
    many rows of it each rank trained on (the same number on every rank: lock-step batches)."""
    return {"fingerprint": data.fingerprint(), "ranges": [[list(r) for r in share] for share in ranges],
            "consumed": [consumed] * len(ranges)}


def epoch_rows_to_resume(saved: dict | None, data: TrainSplit, saved_world: int, world: int, trained_rows: int,
                         rank: int) -> list[Ranges]:
    """Every new rank's share of the rows of a checkpoint's epoch that are still to train on.

    A checkpoint of another dataset (or of a vcl-dist before row plans) cannot say which rows
    were trained on: the epoch then goes on from the same number of rows of its fresh plan,
    with a warning (rows may repeat or be missed in that epoch)."""
    if saved is not None and saved.get("fingerprint") == data.fingerprint():
        return resume_ranges([[tuple(r) for r in share] for share in saved["ranges"]], saved["consumed"], world)
    if rank == 0:
        say("warning: the checkpoint's epoch was planned over other training rows (the split changed, "
            "or an older checkpoint): its remaining rows are approximated by count")
    return resume_ranges(fresh_ranges(data.rows, saved_world), [trained_rows] * saved_world, world)


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


class CheckpointUnavailableError(OSError):
    """A checkpoint could not be read for a fault of its storage or of the local disk (retried)."""


def worst_verdict(verdict: int, device: torch.device) -> int:
    """The largest of every worker's ``verdict`` (a collective)."""
    _, world = distributed_world()
    if world == 1:
        return verdict
    flag = torch.tensor([verdict], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


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


def epoch_progress_to_save(progress: list[dict]) -> list[dict]:
    """Every worker's running sums of the epoch, and once (in the first record) the epoch's loss
    at every step so far, averaged over the workers, as the epoch reports it at its end: one
    list, not one per worker, so a checkpoint holds the epoch's steps once whatever the world size."""
    records = [{"loss_sum": p["loss_sum"], "steps": p["steps"]} for p in progress]
    logs = [p.get("losses", []) for p in progress]
    if records and all(len(log) == p["steps"] for log, p in zip(logs, progress)):
        records[0]["losses"] = [sum(step) / len(step) for step in zip(*logs)]
    return records


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
