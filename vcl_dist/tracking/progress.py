"""Progress inside an epoch on the driver's console: steps done / total, loss, samples/s, ETA.

In an interactive terminal, a live bar per epoch (rich); in a log (``ray job logs``, a file, a
pipe), a plain line at the epoch's first step and then at most every ``every_s`` seconds — so an
epoch of T seconds writes at most 1 + T / every_s lines, and never one per worker: only rank 0's numbers reach the driver (`.monitor`).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def progress_line(record: dict, epochs: int) -> str:
    done, total = record["epoch_step"], record["epoch_steps"]
    rate = record["samples_per_s"]
    eta = _eta(record)
    return (f"vcl-dist: epoch {record['epoch'] + 1}/{epochs} step {done}/{total} ({100 * done / max(total, 1):.0f}%) "
            f"loss {_loss(record)} {rate:.0f} samples/s ETA {eta}")


def _loss(record: dict) -> str:
    # None before the first reading of a GPU run's step verdicts (vcl_dist.runtime.step_verdict).
    return "…" if record["loss"] is None else f"{record['loss']:.4f}"


# What the line at an epoch's end shows, when the epoch has it (all of them go to the trackers
# and metrics.jsonl).
EPOCH_LINE_METRICS = ("train_loss", "val_rsum", "val_t2i_r1", "val_i2t_r1", "val_zero_shot_acc", "samples_per_s",
                      "data_wait_fraction", "peak_memory_gib")


def epoch_line(record: dict, epochs: int) -> str:
    """One line at an epoch's end: its headline metrics and where its step time went."""
    metrics = record["metrics"]
    shown = " ".join(f"{name}={metrics[name]:.4g}" for name in EPOCH_LINE_METRICS if name in metrics)
    phases = sorted(((k.removeprefix("step_").removesuffix("_fraction"), v) for k, v in metrics.items()
                     if k.startswith("step_") and k.endswith("_fraction")), key=lambda kv: -kv[1])
    breakdown = ", ".join(f"{name} {100 * share:.0f}%" for name, share in phases if share >= 0.005)
    step_time = f"; step {metrics['step_time_s']:.3g} s: {breakdown}" if metrics.get("step_time_s") else ""
    return (f"vcl-dist: epoch {int(metrics['epoch'])}/{epochs} done in {metrics.get('epoch_time_s', 0):.1f} s: "
            f"{shown}{step_time}")


def _eta(record: dict) -> str:
    trained = record["epoch_step"] - record.get("done", 0)
    if trained <= 1:  # the first step carries the reads' start-up: no rate to go by yet
        return "?"
    left = (record["epoch_steps"] - record["epoch_step"]) * record["elapsed_s"] / trained
    return time.strftime("%H:%M:%S", time.gmtime(max(left, 0)))


class ProgressView:
    """Shows ``epoch_start`` / ``progress`` records (see `.monitor`) as they arrive."""

    def __init__(self, every_s: float, stream: TextIO | None = None, interactive: bool | None = None):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s = every_s
        self.epochs = 0
        self.done = 0
        self.last_line = float("-inf")
        self._bar = None
        self._task = None

    def show(self, record: dict) -> None:
        if record["kind"] == "epoch_start":
            self.epochs, self.done = record["epochs"], record["done"]
            self.last_line = float("-inf")  # every epoch shows its first step at once
            if self.interactive:
                self._new_bar(record)
        elif record["kind"] == "epoch":
            line = epoch_line(record, self.epochs)
            if self._bar is not None:
                self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
            else:
                print(line, file=self.stream, flush=True)
        elif record["kind"] == "progress":
            record = {**record, "done": self.done}
            if self.interactive:
                self._update_bar(record)
            elif time.monotonic() - self.last_line >= self.every_s:
                print(progress_line(record, self.epochs), file=self.stream, flush=True)
                self.last_line = time.monotonic()

    def _new_bar(self, record: dict) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), redirect_stdout=True, redirect_stderr=True)
            self._bar.start()
        self._task = self._bar.add_task(f"epoch {record['epoch'] + 1}/{record['epochs']}", total=record["epoch_steps"],
                                        completed=record["done"], stats="")

    def _update_bar(self, record: dict) -> None:
        if self._bar is None or self._task is None:
            return
        self._bar.update(self._task, completed=record["epoch_step"],
                         stats=f"loss {_loss(record)} {record['samples_per_s']:.0f} samples/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
