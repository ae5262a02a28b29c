"""What a tracked run's files must agree with: ``metrics.jsonl`` (epoch scalars at the epoch's
last step; ``train/loss`` every run.log_every_steps-th step = that step's entry of step_losses)."""

import json
from pathlib import Path

import pytest


def epoch_scalars(epoch: dict) -> dict[str, float]:
    return {k: v for k, v in epoch.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def logged_step_losses(epochs: list[dict], log_every_steps: int) -> dict[int, float]:
    """``{global step: loss}`` of the steps whose metrics a tracker gets, from metrics.jsonl."""
    expected, first = {}, 0
    for epoch in epochs:
        for index, loss in enumerate(epoch["step_losses"], start=1):
            if index % log_every_steps == 0:
                expected[first + index] = loss
        first = epoch["step"]
    return expected


def read_epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_tensorboard_matches_metrics(run: Path, log_every_steps: int):
    """The default tracker: TensorBoard event files in the run folder, read with TensorBoard's own
    reader, hold every epoch's scalars of metrics.jsonl at the epoch's last step, and the loss of
    every run.log_every_steps-th step (the mean over workers that step_losses keeps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    epochs = read_epochs(run)
    for epoch in epochs:
        for key, value in epoch_scalars(epoch).items():
            logged = [e.value for e in events.Scalars(key) if e.step == epoch["step"]]
            assert logged == [pytest.approx(value, rel=1e-6, abs=1e-6)], (key, epoch["epoch"], logged, value)
    expected = logged_step_losses(epochs, log_every_steps)
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(expected, rel=1e-6), (logged, expected)
    return events
