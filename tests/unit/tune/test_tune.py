"""``jobs/tune.py``: a real search on a local Ray — trials that are distributed runs, ASHA early stops,
Ctrl-C and ``--resume`` without rerunning finished trials, outputs, and bad search spaces."""

import json

import pytest
import ray
from job_modules import load_job

from vcl_dist.config import load_config
from vcl_dist.tune import check_tune_config, trial_concurrency


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.space[loss.margin].type=gaussian", "tune.space[loss.margin].type: Input should be"),
        ("tune.space[loss.margin].low=2.0", "tune.space[loss.margin]: a 'uniform' distribution needs low < high"),
        ("tune.space[loss.margin].low=-1", "tune.space[loss.margin]: loss.margin: Input should be greater than 0"),
        ("tune.space[loss.nope]={type: uniform, low: 0.1, high: 1}", "tune.space[loss.nope]: loss.nope: no such setting"),
        ("tune.space[train.lr]={type: choice, values: []}", "a 'choice' distribution needs a non-empty 'values' list"),
        ("tune.metric=val_recall", "tune.metric: 'val_recall' is not reported"),
    ],
)
def test_a_bad_search_space_stops_before_any_trial(override, message, capsys):
    assert load_job("tune").main([override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()


def test_concurrency_follows_the_cluster(repo_root):
    cfg = load_config(repo_root / "jobs/configs/tune.yaml", ["train.num_workers=2"])
    check_tune_config(cfg)
    assert trial_concurrency(cfg, {"CPU": 4}) == 1  # 2 workers + room for data tasks
    assert trial_concurrency(cfg, {"CPU": 16}) == 7
    assert trial_concurrency(cfg, {"CPU": 16, "GPU": 8}) == 4  # one GPU per worker
    assert trial_concurrency(load_config(repo_root / "jobs/configs/tune.yaml", ["tune.max_concurrent_trials=3"]), {"CPU": 4}) == 3


def test_a_trial_run_again_finds_its_attempts_and_a_finished_run_reports_its_epochs(tmp_path):
    import pandas as pd
    import pyarrow.fs as pafs

    from vcl_dist.tune.results import last_attempt
    from vcl_dist.tune.search import finished_run_reports, trial_attempts

    for name in ("abc", "abc-10", "abc-2", "abcd", "abc-x", "xabc"):
        (tmp_path / name).mkdir()
    (tmp_path / "abc-3").write_text("a file, not a run")
    storage = pafs.LocalFileSystem()
    assert trial_attempts(storage, str(tmp_path), "abc") == [str(tmp_path / n) for n in ("abc", "abc-2", "abc-10")]
    assert trial_attempts(storage, str(tmp_path / "none"), "abc") == []

    run = tmp_path / "abc-10"
    (run / "metrics.jsonl").write_text('{"epoch": 1, "val_rsum": 0.5}\n{"epoch": 2, "val_rsum": 0.7}\n')
    (run / "result.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint_x")}))
    assert finished_run_reports(storage, str(run)) == [
        {"epoch": 1, "val_rsum": 0.5}, {"epoch": 2, "val_rsum": 0.7, "checkpoint_path": str(run / "checkpoint_x")}]

    # A trial's progress after a restart: only the last attempt's rows count.
    progress = pd.DataFrame({"training_iteration": [1, 2, 3, 1, 2], "val_rsum": [0.1, 0.9, 0.95, 0.2, 0.3]})
    assert last_attempt(progress)["val_rsum"].tolist() == [0.2, 0.3]
    assert last_attempt(progress.iloc[:3])["val_rsum"].tolist() == [0.1, 0.9, 0.95]


