"""What a worker tells the driver: rank 0's log lines, progress inside an epoch (at most twice a
second), every ``run.log_every_steps`` steps' metrics and each epoch's, sent to the driver's
monitor actor without ever waiting on it (`vcl_dist.tracking.monitor`)."""

from __future__ import annotations

import time

from ..runtime.console import say
from ..tracking.monitor import worker_location
from .metrics import EpochProgress

# Rank 0 sends its progress to the driver at most this often.
PROGRESS_INTERVAL_S = 0.5


class DriverLink:
    def __init__(self, monitor, rank: int, epochs: int):
        self.monitor, self.rank, self.epochs = monitor, rank, epochs
        self.last_progress = float("-inf")

    def register(self) -> None:
        """Every worker says where its logs are (the driver names them when a worker fails)."""
        if self.monitor is not None:
            self.monitor.register.remote(self.rank, worker_location())

    def log(self, line: str) -> None:
        if self.rank == 0:
            say(line)

    def push(self, record: dict) -> None:
        """Rank 0: a record for the driver (fire and forget: never waits on the driver)."""
        if self.rank == 0 and self.monitor is not None:
            self.monitor.push.remote(record)

    def epoch_started(self, progress: EpochProgress, epoch_steps: int) -> None:
        self.push({"kind": "epoch_start", "epoch": progress.epoch, "epochs": self.epochs,
                   "epoch_steps": epoch_steps, "done": progress.steps})

    def show_progress(self, progress: EpochProgress, epoch_steps: int) -> None:
        """Rank 0, at most twice a second: where the epoch is (the driver decides what to print)."""
        if self.rank == 0 and self.monitor is not None:
            now = time.monotonic()
            if now - self.last_progress >= PROGRESS_INTERVAL_S or progress.steps == epoch_steps:
                self.last_progress = now
                self.push(progress.progress_record(epoch_steps))

    def step_metrics(self, step: int, metrics: dict) -> None:
        self.push({"kind": "step", "step": step, "metrics": metrics})

    def epoch_metrics(self, step: int, metrics: dict) -> None:
        self.push({"kind": "epoch", "step": step,
                   "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})
