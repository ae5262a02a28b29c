"""The cluster path, for real: `ray start --head` on loopback, `ray job submit` of jobs/train.py,
wait for SUCCEEDED, read result.json, `ray stop`."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head with its dashboard and job server on 127.0.0.1; stopped afterwards."""
    ray.shutdown()  # no in-process Ray of another test may linger
    gcs_port, dashboard_port = free_port(), free_port()
    # Unix socket paths are length-limited: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="vclray-", dir="/tmp")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token")
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=4",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submitted_job_trains_and_writes_result(ray_head, repo_root, tiny_shapes_overrides, tmp_path):
    address, env = ray_head
    storage = tmp_path / "runs"
    submit = [
        str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={repo_root}",
        "--submission-id=vcl-test-job", "--", "python", "jobs/train.py",
        *tiny_shapes_overrides, "train.epochs=1", f"run.storage_path={storage}", "run.name=submitted",
    ]
    proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    assert "joined the Ray cluster" in proc.stdout

    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", f"--address={address}", "vcl-test-job"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()

    result = json.loads((storage / "submitted" / "result.json").read_text())
    assert result["final_metrics"]["epoch"] == 1
    assert result["num_workers"] == 2
