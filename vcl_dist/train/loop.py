"""The per-worker training function that Ray Train runs on every worker.

It reads in one sitting: build (model, loss, optimizer, schedule) → resume (weights, optimizer,
data position, RNG; :mod:`.resume`) → for each epoch: steps (:func:`.step.train_step`, in
lock-step with the other workers: :mod:`.lockstep`), rank 0 evaluates (:mod:`.evaluation`), every worker
reports (a barrier) with rank 0 attaching the checkpoint. One step: a batch of preprocessed
rows from this worker's shard → both towers (bf16 autocast on GPU) → the loss of this worker's
anchors against the embeddings gathered from every worker → backward (through the gather; DDP
averages the gradients) → clip → AdamW → learning-rate step. The epoch's counters and metrics
are :mod:`.metrics`'.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from typing import Callable, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..config import Config, dump_config
from ..cpu_memory import keep_freed_memory_for_reuse
from ..data.epoch_plan import fresh_ranges, range_rows
from ..data.shard_format import drop_bad_rows
from ..losses import build_loss
from ..losses.gather import distributed_world, host_group
from ..models import build_dual_encoder
from ..models.artifacts import save_checkpoint, save_memory_shard
from ..step_phases import PhaseClock
from ..step_verdict import NonFiniteStepError, PendingVerdict
from ..tracking.monitor import worker_location
from .data_quality import worst_shards
from .evaluation import ValCache, evaluate_on_val
from .fatal import ModelBuildError, NonFiniteLossError, end_run_on_fatal_error
from .lockstep import lockstep
from .metrics import EpochProgress
from .resume import ResumePoint, checkpoints_to_resume_from, epoch_rows_state, gather_worker_states
from .schedule import build_optimizer, build_scheduler
from .step import collate_rows, pinned_collate_rows, train_step
from .tower_options import prepare_towers
from .trained_rows import TrainedRowsLog


def non_finite_step_is_fatal(train_fn: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
    """A non-finite step (judged at once, or read later from the device) ends the run as
    :class:`NonFiniteLossError`: every worker reaches the same verdict at the same step."""

    @functools.wraps(train_fn)
    def wrapped(loop_config: dict) -> dict | None:
        try:
            return train_fn(loop_config)
        except NonFiniteStepError as err:
            raise NonFiniteLossError(f"{' '.join(str(err).split())}; the optimizer step was not taken. "
                                     f"Last good checkpoint: {latest_checkpoint_path() or 'none yet'}") from None

    return wrapped


@end_run_on_fatal_error
@non_finite_step_is_fatal
def train_loop_per_worker(loop_config: dict) -> dict | None:
    run = WorkerRun(loop_config)  # build
    start = ResumePoint.restore(checkpoints_to_resume_from(), model=run.raw_model, criterion=run.criterion,
                                optimizer=run.optimizer, scheduler=run.scheduler, lr=run.lr, device=run.device,
                                data=run.data, local_batch=run.local_batch)
    run.step, run.history = start.step, start.history
    run.scheduler.lr_lambdas[0].samples_per_step = run.local_batch * run.world  # a restored schedule knew the saved world's
    run.announce(start)
    cfg, upcoming = run.cfg, None
    for epoch in range(start.epoch, cfg.train.epochs):
        run.model.train()
        ranges, carried = start.position(epoch, run.data, run.world)  # every rank's rows of the epoch still to train on
        progress = EpochProgress(epoch, carried, cfg.data.max_bad_fraction, run.local_batch * run.world, run.phase_clock())
        epoch_steps = progress.steps + min(range_rows(share) for share in ranges) // run.local_batch
        run.epoch_started(progress, epoch_steps)
        batches = upcoming or run.started_stream(epoch, ranges) or run.epoch_batches(epoch, ranges)
        upcoming, stopped_inside_epoch = None, False
        for batch in lockstep(batches, progress.waits, progress.clock):
            run.record_trained_rows(batch, epoch)
            batch, rows, bad_shards = drop_bad_rows(batch)
            progress.bad_rows.add(rows, bad_shards)
            progress.add(run.train_step(batch, epoch), run.step)
            if progress.steps % cfg.run.log_every_steps == 0:
                progress.bad_rows.check(run.device)  # a collective: every worker, same steps
                run.track_step(progress)  # a collective too
            progress.clock.end_step()
            run.show_progress(progress, epoch_steps)
            if progress.steps < epoch_steps and (run.checkpoint_due() or run.reached_max_steps()):
                # A checkpoint inside the epoch: what a restart needs to finish it.
                run.report({"epoch": epoch, "step": run.step, "epoch_step": progress.steps, "world_size": run.world,
                            "train_loss": progress.mean_loss()}, epoch, progress.running_sums(),
                           epoch_rows_state(run.data, ranges, progress.trained * run.local_batch))
            if run.reached_max_steps():
                stopped_inside_epoch = progress.steps < epoch_steps
                break
        if not stopped_inside_epoch:
            run.scheduler.finish_epoch(epoch + 1, run.planned_steps_per_epoch)
            metrics, bad_shards, step_losses = progress.finish(run.device, **run.epoch_fields(start))
            if epoch + 1 < cfg.train.epochs and not run.reached_max_steps():
                # Each epoch's reads start anew, and a worker's first batch waits for its first
                # mixing group: started now, that overlaps evaluation and the checkpoint.
                upcoming = fetch_first_ahead(run.epoch_batches(epoch + 1, fresh_ranges(run.data.rows, run.world)))
            run.evaluate_into(metrics, bad_shards, step_losses)
            run.report(metrics, epoch, None)
        if run.reached_max_steps():
            run.log(f"vcl-dist: stopped at train.max_steps={cfg.train.max_steps}")
            return run.result(stopped=True)
    return run.result(stopped=False)


class WorkerRun:
    """What one worker trains with — config, placement, model, loss, optimizer, schedule, data
    shard — and the moves of the loop that need them: a step, a report, an evaluation."""

    def __init__(self, loop_config: dict):
        cfg = self.cfg = Config.model_validate(loop_config["config"])
        inputs = ray.get(loop_config["inputs"])  # put in the object store by the driver (train.runner)
        self.tokenizer, self.class_names = inputs["tokenizer"], inputs["class_names"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        # Each worker keeps the batch it has at full size, so the global pool and (linear scaling
        # rule) the learning rate follow the world size when an elastic run shrinks or grows.
        self.local_batch = cfg.train.batch_size // cfg.train.num_workers
        self.data = inputs["train_split"]
        self.steps_per_epoch = self.data.rows // self.world // self.local_batch  # from the start of an epoch
        self.lr = cfg.train.lr * self.world / cfg.train.num_workers
        self.device = ray.train.torch.get_device()
        on_gpu = self.device.type == "cuda"
        if not on_gpu:
            # One intra-op thread per reserved CPU: more only fights the other workers.
            torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
            keep_freed_memory_for_reuse()
        self.use_amp = cfg.train.amp is True or (cfg.train.amp == "auto" and on_gpu)
        self.collate = pinned_collate_rows if on_gpu else collate_rows
        self.rows_log = TrainedRowsLog(cfg.run.trained_rows_log, self.rank) if cfg.run.trained_rows_log else None
        # A run that starts from scratch knows its first epoch's rows now: their reads start
        # while the model is built, rather than after (the first step waits for less).
        self.early_stream = None
        if ray.train.get_checkpoint() is None:
            ranges = fresh_ranges(self.data.rows, self.world)
            self.early_stream = (0, ranges, fetch_first_ahead(self.epoch_batches(0, ranges)))

        torch.manual_seed(cfg.train.seed)
        try:
            model = build_dual_encoder(cfg.model, len(self.tokenizer), cfg.data.max_text_length,
                                       self.tokenizer.pad_token_id or 0, cfg.similarity)
            self.criterion = build_loss(cfg.loss, num_classes=len(self.class_names) if self.class_names else None,
                                        embed_dim=cfg.model.embed_dim)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise ModelBuildError(f"the config builds no model: {' '.join(str(err).split())[:300]}") from None
        if hasattr(model, "logit_scale") and hasattr(self.criterion, "logit_scale"):
            self.criterion.logit_scale.data.copy_(model.logit_scale)  # InfoNCE starts at CLIP's temperature
        self.tower_options = prepare_towers(model, cfg.train)
        self.model = ray.train.torch.prepare_model(model)
        self.raw_model = self.model.module if hasattr(self.model, "module") else self.model
        self.criterion.to(self.device)
        self.optimizer = build_optimizer([self.raw_model, self.criterion], self.lr, cfg.train.weight_decay)
        # On a GPU the step's finiteness verdict stays on the device (fused AdamW skips a failed
        # step there) and is read every run.log_every_steps steps: see vcl_dist.step_verdict.
        self.verdict_on_device = on_gpu and bool(self.optimizer.defaults.get("fused"))
        if self.world > 1:
            host_group()  # made here, by every rank at once (dist.new_group is a collective)
        # The schedule runs over the planned samples (steps of the planned global batch), whatever
        # the world size does on the way (elastic): see schedule.WarmupCosineBySamples.
        self.planned_steps_per_epoch = self.data.rows // cfg.train.num_workers // self.local_batch
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_steps, self.planned_steps_per_epoch * cfg.train.epochs,
                                         cfg.train.min_lr_ratio, reference_batch=self.local_batch * cfg.train.num_workers)
        self.step, self.history = 0, []
        self.last_checkpoint_time = time.monotonic()  # the group's start counts as one (checkpoint_every_minutes)
        self.config_yaml = dump_config(cfg)
        self.val_cache = ValCache(inputs["val"])  # rank 0 evaluates on the whole val split
        self.worker_nodes = 1
        # Rank 0's numbers go to the driver (progress, trackers); every worker says where its logs are.
        self.monitor = loop_config.get("monitor")
        self.last_progress = float("-inf")
        quiet_worker_output()

    def announce(self, start: ResumePoint) -> None:
        self.worker_nodes, group_start = count_worker_nodes()  # a collective
        if self.monitor is not None:
            self.monitor.register.remote(self.rank, worker_location())
        if self.rows_log is not None:
            self.rows_log.group = group_start
        if start.step:
            self.log(f"vcl-dist: {start.describe()}")
        loss, train = self.cfg.loss, self.cfg.train
        memory = ""
        if loss.memory_size:
            memory = f" + up to {loss.memory_size} from memory" + (f" (sharded: {-(-loss.memory_size // self.world)} per worker)"
                                                                  if loss.memory_shard else "")
        pool = f"{self.local_batch * self.world} rows{memory}"
        how = ", ".join(([f"scores in tiles of {loss.chunk_size} rows"] if loss.chunk_size else [])
                        + ([f"towers in micro-batches of {train.micro_batch_size}"] if train.micro_batch_size else [])
                        + self.tower_options)
        self.log(f"vcl-dist: {self.world} workers on {self.worker_nodes} nodes: global pool {pool} per step"
                 f"{f' ({how})' if how else ''}, lr {self.lr:.3g}, {self.steps_per_epoch} steps per epoch")

    def log(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def push(self, record: dict) -> None:
        """Rank 0: a record for the driver (fire and forget: never waits on the driver)."""
        if self.rank == 0 and self.monitor is not None:
            self.monitor.push.remote(record)

    def phase_clock(self) -> PhaseClock:
        """This epoch's step-time clock: every step on a CPU; on a GPU, one step in
        ``run.log_every_steps``, synchronised at every phase boundary (which costs the overlap)."""
        if self.device.type != "cuda":
            return PhaseClock()
        torch.cuda.reset_peak_memory_stats(self.device)  # peak memory per epoch
        return PhaseClock(sync=lambda: torch.cuda.synchronize(self.device), every=self.cfg.run.log_every_steps)

    def epoch_started(self, progress: EpochProgress, epoch_steps: int) -> None:
        self.push({"kind": "epoch_start", "epoch": progress.epoch, "epochs": self.cfg.train.epochs,
                   "epoch_steps": epoch_steps, "done": progress.steps})

    def show_progress(self, progress: EpochProgress, epoch_steps: int) -> None:
        """Rank 0, at most twice a second: where the epoch is (the driver decides what to print)."""
        if self.rank == 0 and self.monitor is not None:
            now = time.monotonic()
            if now - self.last_progress >= PROGRESS_INTERVAL_S or progress.steps == epoch_steps:
                self.last_progress = now
                self.push(progress.progress_record(epoch_steps))

    def track_step(self, progress: EpochProgress) -> None:
        """The step metrics every ``run.log_every_steps`` steps (a collective; rank 0 sends them)."""
        monitored = self.criterion.monitored() if hasattr(self.criterion, "monitored") else {}
        metrics = progress.step_metrics(self.device, self.scheduler.get_last_lr()[0], monitored)
        self.push({"kind": "step", "step": self.step, "metrics": metrics})

    def epoch_batches(self, epoch: int, ranges: list) -> Iterator:
        """This worker's batches of ``epoch`` over its share of ``ranges`` (every rank's), collated."""
        rows = self.data.batches(epoch, ranges[self.rank], self.local_batch, self.cfg.data.prefetch_batches)
        if self.rows_log is None:
            return (self.collate(batch) for batch in rows)
        return ({**self.collate(batch), "keys": batch["key"]} for batch in rows)

    def started_stream(self, epoch: int, ranges: list) -> Iterator | None:
        """The batches started while the model was built, if they are ``epoch``'s over ``ranges``
        (a run from scratch); None otherwise."""
        started, self.early_stream = self.early_stream, None
        if started is not None and started[:2] == (epoch, ranges):
            return started[2]
        return None

    def record_trained_rows(self, batch: dict, epoch: int) -> None:
        if self.rows_log is not None:
            self.rows_log.write(epoch, self.step + 1, self.world, batch.pop("keys"))

    def train_step(self, batch: dict, epoch: int) -> float | PendingVerdict:
        try:
            outcome = train_step(self.model, self.criterion, self.optimizer, self.scheduler, batch, self.device,
                                 self.use_amp, self.cfg.train.grad_clip_norm, self.cfg.train.micro_batch_size,
                                 verdict_on_device=self.verdict_on_device, channels_last=self.cfg.train.channels_last)
        except FloatingPointError as err:
            raise NonFiniteStepError(f"step {self.step + 1} (epoch {epoch + 1}): {' '.join(str(err).split())}") from None
        self.step += 1
        return outcome

    def checkpoint_due(self) -> bool:
        """Whether to checkpoint after this step: every ``checkpoint_every_steps`` steps, or once
        ``checkpoint_every_minutes`` have passed since the last checkpoint by rank 0's clock (one
        tiny collective, so that every worker reports at the same step)."""
        every, minutes = self.cfg.train.checkpoint_every_steps, self.cfg.train.checkpoint_every_minutes
        due = bool(every) and self.step % every == 0
        if minutes:
            late = self.rank == 0 and time.monotonic() - self.last_checkpoint_time >= 60 * minutes
            if self.world > 1:
                flag = torch.tensor([1 if late else 0], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                late = bool(flag.item())
            due = due or late
        return due

    def reached_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def epoch_fields(self, start: ResumePoint) -> dict:
        """The epoch metrics this run knows beside the epoch's own counters."""
        return {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "world_size": self.world,
                "worker_nodes": self.worker_nodes, "global_batch": self.local_batch * self.world, "base_lr": self.lr,
                # The step this worker group started from: > 0 after a restart or --resume.
                "resumed_from_step": start.step}

    def evaluate_into(self, metrics: dict, bad_shards: list, step_losses: list[float]) -> None:
        """Rank 0: the val metrics into ``metrics``, and the epoch into the history."""
        if self.rank != 0:
            return
        metrics.update(evaluate_on_val(self.raw_model, self.cfg, self.tokenizer, self.class_names, self.device, self.use_amp,
                                       self.val_cache))
        # Kept in the history (checkpoints, metrics.jsonl, result.json), not in the metrics
        # reported to Ray: lists are no metric to plot or to tune on (metrics.HISTORY_ONLY).
        self.history.append({**metrics, "bad_shards": bad_shards, "val_bad_shards": worst_shards(self.val_cache.by_shard),
                             "step_losses": step_losses})
        self.push({"kind": "epoch", "step": self.step,
                   "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})

    def report(self, metrics: dict, epoch: int, running_sums: dict | None, epoch_rows: dict | None = None) -> None:
        """Every worker reports (a barrier); rank 0 attaches a checkpoint with every worker's RNG
        state and, inside an epoch (``running_sums``), every worker's running sums. With a
        sharded memory every worker attaches its shard file too (Ray Train merges the files into
        one checkpoint folder)."""
        workers = gather_worker_states(self.device, running_sums)
        self.last_checkpoint_time = time.monotonic()
        memory = getattr(self.criterion, "memory", None)
        sharded_memory = memory if memory is not None and memory.sharded else None
        if self.rank != 0 and sharded_memory is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            if sharded_memory is not None:
                save_memory_shard(folder, sharded_memory)
            if self.rank == 0:
                save_checkpoint(folder, model=self.raw_model, criterion=self.criterion, optimizer=self.optimizer,
                                scheduler=self.scheduler, epoch=epoch, step=self.step, history=self.history,
                                config_yaml=self.config_yaml, tokenizer=self.tokenizer, class_names=self.class_names,
                                epoch_step=running_sums["steps"] if running_sums else 0,
                                epoch_progress=[w["progress"] for w in workers] if running_sums else None,
                                epoch_rows=epoch_rows,
                                rng=[w["rng"] for w in workers])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def result(self, stopped: bool) -> dict | None:
        if self.rank != 0:
            return None
        return {"history": self.history, "stopped_at_step": self.step} if stopped else {"history": self.history}


# Rank 0 sends its progress to the driver at most this often.
PROGRESS_INTERVAL_S = 0.5

# A step needs at least this many usable rows on every worker (an anchor and a negative).
def fetch_first_ahead(batches: Iterator) -> Iterator:
    """``batches``, whose first item is fetched from now on in a background thread."""
    fetched: list = []
    done = threading.Event()

    def fetch() -> None:
        try:
            fetched.append(next(batches, None))
        except BaseException as err:  # handed to the consumer, raised in its thread
            fetched.append(err)
        done.set()

    # A daemon thread: a run that stops early (an error, train.max_steps) must not wait on it.
    threading.Thread(target=fetch, name="vcl-dist-epoch-prefetch", daemon=True).start()

    def chained() -> Iterator:
        done.wait()
        first = fetched[0]
        if isinstance(first, BaseException):
            raise first
        if first is not None:
            yield first
            yield from batches

    return chained()


def quiet_worker_output() -> None:
    """Keep a worker's output to what a user reads: no Ray Data progress bars (each worker's
    would print its own lines into the job's log) or per-dataset execution notices, and no
    dump of every report's metrics by Ray Train (the driver shows progress and metrics)."""
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
