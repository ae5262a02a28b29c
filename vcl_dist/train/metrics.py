"""One epoch's counters on one worker, and the metrics each epoch reports — with the list of
their names, which ``tune.metric`` is checked against (kept here, where the metrics are made).

Per epoch, every worker counts its steps, loss, data waits and bad rows; at the epoch's end
they are averaged or summed over workers (collectives) into `EPOCH_METRICS`, and rank 0
adds the validation metrics (``val_`` + `vcl_dist.evaluate.retrieval_metric_names`,
``val_bad_rows``, ``val_zero_shot_acc``).
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from ..config import Config
from ..evaluate import retrieval_metric_names
from ..losses.gather import distributed_world
from ..runtime.step_phases import PHASES, PhaseClock
from ..runtime.step_verdict import NonFiniteStepError, PendingVerdict, judge, read_verdicts
from .data_quality import BadRowCounter, worst_shards

# The step-time breakdown: each phase's share of the timed steps (step_phases.PHASES; they add
# up to 1), and the mean wall time of a step.
PHASE_METRICS = tuple(f"step_{name}_fraction" for name in PHASES)
EPOCH_METRICS = (
    "epoch", "step", "train_loss", "lr", "samples_per_s", "samples_per_s_per_worker", "data_wait_fraction",
    "data_wait_first_batch_s", "bad_rows", "epoch_time_s", "world_size", "worker_nodes", "global_batch", "base_lr",
    "resumed_from_step", "peak_memory_gib", "peak_rss_gib", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib",
    "step_time_s", *PHASE_METRICS,
)
# What an epoch's entry in the history (metrics.jsonl, result.json) keeps besides the reported
# metrics: lists, no metric to plot or to tune on.
HISTORY_ONLY = ("bad_shards", "val_bad_shards", "step_losses", "source_rows")


def reported_metric_names(cfg: Config) -> set[str]:
    """Every metric an epoch's report can carry (the class-level and zero-shot ones need labels
    and ``classes.txt``)."""
    val = [f"val_{name}" for name in retrieval_metric_names(cfg.eval.recall_ks)] + ["val_bad_rows", "val_zero_shot_acc"]
    return set(EPOCH_METRICS) | set(val)


class EpochProgress:
    """One worker's counters for one epoch; ``carried``: the running sums a resumed epoch
    continues from. ``waits`` collects the time spent waiting for each batch (see ``lockstep``)."""

    def __init__(self, epoch: int, carried: dict, max_bad_fraction: float, global_batch: int,
                 clock: PhaseClock | None = None):
        self.epoch, self.global_batch = epoch, global_batch
        self.clock = clock or PhaseClock()
        self.loss_sum, self.steps = carried["loss_sum"], carried["steps"]
        self.losses: list[float] = list(carried.get("losses", []))  # this worker's loss at every step of the epoch
        self.pending: list[tuple[int, PendingVerdict]] = []  # steps whose verdict is still on the device
        self.trained = 0  # steps this worker group took (a resumed epoch's first ones were taken before)
        self.waits: list[float] = []
        self.bad_rows = BadRowCounter(max_bad_fraction)
        self.started = time.perf_counter()
        self._window = (self.started, 0, 0)  # (start, steps trained, data waits) at the last step metrics

    def add(self, outcome: float | PendingVerdict, step: int) -> None:
        """Count step ``step`` (the run's global step number) with its loss, or with its verdict
        still on the device (read by `settle`)."""
        self.steps, self.trained = self.steps + 1, self.trained + 1
        if isinstance(outcome, PendingVerdict):
            self.pending.append((step, outcome))
        else:
            self.loss_sum += outcome
            self.losses.append(outcome)

    def settle(self) -> None:
        """Read the verdicts still on the device (one synchronisation) into the loss counters.
        Every worker calls it at the same steps, so every worker raises together.

        Raises:
            NonFiniteStepError: naming the first step whose verdict failed.
        """
        pending, self.pending = self.pending, []
        for (step, verdict), values in zip(pending, read_verdicts([verdict for _, verdict in pending])):
            try:
                loss = judge(values, verdict.checks)
            except NonFiniteStepError as err:
                raise NonFiniteStepError(f"step {step} (epoch {self.epoch + 1}): {err} (judged on the device, "
                                         f"read at step {pending[-1][0]})") from None
            self.loss_sum += loss
            self.losses.append(loss)

    def mean_loss(self) -> float:
        self.settle()
        return self.loss_sum / self.steps

    def running_sums(self) -> dict:
        """What a checkpoint inside the epoch keeps of this worker's progress."""
        self.settle()
        return {"loss_sum": self.loss_sum, "steps": self.steps, "losses": list(self.losses)}

    def progress_record(self, epoch_steps: int) -> dict:
        """This worker's progress inside the epoch (no collective: rank 0's view, for the console;
        its loss covers the steps whose verdict has been read)."""
        elapsed = time.perf_counter() - self.started
        read = self.steps - len(self.pending)
        return {"kind": "progress", "epoch": self.epoch, "epoch_step": self.steps, "epoch_steps": epoch_steps,
                "loss": self.loss_sum / read if read else None,
                "samples_per_s": self.trained * self.global_batch / elapsed, "elapsed_s": elapsed}

    def step_metrics(self, device: torch.device, lr: float, monitored: dict[str, torch.Tensor]) -> dict[str, float]:
        """The tracked metrics of the steps since the last call (a collective: every worker, same
        steps): this step's loss and the loss's own statistics (means over workers), the
        learning rate, global samples/s and the data-wait share of the wall time."""
        self.settle()
        now = time.perf_counter()
        started, trained, waited = self._window
        seconds = max(now - started, 1e-9)
        names = sorted(monitored)
        values = mean_over_workers([self.losses[-1], sum(self.waits[waited:]) / seconds,
                                    *[float(monitored[name]) for name in names]], device)
        self._window = (now, self.trained, len(self.waits))
        metrics = {"train/loss": values[0], "train/lr": lr,
                   "train/samples_per_s": (self.trained - trained) * self.global_batch / seconds,
                   "train/data_wait_fraction": values[1]}
        metrics.update({f"train/{name}": value for name, value in zip(names, values[2:])})
        return metrics

    def finish(self, device: torch.device, **fields) -> tuple[dict, list[tuple[str, int]], list[float]]:
        """The epoch's metrics (``fields`` adds the ones the loop knows: step, lr, world size, …),
        its worst shards and the loss of every step (mean over workers); collectives: every
        worker calls it.

        Raises:
            BadDataError: the epoch's bad rows are past ``data.max_bad_fraction``.
        """
        self.settle()
        elapsed = time.perf_counter() - self.started
        if self.steps == 0:
            raise RuntimeError(f"epoch {self.epoch + 1} had no full batch on some worker: "
                               "the training split is smaller than train.batch_size")
        # The first batch's wait is the pipeline's start-up (Ray Data re-executes it every
        # epoch); the rest is the steady state, where preprocessing falls behind the steps.
        clock = self.clock
        mean_loss, wait_fraction, first_wait, step_seconds, timed_steps, *phase_seconds = mean_over_workers(
            [self.loss_sum / self.steps, sum(self.waits) / elapsed, self.waits[0], clock.step_seconds, clock.steps,
             *[clock.seconds[name] for name in PHASES]], device)
        _, bad_rows = self.bad_rows.check(device, final=True)
        bad_shards = worst_shards(self.bad_rows.global_by_shard()) if bad_rows else []
        world = distributed_world()[1]
        rss, gpu_allocated, gpu_reserved = peak_memory_by_kind(device)
        # peak_memory_gib: what bounds this worker — torch's GPU allocations on a GPU, else the process's RSS.
        [peak_memory, *peaks] = max_over_workers(
            [b / 2**30 for b in (gpu_allocated if device.type == "cuda" else rss, rss, gpu_allocated, gpu_reserved)], device)
        phase_total = sum(phase_seconds)
        metrics = {
            "epoch": self.epoch + 1, "train_loss": mean_loss,
            "samples_per_s": self.trained * self.global_batch / elapsed,
            "samples_per_s_per_worker": self.trained * self.global_batch / world / elapsed,
            "data_wait_fraction": wait_fraction, "data_wait_first_batch_s": first_wait, "bad_rows": bad_rows,
            "epoch_time_s": elapsed, "peak_memory_gib": peak_memory, **dict(zip(PEAK_MEMORY_METRICS, peaks)),
            "step_time_s": step_seconds / timed_steps if timed_steps else 0.0,
            **{f"step_{name}_fraction": (seconds / phase_total if phase_total > 0 else 0.0)
               for name, seconds in zip(PHASES, phase_seconds)},
            **fields,
        }
        step_losses = mean_over_workers(self.losses, device) if len(self.losses) == self.steps else []
        return {name: metrics[name] for name in EPOCH_METRICS}, bad_shards, step_losses


PEAK_MEMORY_METRICS = ("peak_rss_gib", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib")


def peak_memory_by_kind(device: torch.device) -> tuple[int, int, int]:
    """Bytes: the process's peak resident memory (CPU RSS: embeddings, activations, score tiles,
    the negative memory, Ray's share of the process), and on a GPU torch's peak allocated and
    reserved memory of the epoch (reset at every epoch start; 0 without a GPU)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if device.type != "cuda":
        return rss, 0, 0
    return rss, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def max_over_workers(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    _, world = distributed_world()
    if world > 1:
        dist.all_reduce(tensor)
        tensor /= world
    return tensor.tolist()
