"""The channel from the training workers to the driver.

Ray Train V2 has no logger callbacks and the driver sits in ``trainer.fit()``: rank 0 pushes
what it measures (progress inside an epoch, step metrics, epoch metrics) to a small actor, and
every worker says where its logs are; a thread on the driver drains it (`.watcher`). One
process — the driver — writes the trackers and the console: no tracker client on the workers,
no second run per restarted worker group, no progress bar per worker.

Records are plain dicts with a ``kind``:

- ``epoch_start``: ``epoch``, ``epochs``, ``epoch_steps``, ``done`` (steps a resumed epoch had)
- ``progress``: ``epoch``, ``epoch_step``, ``epoch_steps``, ``loss`` (rank 0's epoch mean so far),
  ``samples_per_s``, ``elapsed_s`` (of the epoch, this worker group)
- ``step``: ``step`` (global), ``metrics`` (every ``run.log_every_steps`` steps; means over workers)
- ``epoch``: ``step``, ``metrics`` (the epoch's entry of ``metrics.jsonl``, scalars only)
"""

from __future__ import annotations

import os

import ray


@ray.remote(num_cpus=0)
class RunMonitor:
    """Holds records until the driver drains them, and what a failure message needs."""

    def __init__(self):
        self.records: list[dict] = []
        self.workers: dict[int, dict] = {}
        self.last_step: dict | None = None
        self.last_epoch: dict | None = None

    def push(self, record: dict) -> None:
        self.records.append(record)
        if record["kind"] == "step":
            self.last_step = record
        elif record["kind"] == "epoch":
            self.last_epoch = record

    def register(self, rank: int, location: dict) -> None:
        self.workers[rank] = location  # a restarted group's workers replace the old ones

    def drain(self) -> list[dict]:
        records, self.records = self.records, []
        return records

    def failure_context(self) -> dict:
        return {"workers": self.workers, "last_step": self.last_step, "last_epoch": self.last_epoch}


def start_monitor():
    """A monitor for one run, on the driver's node, as Ray Train places its controller: it needs
    no CPU, and elsewhere it would die with a reclaimed node, leaving the run unwatched."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return RunMonitor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def worker_location() -> dict:
    """Where this worker's output goes: its node, pid and Ray log files (``ray logs`` finds them too)."""
    context = ray.get_runtime_context()
    worker_id = context.get_worker_id()
    logs_dir = None
    try:  # Ray's session log folder of this node (no public API names it)
        logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
        files = sorted((name for name in os.listdir(logs_dir) if name.startswith(f"worker-{worker_id}") and
                        name.endswith((".out", ".err"))), key=lambda name: name.endswith(".err"))  # stdout first
    except Exception:  # noqa: BLE001 - a location is a courtesy: never fail a worker over it
        files = []
    return {"node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "logs_dir": logs_dir,
            "log_files": [os.path.join(logs_dir, name) for name in files] if logs_dir else []}


def describe_failure(context: dict | None, ranks: list[int] | None = None) -> list[str]:
    """Lines that tell a user where to look after a failed run: the failed workers' log files
    (every worker's when ``ranks`` is None) and the last metrics the run reported."""
    if not context:
        return []
    lines = []
    workers = context.get("workers") or {}
    for rank in sorted(workers if ranks is None else [r for r in ranks if r in workers]):
        where = workers[rank]
        files = " ".join(where["log_files"]) or f"{where['logs_dir']}/worker-*-{where['pid']}.out"
        lines.append(f"rank {rank} logs (node {where['node_ip']}, pid {where['pid']}): {files}  "
                     f"[or: ray logs worker --pid {where['pid']} --node-ip {where['node_ip']}]")
    last = context.get("last_epoch")
    if last:
        lines.append("last epoch metrics: " + short_metrics(last["metrics"]))
    step = context.get("last_step")
    if step and (not last or step["step"] > last["step"]):
        lines.append(f"last step metrics (step {step['step']}): " + short_metrics(step["metrics"]))
    return lines


# Shown first in a failure message, when the metrics have them.
HEADLINE_METRICS = ("epoch", "step", "train_loss", "train/loss", "lr", "train/lr", "val_rsum", "val_zero_shot_acc", "samples_per_s",
                    "train/samples_per_s")


def short_metrics(metrics: dict) -> str:
    names = [k for k in HEADLINE_METRICS if k in metrics] or list(metrics)[:8]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in names if isinstance(metrics[k], (int, float)))
