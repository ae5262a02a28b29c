"""Training runs on data at scale: shards in an S3-compatible server (moto) with checkpoints and
results written there and a resume that finds them, and a run on WebDataset tars."""

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from job_modules import load_job
from s3_server import SECRET, s3_filesystem
from webdataset_tars import write_webdataset

from vcl_dist.config import load_config
from vcl_dist.train.checkpoint import load_checkpoint
from vcl_dist.train.runner import run_training


@pytest.mark.e2e  # a training run and two resumes against the S3 server; the suite keeps the bucket errors
def test_train_from_s3_shards_into_s3_storage(s3_endpoint, s3_local_ray, shapes, tiny_shapes_overrides, repo_root, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="vcl")
    fs = s3_filesystem(s3_endpoint)
    for split in ("train", "val"):
        pafs.copy_files(str(shapes / split), f"vcl/shapes/{split}", destination_filesystem=fs)
    pafs.copy_files(str(shapes / "classes.txt"), "vcl/shapes/val/classes.txt", destination_filesystem=fs)

    cfg = load_config(repo_root / "jobs/configs/default.yaml", [
        *tiny_shapes_overrides, "train.epochs=1", f"s3.endpoint_url={s3_endpoint}",
        "data.source=parquet", "data.train_path=s3://vcl/shapes/train", "data.val_path=s3://vcl/shapes/val",
        "run.storage_path=s3://vcl/runs", "run.name=from-s3",
    ])
    outcome = run_training(cfg)

    assert outcome.run_path == "s3://vcl/runs/from-s3"
    with fs.open_input_stream("vcl/runs/from-s3/result.json") as stream:
        result = json.loads(stream.read())
    assert result["final_metrics"]["epoch"] == 1 and result["final_metrics"]["bad_rows"] == 0
    assert "val_zero_shot_acc" in result["final_metrics"]  # classes.txt was read from S3
    assert outcome.checkpoint_path.startswith("s3://vcl/runs/from-s3/checkpoint_")
    local = tmp_path / "checkpoint"
    pafs.copy_files(outcome.checkpoint_path.removeprefix("s3://"), str(local), source_filesystem=fs)
    from transformers import AutoTokenizer

    from vcl_dist.models import build_dual_encoder

    tokenizer = AutoTokenizer.from_pretrained(local / "tokenizer")
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length)
    assert load_checkpoint(local, model=model)["epoch"] == 0

    # What a worker killed while uploading a checkpoint leaves in the bucket: a newer folder,
    # half written, that Ray Train never registered. --resume must not take it (its name sorts last).
    with fs.open_output_stream("vcl/runs/from-s3/checkpoint_9999-12-31_23-59-59.999999/model.pt") as stream:
        stream.write((local / "model.pt").read_bytes()[:4096])

    # jobs/train.py --resume finds the run and its newest registered checkpoint in the bucket and goes on.
    assert load_job("train").main(["--resume", "run.storage_path=s3://vcl/runs", f"s3.endpoint_url={s3_endpoint}", "train.epochs=2"]) == 0
    with fs.open_input_stream("vcl/runs/from-s3/result.json") as stream:
        resumed = json.loads(stream.read())
    steps = result["final_metrics"]["step"]
    assert resumed["final_metrics"]["epoch"] == 2 and resumed["final_metrics"]["resumed_from_step"] == steps
    with fs.open_input_stream("vcl/runs/from-s3/metrics.jsonl") as stream:
        assert [json.loads(line)["epoch"] for line in stream.read().decode().splitlines()] == [1, 2]
    assert resumed["final_metrics"]["step"] == 2 * steps and resumed["checkpoint"] != result["checkpoint"]
    # No credential reaches the run's outputs.
    for info in fs.get_file_info(pafs.FileSelector("vcl/runs/from-s3", recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                assert SECRET.encode() not in stream.read(), info.path


@pytest.mark.e2e  # a third full training run in this file; WebDataset reading is in the suite (rows equal to Parquet's, seeded plans)
def test_webdataset_source_trains(s3_local_ray, shapes, tiny_shapes_overrides, repo_root, tmp_path):
    for split in ("train", "val"):
        write_webdataset(pq.read_table(sorted((shapes / split).glob("*.parquet"))).to_pydict(), tmp_path / split)
    (tmp_path / "val" / "classes.txt").write_text((shapes / "classes.txt").read_text())
    cfg = load_config(repo_root / "jobs/configs/default.yaml", [
        *tiny_shapes_overrides, "train.epochs=3", "data.source=webdataset", f"data.train_path={tmp_path / 'train'}",
        f"data.val_path={tmp_path / 'val'}", f"run.storage_path={tmp_path / 'runs'}", "run.name=wds",
    ])
    outcome = run_training(cfg)
    assert [m["step"] for m in outcome.history] == [8, 16, 24]  # 512 rows counted from the tars
    # Three epochs: over two, the tiny model's loss moves less than its step-to-step noise.
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    assert outcome.history[-1]["val_num_images"] == 64


@pytest.mark.e2e  # a filter job killed with SIGKILL in its own process, resumed, against the S3 server
def test_a_filter_from_and_into_s3_killed_mid_scoring_resumes_to_the_uninterrupted_result(s3_endpoint, s3_local_ray, shapes,
                                                                                          repo_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import boto3
    from pretrained_models import save_tiny_clip

    from vcl_dist.curation.filter_run import Criteria, run_filter
    from vcl_dist.curation.scorer_model import pretrained_scorer

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="curate")
    fs = s3_filesystem(s3_endpoint)
    rows = pq.read_table(sorted((shapes / "train").glob("*.parquet"))).to_pydict()
    write_webdataset(rows, tmp_path / "tars", per_tar=32)  # 16 tars
    pafs.copy_files(str(tmp_path / "tars"), "curate/tars", destination_filesystem=fs)
    clip = save_tiny_clip(tmp_path / "clip")
    command = [sys.executable, str(repo_root / "jobs/filter.py"), "--data", "s3://curate/tars", "--out", "s3://curate/kept",
               "--init", str(clip), "--keep-fraction", "0.5", "--actors", "1", "--batch-size", "8",
               f"s3.endpoint_url={s3_endpoint}"]
    env = {**os.environ, "RAY_ADDRESS": "local"}

    def scored() -> int:
        found = fs.get_file_info(pafs.FileSelector("curate/kept/_filter/scores", allow_not_found=True))
        return sum(1 for info in found if info.path.endswith(".parquet"))

    job = subprocess.Popen(command, env=env, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    deadline = time.time() + 240
    while scored() < 2 and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its local Ray, mid-scoring
    job.wait()
    done_before = scored()
    assert 2 <= done_before < 16, job.stdout.read().decode()[-2000:]

    resumed = subprocess.run(command, env=env, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({done_before} scored before)" in resumed.stdout

    reference = run_filter(str(tmp_path / "tars"), str(tmp_path / "whole"), pretrained_scorer(str(clip)),
                           Criteria(keep_fraction=0.5), actors=1)

    def keys(table_paths, filesystem) -> set[str]:
        return {k for path in table_paths for k in pq.read_table(path, filesystem=filesystem).column("key").to_pylist()}

    kept = [i.path for i in fs.get_file_info(pafs.FileSelector("curate/kept", recursive=True))
            if i.path.endswith(".parquet") and "/_filter/" not in i.path]
    whole = [str(p) for p in (tmp_path / "whole").glob("*.parquet")]
    assert keys(kept, fs) == keys(whole, pafs.LocalFileSystem()) and len(keys(kept, fs)) == reference.kept
    with fs.open_input_stream("curate/kept/_filter.json") as stream:
        assert json.loads(stream.read())["kept"] == reference.kept
