"""The per-worker training function that Ray Train runs on every worker.

It reads in one sitting: build (model, loss, optimizer, schedule: `.worker_model`; the
input stream: `.worker_stream`) → resume (weights, optimizer, data position, RNG;
`.resume`) → for each epoch: steps (`.step.train_step`, in lock-step with the other
workers: `.lockstep`), rank 0 evaluates (`.evaluation`), every worker reports (a
barrier) with rank 0 attaching the checkpoint (`.checkpoint_writer`). One step: a batch of
preprocessed rows from this worker's shard → both towers (bf16 autocast on GPU) → the loss of
this worker's anchors against the embeddings gathered from every worker → backward (through the
gather; DDP averages the gradients) → clip → AdamW → learning-rate step. The epoch's counters
and metrics are `.metrics`'; what reaches the driver, `.driver_link`'s.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..config import Config
from ..data.epoch_plan import range_rows
from ..data.shard_format import drop_bad_rows
from ..losses.gather import distributed_world
from ..runtime.console import one_line
from ..runtime.memory import keep_freed_memory_for_reuse
from ..runtime.step_phases import PhaseClock
from ..runtime.step_verdict import NonFiniteStepError
from .checkpoint_writer import CheckpointWriter
from .data_quality import worst_shards
from .driver_link import DriverLink
from .evaluation import ValCache, evaluate_on_val
from .fatal import NonFiniteLossError, end_run_on_fatal_error
from .global_batch import planned_shares, worker_shares
from .lockstep import lockstep
from .metrics import EpochProgress
from .resume import ResumePoint, checkpoints_to_resume_from, epoch_rows_state
from .sharding import is_sharded
from .worker_model import TrainingModel
from .worker_stream import InputStream


def non_finite_step_is_fatal(train_fn: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
    """A non-finite step (judged at once, or read later from the device) ends the run as
    `NonFiniteLossError`: every worker reaches the same verdict at the same step."""

    @functools.wraps(train_fn)
    def wrapped(loop_config: dict) -> dict | None:
        try:
            return train_fn(loop_config)
        except NonFiniteStepError as err:
            raise NonFiniteLossError(f"{one_line(err)}; the optimizer step was not taken. "
                                     f"Last good checkpoint: {latest_checkpoint_path() or 'none yet'}") from None

    return wrapped


@end_run_on_fatal_error
@non_finite_step_is_fatal
def train_loop_per_worker(loop_config: dict) -> dict | None:
    run = WorkerRun(loop_config)  # build
    trained, stream, link, cfg = run.trained, run.stream, run.link, run.cfg
    start = ResumePoint.restore(checkpoints_to_resume_from(), model=trained.model, criterion=trained.criterion,
                                optimizer=trained.optimizer, scheduler=trained.scheduler, lr=run.lr, device=run.device,
                                data=stream.data, local_batch=run.local_batch, shares=run.shares)
    trained.step, run.history = start.step, start.history
    trained.scheduler.lr_lambdas[0].samples_per_step = run.local_batch * run.shares  # a restored schedule knew the saved world's
    run.announce(start)
    upcoming = None
    for epoch in range(start.epoch, cfg.train.epochs):
        trained.model.train()
        ranges, carried = start.position(epoch, stream.data, run.shares)  # every share's rows of the epoch still to train on
        progress = EpochProgress(epoch, carried, cfg.data.max_bad_fraction, run.local_batch * run.shares, run.phase_clock())
        epoch_steps = progress.steps + min(range_rows(share) for share in ranges) // run.local_batch
        link.epoch_started(progress, epoch_steps)
        batches = upcoming or stream.started(epoch, ranges) or stream.epoch_batches(epoch, ranges)
        upcoming, stopped_inside_epoch = None, False
        for batch in lockstep(batches, progress.waits, progress.clock):
            stream.record_trained_rows(batch, epoch, trained.step + 1)
            batch, rows, bad_shards = drop_bad_rows(batch)
            progress.bad_rows.add(rows, bad_shards)
            progress.add(trained.train_step(batch, epoch), trained.step)
            if progress.steps % cfg.run.log_every_steps == 0:
                progress.bad_rows.check(run.device)  # a collective: every worker, same steps
                link.step_metrics(trained.step, progress.step_metrics(run.device, trained.lr(), trained.monitored()))
            progress.clock.end_step()
            link.show_progress(progress, epoch_steps)
            if progress.steps < epoch_steps and (run.checkpoints.due(trained.step) or trained.reached_max_steps()):
                # A checkpoint inside the epoch: what a restart needs to finish it.
                run.report({"epoch": epoch, "step": trained.step, "epoch_step": progress.steps, "world_size": run.world,
                            "train_loss": progress.mean_loss()}, epoch, progress.running_sums(),
                           epoch_rows_state(stream.data, ranges, progress.trained * run.local_batch))
            if trained.reached_max_steps():
                stopped_inside_epoch = progress.steps < epoch_steps
                break
        if not stopped_inside_epoch:
            trained.scheduler.finish_epoch(epoch + 1, trained.planned_steps_per_epoch)
            metrics, bad_shards, step_losses = progress.finish(run.device, **run.epoch_fields(start))
            if epoch + 1 < cfg.train.epochs and not trained.reached_max_steps():
                # Each epoch's reads start anew, and a worker's first batch waits for its first
                # mixing group: started now, that overlaps evaluation and the checkpoint.
                upcoming = stream.next_epoch_ahead(epoch + 1)
            run.evaluate_into(metrics, bad_shards, step_losses)
            run.report(metrics, epoch, None)
        if trained.reached_max_steps():
            link.log(f"vcl-dist: stopped at train.max_steps={cfg.train.max_steps}")
            return run.result(stopped=True)
    return run.result(stopped=False)


class WorkerRun:
    """One worker's run, composed of its parts — the model and what moves it
    (`TrainingModel`), its input (`InputStream`), what it tells the driver
    (`DriverLink`), its checkpoints (`CheckpointWriter`) — and the epoch history."""

    def __init__(self, loop_config: dict):
        cfg = self.cfg = Config.model_validate(loop_config["config"])
        inputs = ray.get(loop_config["inputs"])  # put in the object store by the driver (train.runner)
        self.tokenizer, self.class_names = inputs["tokenizer"], inputs["class_names"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        # Each share of the rows gives every step the batch a worker has at full size. The shares
        # follow the world size when an elastic run shrinks or grows, and so do the global pool and
        # (linear scaling rule) the learning rate; with train.keep_global_batch they stay as planned.
        self.local_batch = cfg.train.batch_size // cfg.train.num_workers
        self.shares = planned_shares(cfg.train.num_workers, self.world, cfg.train.keep_global_batch)
        self.lr = cfg.train.lr * self.shares / cfg.train.num_workers
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        if not on_gpu:
            # One intra-op thread per reserved CPU: more only fights the other workers.
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
            keep_freed_memory_for_reuse()
        own_shares = worker_shares(self.rank, self.world, self.shares)
        self.stream = InputStream(cfg, inputs["train_split"], own_shares, self.shares, self.local_batch, self.device,
                                  fresh_start=ray.train.get_checkpoint() is None)
        self.steps_per_epoch = self.stream.data.rows // self.shares // self.local_batch  # from the start of an epoch
        self.trained = TrainingModel(cfg, self.tokenizer, self.class_names, self.device, self.world, self.lr,
                                     self.local_batch, self.stream.data.rows, self.shares)
        self.history: list[dict] = []
        self.checkpoints = CheckpointWriter(cfg, self.rank, self.world, self.device, self.tokenizer, self.class_names)
        self.val_cache = ValCache(inputs["val"])  # rank 0 evaluates on the whole val split
        self.worker_nodes = 1
        # Rank 0's numbers go to the driver (progress, trackers); every worker says where its logs are.
        self.link = DriverLink(loop_config.get("monitor"), self.rank, cfg.train.epochs)
        quiet_worker_output()

    def announce(self, start: ResumePoint) -> None:
        self.worker_nodes, group_start = count_worker_nodes()  # a collective
        self.link.register()
        if self.stream.rows_log is not None:
            self.stream.rows_log.group = group_start
        if start.step:
            self.link.log(f"vcl-dist: {start.describe()}")
        loss, train = self.cfg.loss, self.cfg.train
        memory = ""
        if loss.memory_size:
            memory = f" + up to {loss.memory_size} from memory" + (f" (sharded: {-(-loss.memory_size // self.world)} per worker)"
                                                                  if loss.memory_shard else "")
        how = ", ".join((["captions passed round a ring of workers"] if loss.gather == "ring" and self.world > 1 else [])
                        + ([f"scores in tiles of {loss.chunk_size} rows"] if loss.chunk_size else [])
                        + ([f"towers in micro-batches of {train.micro_batch_size}"] if train.micro_batch_size else [])
                        + self.trained.tower_options)
        if self.shares > self.world:
            how = ", ".join([f"the batches of {self.shares - self.world} absent workers taken in micro-batches"]
                            + ([how] if how else []))
        workers = f"{self.world} worker{'s' if self.world != 1 else ''}"
        nodes = f"{self.worker_nodes} node{'s' if self.worker_nodes != 1 else ''}"
        self.link.log(f"vcl-dist: {workers} on {nodes}: global pool "
                      f"{self.local_batch * self.shares} rows{memory} per step{f' ({how})' if how else ''}, "
                      f"lr {self.lr:.3g}, {self.steps_per_epoch} steps per epoch")

    def phase_clock(self) -> PhaseClock:
        """This epoch's step-time clock: every step on a CPU; on a GPU, one step in
        ``run.log_every_steps``, synchronised at every phase boundary (which costs the overlap)."""
        if self.device.type != "cuda":
            return PhaseClock()
        torch.cuda.reset_peak_memory_stats(self.device)  # peak memory per epoch
        return PhaseClock(sync=lambda: torch.cuda.synchronize(self.device), every=self.cfg.run.log_every_steps)

    def epoch_fields(self, start: ResumePoint) -> dict:
        """The epoch metrics this run knows beside the epoch's own counters."""
        return {"step": self.trained.step, "lr": self.trained.lr(), "world_size": self.world,
                "worker_nodes": self.worker_nodes, "global_batch": self.local_batch * self.shares, "base_lr": self.lr,
                # The step this worker group started from: > 0 after a restart or --resume.
                "resumed_from_step": start.step}

    def evaluate_into(self, metrics: dict, bad_shards: list, step_losses: list[float]) -> None:
        """Rank 0: the val metrics into ``metrics``, and the epoch into the history. Sharded
        towers run on every worker together, so every worker embeds the val split with rank 0."""
        sharded = is_sharded(self.trained.model)
        if self.rank != 0 and not sharded:
            return
        found = evaluate_on_val(self.trained.raw_model, self.cfg, self.tokenizer, self.class_names, self.device,
                                self.trained.use_amp, self.val_cache)
        if self.rank != 0:
            return
        metrics.update(found)
        # Kept in the history (checkpoints, metrics.jsonl, result.json), not in the metrics
        # reported to Ray: lists are no metric to plot or to tune on (metrics.HISTORY_ONLY).
        data = self.stream.data
        mixture = {"source_rows": data.drawn_rows(metrics["epoch"] - 1)} if data.mixture else {}
        self.history.append({**metrics, "bad_shards": bad_shards, "val_bad_shards": worst_shards(self.val_cache.by_shard),
                             "step_losses": step_losses, **mixture})
        self.link.epoch_metrics(self.trained.step, metrics)

    def report(self, metrics: dict, epoch: int, running_sums: dict | None, epoch_rows: dict | None = None) -> None:
        self.checkpoints.report(self.trained, self.history, metrics, epoch, running_sums, epoch_rows)

    def result(self, stopped: bool) -> dict | None:
        if self.rank != 0:
            return None
        step = self.trained.step
        return {"history": self.history, "stopped_at_step": step} if stopped else {"history": self.history}


def quiet_worker_output() -> None:
    """Keep a worker's output to what a user reads: no Ray Data progress bars (each worker's
    would print its own lines into the job's log) or per-dataset execution notices, and no
    dump of every report's metrics by Ray Train (the driver shows progress and metrics)."""
    import builtins
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled", said once
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:  # Ray Train V2 logs each report at INFO under its file's path (no public switch)
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    try:  # Ray Train sends print() to its logger and also, as Ray wraps a worker's stdout, to
        # stdout: each line of a worker reached the driver twice. Plain print: once.
        from ray.train.v2._internal.logging import patch_print

        builtins.print = patch_print._original_print
    except (ImportError, AttributeError):
        pass


def latest_checkpoint_path() -> str | None:
    """Where the run's newest checkpoint is (Ray Train's view from this worker), for messages."""
    checkpoint = ray.train.get_checkpoint()
    return checkpoint.path if checkpoint is not None else None


def count_worker_nodes() -> tuple[int, float]:
    """How many Ray nodes this worker group spans, and when it started (rank 0's clock: one
    time for every rank of the group)."""
    here = (ray.get_runtime_context().get_node_id(), time.time())
    _, world = distributed_world()
    if world == 1:
        return 1, here[1]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, here)
    return len({node for node, _ in gathered}), gathered[0][1]
