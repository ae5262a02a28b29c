"""Watching a run, in one process: the step-time breakdown against a clock of its own, the
console progress, the trackers' files read back with each tool's own reader, the failure lines.
(A 2-worker run logging to a real MLflow server, W&B offline and TensorBoard through `ray job
submit`: tests/e2e/test_job_submit.py; the default run's TensorBoard files: tests/unit/train/test_train_ray.py.)"""

import io
import itertools
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from tiny_step import setup
from wandb_records import history

from vcl_dist.config import ConfigError, load_config
from vcl_dist.runtime.step_phases import PHASES, PhaseClock, phase
from vcl_dist.tracking import RunIdentity, flat_params, open_trackers
from vcl_dist.tracking.monitor import describe_failure
from vcl_dist.tracking.progress import ProgressView, epoch_line
from vcl_dist.train.lockstep import lockstep
from vcl_dist.train.step import collate_rows, train_step


def test_phases_are_exclusive_and_add_up_to_the_step():
    clock = PhaseClock()
    clock.begin_step()
    with phase("loss"):
        time.sleep(0.02)
        with phase("gather"):  # inside the loss, charged to the gather only
            time.sleep(0.03)
        time.sleep(0.01)
    time.sleep(0.01)  # no phase: "other"
    clock.end_step()
    assert clock.seconds["gather"] == pytest.approx(0.03, abs=0.01)
    assert clock.seconds["loss"] == pytest.approx(0.03, abs=0.01)
    assert clock.seconds["other"] == pytest.approx(0.01, abs=0.01)
    assert sum(clock.seconds.values()) == pytest.approx(clock.step_seconds, rel=1e-9)
    assert clock.steps == 1

    # A step begun without a batch (the epoch's end) counts nothing; outside a step, phase() is free.
    clock.begin_step()
    clock.cancel_step()
    with phase("forward"):
        time.sleep(0.01)
    assert clock.steps == 1 and clock.seconds["forward"] == 0.0

    # every=3: one step in three is timed (and synchronised, on a GPU).
    sampled = PhaseClock(every=3)
    for _ in range(7):
        sampled.begin_step()
        with phase("forward"):
            pass
        sampled.end_step()
    assert sampled.steps == 3


def test_the_breakdown_of_real_steps_accounts_for_their_measured_time():
    """The issue's check: the phases of real training steps (lock-step fetch, both towers, the
    loss, backward, AdamW) sum to the step time measured by a clock of the test's own within 5%,
    and what no phase names ("other") stays under 5%."""
    model, criterion, optimizer, scheduler, batch = setup()
    # A data source that takes time (as a decoding pipeline does), so the data wait is real.
    numpy_batch = {name: t.numpy() for name, t in batch.items()} | {"valid": [True] * 6, "shard": ["s"] * 6}

    def slow_batches():
        for _ in range(8):
            time.sleep(0.01)
            yield collate_rows(numpy_batch)

    clock, waits, measured = PhaseClock(), [], 0.0
    started = time.perf_counter()
    for ready in lockstep(slow_batches(), waits, clock):
        ready.pop("bad_shards"), ready.pop("valid")
        train_step(model, criterion, optimizer, scheduler, ready, torch.device("cpu"), False, 1.0)
        clock.end_step()
        measured = time.perf_counter() - started
    assert clock.steps == 8
    named = sum(seconds for name, seconds in clock.seconds.items() if name != "other")
    assert named == pytest.approx(measured, rel=0.05), clock.seconds
    assert clock.seconds["other"] < 0.05 * clock.step_seconds
    assert clock.seconds["data_wait"] == pytest.approx(sum(waits), rel=0.05) and clock.seconds["data_wait"] >= 0.08
    assert all(clock.seconds[name] > 0 for name in ("h2d", "forward", "loss", "backward", "optimizer"))


def progress_records(epoch_steps: int):
    yield {"kind": "epoch_start", "epoch": 0, "epochs": 2, "epoch_steps": epoch_steps, "done": 0}
    for step in range(1, epoch_steps + 1):
        yield {"kind": "progress", "epoch": 0, "epoch_step": step, "epoch_steps": epoch_steps, "loss": 1.0 / step,
               "samples_per_s": 100.0, "elapsed_s": 0.1 * step}


def test_progress_in_a_log_is_a_bounded_number_of_plain_lines():
    out = io.StringIO()
    view = ProgressView(every_s=3600, stream=out, interactive=False)
    for record in progress_records(500):
        view.show(record)
    lines = out.getvalue().splitlines()
    # The first progress line at once, then none until every_s has passed: not a line per step.
    assert lines == ["vcl-dist: epoch 1/2 step 1/500 (0%) loss 1.0000 100 samples/s ETA ?"]

    out = io.StringIO()
    view = ProgressView(every_s=1e-9, stream=out, interactive=False)
    for record in progress_records(3):
        view.show(record)
    assert out.getvalue().splitlines()[-1] == "vcl-dist: epoch 1/2 step 3/3 (100%) loss 0.3333 100 samples/s ETA 00:00:00"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no bar redrawn in a log


def test_progress_in_a_terminal_is_a_live_bar_and_epochs_end_in_a_summary_line():
    out = io.StringIO()
    view = ProgressView(every_s=30, stream=out, interactive=True)
    for record in progress_records(4):
        view.show(record)
    view.show({"kind": "epoch", "step": 4, "metrics": {"epoch": 1, "train_loss": 0.25, "val_rsum": 2.5, "epoch_time_s": 3.0,
                                                        "step_time_s": 0.5, "step_forward_fraction": 0.6,
                                                        "step_backward_fraction": 0.4}})
    view.close()
    text = out.getvalue()
    assert "epoch 1/2" in text and "4/4" in text
    assert "vcl-dist: epoch 1/2 done in 3.0 s: train_loss=0.25 val_rsum=2.5; step 0.5 s: forward 60%, backward 40%" in text


def test_epoch_line_orders_phases_by_share():
    line = epoch_line({"metrics": {"epoch": 2, "epoch_time_s": 1.0, "train_loss": 0.1, "step_time_s": 0.2,
                                   **{f"step_{name}_fraction": 0.0 for name in PHASES},
                                   "step_data_wait_fraction": 0.7, "step_gather_fraction": 0.3}}, 5)
    assert line.endswith("step 0.2 s: data_wait 70%, gather 30%")


def test_a_failure_names_the_workers_logs_and_the_last_metrics():
    context = {"workers": {0: {"node_ip": "10.0.0.1", "pid": 11, "logs_dir": "/tmp/ray/logs",
                               "log_files": ["/tmp/ray/logs/worker-ab-01-11.out", "/tmp/ray/logs/worker-ab-01-11.err"]},
                           1: {"node_ip": "10.0.0.2", "pid": 22, "logs_dir": "/tmp/ray/logs", "log_files": []}},
               "last_epoch": {"step": 8, "metrics": {"epoch": 1, "train_loss": 0.5, "val_rsum": 1.25}},
               "last_step": {"step": 12, "metrics": {"train/loss": 0.4, "train/lr": 0.001}}}
    lines = describe_failure(context, ranks=[1])
    assert lines[0] == ("rank 1 logs (node 10.0.0.2, pid 22): /tmp/ray/logs/worker-*-22.out  "
                        "[or: ray logs worker --pid 22 --node-ip 10.0.0.2]")
    assert lines[1] == "last epoch metrics: epoch=1 train_loss=0.5 val_rsum=1.25"
    assert lines[2] == "last step metrics (step 12): train/loss=0.4 train/lr=0.001"
    assert describe_failure(context)[0].endswith("worker-ab-01-11.out /tmp/ray/logs/worker-ab-01-11.err  "
                                                 "[or: ray logs worker --pid 11 --node-ip 10.0.0.1]")


def test_log_every_steps_moved_to_run_and_old_configs_still_load():
    assert load_config(None, ["train.log_every_steps=7"]).run.log_every_steps == 7
    assert load_config(None, ["run.log_every_steps=9"]).run.log_every_steps == 9
    assert load_config(None).run.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ["run.trackers=[tensorboard,tensorboard]"])
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ["run.trackers=[neptune]"])


def epoch_records():
    steps = itertools.count(2, 2)
    return [(next(steps), {"train/loss": 1.0 / s, "train/lr": 1e-3 * s}) for s in range(1, 4)] + [
        (6, {"epoch": 1, "train_loss": 0.4, "val_rsum": 1.5})]


def test_each_tracker_writes_what_its_own_reader_reads_back(tmp_path, monkeypatch):
    """TensorBoard's event reader, MLflow's client on its default local store (sqlite in the
    storage folder), and W&B's offline transaction log: the same values at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.trackers=[tensorboard,mlflow,wandb]", "train.lr=0.003"])
    identity = RunIdentity("tracked", pafs.LocalFileSystem(), str(tmp_path), f"{tmp_path}/tracked")
    trackers = open_trackers(cfg, identity)
    for step, metrics in epoch_records():
        for tracker in trackers:
            tracker.log_metrics(metrics, step)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"weights")
    for tracker in trackers:
        tracker.log_artifacts(str(tmp_path / "export"), "model")
        tracker.finish(failed=False)

    events = EventAccumulator(str(tmp_path / "tracked" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 1.0), (4, 0.5), (6, pytest.approx(1 / 3))]
    assert [(e.step, e.value) for e in events.Scalars("val_rsum")] == [(6, 1.5)]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("vcl-dist").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["loss.name"] == "triplet"
    assert run.data.tags["vcl_dist.run_path"] == f"{tmp_path}/tracked"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (2, 1.0), (4, 0.5), (6, pytest.approx(1 / 3))]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.safetensors"]
    assert len(run.data.params) == len(flat_params(cfg))

    [log] = (tmp_path / "tracked" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(log)
    assert [(step, row["train/loss"]) for step, row in rows if "train/loss" in row] == [(2, 1.0), (4, 0.5), (6, 1 / 3)]
    assert [(step, row["val_rsum"]) for step, row in rows if "val_rsum" in row] == [(6, 1.5)]

    # --resume (or a restarted worker group) continues the same MLflow run; a changed value
    # (write-once params) is kept as a tag.
    resumed_cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.trackers=[mlflow]", "train.lr=0.001"])
    [again] = open_trackers(resumed_cfg, RunIdentity("tracked", pafs.LocalFileSystem(), str(tmp_path),
                                                     f"{tmp_path}/tracked", resumed=True))
    again.log_metrics({"train/loss": 0.25}, 8)
    again.finish(failed=True)
    [run] = client.search_runs([run.info.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["vcl_dist.resumed_with.train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6, 8]


def test_an_unreachable_tracking_server_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = load_config(None, [f"run.storage_path={tmp_path}", "run.trackers=[mlflow]",
                             "mlflow.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(ValueError) as err:
        open_trackers(cfg, RunIdentity("x", pafs.LocalFileSystem(), str(tmp_path), f"{tmp_path}/x"))
    message = str(err.value)
    assert message.startswith("mlflow.tracking_uri=http://127.0.0.1:9: cannot start an MLflow run:") and "\n" not in message
    assert not Path(tmp_path, "x").exists()
