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


def assert_step_time_breakdown(run: Path) -> None:
    """Every epoch says where its step time went (phases that add up to the step), and
    result.json keeps the last epoch's."""
    from vcl_dist.runtime.step_phases import PHASES

    result = json.loads((run / "result.json").read_text())
    breakdown = result["throughput"]["step_time_breakdown"]
    assert list(breakdown) == list(PHASES) and sum(breakdown.values()) == pytest.approx(1.0)
    assert breakdown["forward"] > 0 and breakdown["backward"] > 0 and breakdown["gather"] > 0
    final = result["final_metrics"]
    assert 0 < final["step_time_s"] * (final["step"] / final["epoch"]) <= final["epoch_time_s"]
    assert final["peak_rss_gib"] > 0.1 and final["peak_gpu_allocated_gib"] == 0


def assert_same_weights(model: Path, other: Path, atol: float = 1e-6, zero_gradient: tuple[str, ...] = ()) -> None:
    """The two exported models hold the same tensors within ``atol``. ``zero_gradient``: name
    endings of tensors whose gradient is zero in exact arithmetic (attention's key biases), left
    out: AdamW turns the rounding noise that stands for it into lr-sized steps."""
    from safetensors.torch import load_file

    ours, theirs = load_file(model / "model.safetensors"), load_file(other / "model.safetensors")
    assert ours.keys() == theirs.keys()
    differences = {k: (ours[k].double() - theirs[k].double()).abs().max().item() for k in ours if not k.endswith(zero_gradient)}
    assert max(differences.values()) <= atol, sorted(differences.items(), key=lambda item: -item[1])[:5]


def checked_reference_run(config: Path, overrides: list[str]):
    """An uninterrupted training run that a test compares others with, checked on the way: its
    TensorBoard files hold ``metrics.jsonl`` (every 4th step's loss), the step metrics are
    there, and every epoch says where its step time went."""
    from vcl_dist.config import load_config
    from vcl_dist.train.runner import run_training

    outcome = run_training(load_config(config, overrides))
    events = assert_tensorboard_matches_metrics(Path(outcome.run_path), log_every_steps=4)
    assert {"train/lr", "train/samples_per_s", "train/data_wait_fraction", "train/margin_violation_fraction"} <= set(
        events.Tags()["scalars"])
    assert_step_time_breakdown(Path(outcome.run_path))
    return outcome
