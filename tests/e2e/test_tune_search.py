"""A Tune search of 4 trials, interrupted with Ctrl-C and resumed: ASHA stops trials early,
finished trials are not rerun, resources come back, the best config trains."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from job_modules import load_job

from vcl_dist.config import load_config


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray that the tune.py processes join (RAY_ADDRESS): it outlives an interrupted search,
    so the test can see whether the search's resources come back.

    With its dashboard: Ray Train's PlacementGroupCleaner asks the state API whether a trial's
    controller is still alive, and without it the placement group of a trial that ASHA stopped
    is never removed, so the next trial waits for CPUs forever (the hold-up in RAY-NOTES).
    """
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def _cpus_free() -> bool:
    return ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.mark.e2e
def test_search_stops_trials_early_survives_ctrl_c_and_resumes(ray_address, tiny_shapes_overrides, repo_root, tmp_path,
                                                                monkeypatch):
    # Started as a user would, from a folder of their own with the default relative storage
    # path: every path the search reports must land there, not in a trial's working directory.
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, str(repo_root / "jobs/tune.py"), *tiny_shapes_overrides, "train.epochs=3",
               "tune.num_samples=4", "tune.reduction_factor=2", "run.storage_path=runs", "tune.name=search",
               "run.trackers=[tensorboard,mlflow]"]
    env = os.environ | {"RAY_ADDRESS": ray_address}
    experiment = work / "runs" / "search"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        # A trial is finished once its training run has written result.json.
        _wait_for(lambda: list(experiment.glob("train_runs/*/result.json")), 400, "a first finished trial")
        first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in experiment.glob("train_runs/*/result.json")}
    first_log = (tmp_path / "first.log").read_text()
    assert "--resume" in first_log
    # No progress bars redrawn as lines (Ray Data's, from the trials' workers and drivers).
    assert not [line for line in first_log.splitlines() if "%|" in line or "Running Dataset" in line]
    _wait_for(_cpus_free, 60, "the interrupted search's CPUs to come back")

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900, cwd=work)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "best trials by final val_rsum" in resumed.stdout

    rows = list(csv.DictReader((experiment / "trials.csv").open()))
    assert len(rows) == 4
    assert {r["stop_reason"] for r in rows} <= {"completed", "stopped early (asha)"}, rows
    stopped = [r for r in rows if r["stop_reason"] == "stopped early (asha)"]
    # With a concurrency of 1 on this cluster, every trial after an early stop had to get the
    # stopped trial's CPUs back (the Train V2 + ASHA hold-up of RAY-NOTES would hang here).
    assert stopped and all(int(r["epochs"]) < 3 for r in stopped)
    for row in rows:
        assert 0.05 <= float(row["loss.margin"]) <= 1.0 and 1e-4 <= float(row["loss.reg_lambda"]) <= 0.1
    for trial, mtime in finished.items():  # trials finished before Ctrl-C were not run again
        assert (experiment / "train_runs" / trial / "result.json").stat().st_mtime_ns == mtime
    # The trial that Ctrl-C interrupted started over in a fresh run folder, from epoch 1: each
    # trial's epochs in trials.csv are the epochs its last run trained, one Tune iteration each.
    for retry in experiment.glob("train_runs/*-2"):
        assert not (retry.parent / retry.name.removesuffix("-2") / "result.json").exists()
    for row in (r for r in rows if r["stop_reason"] == "completed"):
        run = Path(row["checkpoint"]).parent
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, int(row["epochs"]) + 1)), (row, epochs)
    assert rows[0]["final_val_rsum"] == max(rows, key=lambda r: float(r["final_val_rsum"]))["final_val_rsum"]

    # Every trial is a tracked run of its own in the MLflow experiment named after the search,
    # with the sampled values among its parameters (the default store: sqlite beside the runs).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{experiment / 'train_runs' / 'mlflow' / 'mlflow.db'}")
    tracked = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("search").experiment_id])}
    for row in rows:
        run = tracked[Path(row["checkpoint"]).parent.name]
        assert float(run.data.params["loss.margin"]) == pytest.approx(float(row["loss.margin"]))
        assert {"loss.margin", "loss.reg_lambda"} <= set(run.data.tags["vcl_dist.searched"].split(","))
        assert run.data.tags["vcl_dist.tune_experiment"] == "search"
        if row["stop_reason"] == "completed":  # a stopped trial's driver is killed: it may not have drained its last epoch
            assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "val_rsum")) == 3

    summary = json.loads((experiment / "tune_result.json").read_text())
    assert summary["best_trial"] == rows[0]["trial_id"] and summary["stopped_early"] == len(stopped)
    for key in ("experiment", "best_checkpoint", "best_model", "best_config"):  # every reported path is there
        assert Path(summary[key]).exists() and Path(summary[key]).is_relative_to(work), (key, summary[key])
    assert (Path(summary["best_model"]) / "model.safetensors").is_file()
    for row in rows:
        assert Path(row["checkpoint"]).is_dir() and Path(row["checkpoint"]).is_relative_to(experiment), row
    assert (experiment / "metric_vs_params.png").stat().st_size > 5000
    _wait_for(_cpus_free, 60, "the search's CPUs to come back")
    from ray.util.state import list_placement_groups

    assert all(pg.state == "REMOVED" for pg in list_placement_groups())

    # The best trial's config is a ready-to-run training config.
    best = load_config(experiment / "best_config.yaml")
    assert best.loss.margin == pytest.approx(float(rows[0]["loss.margin"]))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    assert load_job("train").main(["--config", str(experiment / "best_config.yaml"), "train.epochs=1",
                                   "run.storage_path=best-runs", "run.name=best"]) == 0
    result = json.loads((fresh / "best-runs" / "best" / "result.json").read_text())
    assert result["config"]["loss"]["margin"] == best.loss.margin
    for key in ("run_path", "checkpoint", "model"):
        assert Path(result[key]).is_dir() and Path(result[key]).is_relative_to(fresh), (key, result[key])
