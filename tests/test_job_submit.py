"""The cluster path, for real, as the README and the cluster configs do it: a token made with
`ray get-auth-token --generate` at Ray's default path, `ray start --head --dashboard-host=127.0.0.1`
with RAY_AUTH_MODE=token (and no --num-cpus: the machine's own CPUs), `ray job submit` of
jobs/train.py with and without the token, `ray stop`."""

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
pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started as ray-cluster.yaml starts it: RAY_AUTH_MODE=token, the token at
    ~/.ray/auth_token (a home of the test's own), dashboard and job server on 127.0.0.1."""
    ray.shutdown()  # no in-process Ray of another test may linger
    home = tmp_path_factory.mktemp("home")
    # Unix socket paths are length-limited: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="vclray-", dir="/tmp")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=base, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32
    env = base | {"RAY_AUTH_MODE": "token"}
    dashboard_port, gcs_port = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1",  # the README's flags
             "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, base, gcs_port
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(address: str, env: dict, repo_root: Path, *entrypoint: str, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={repo_root}",
                           f"--submission-id={job_id}", "--", *entrypoint], env=env, capture_output=True, text=True, timeout=900)


def test_job_submission_without_the_token_is_refused(token_head, repo_root, tmp_path):
    address, _, no_auth, _ = token_head
    stranger = no_auth | {"HOME": str(tmp_path)}  # no token anywhere, auth mode not set
    refused = submit(address, stranger, repo_root, "python", "-c", "print('ran')", job_id="stranger")
    assert refused.returncode != 0 and "ran" not in refused.stdout
    assert "401" in refused.stdout + refused.stderr or "nauthori" in refused.stdout + refused.stderr
    wrong = submit(address, stranger | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, repo_root,
                   "python", "-c", "print('ran')", job_id="wrong-token")
    assert wrong.returncode != 0 and "ran" not in wrong.stdout


def test_readme_job_submit_trains_or_stops_in_one_line(token_head, repo_root, tiny_shapes_overrides, tmp_path):
    """The README's command as written, on this machine's CPUs: 2 workers × 1 CPU + 1 CPU for
    data needs 3; a 2-core machine's head has 2, so the job must stop at once, saying so."""
    address, env, _, _ = token_head
    storage = tmp_path / "runs"
    job = submit(address, env, repo_root, "python", "jobs/train.py", *tiny_shapes_overrides, "train.epochs=1",
                 f"run.storage_path={storage}", "run.name=as-written", job_id="as-written")
    output = job.stdout + job.stderr
    assert "joined the Ray cluster" in output
    if (os.cpu_count() or 1) >= 3:
        assert job.returncode == 0 and (storage / "as-written" / "result.json").is_file(), output[-4000:]
        return
    assert job.returncode != 0 and not (storage / "as-written").exists()
    # The job's own log (`ray job submit` echoes it twice: streamed, then in its status message).
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", f"--address={address}", "as-written"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    errors = [line for line in logs.splitlines() if line.startswith("vcl-dist: error:")]
    assert len(errors) == 1, logs[-4000:]
    assert "cannot run this job and no autoscaler can add nodes" in errors[0]
    assert f"it has {os.cpu_count()} CPUs and the job needs 3 CPUs" in errors[0] and "train.cpus_per_worker=0.5" in errors[0]
    assert "Traceback" not in logs and "Traceback" not in output


def test_submitted_job_trains_and_writes_result(token_head, repo_root, tiny_shapes_overrides, tmp_path):
    """The fix the one-line error suggests: half a CPU per worker leaves one for the data tasks."""
    address, env, _, _ = token_head
    storage = tmp_path / "runs"
    job = submit(address, env, repo_root, "python", "jobs/train.py", *tiny_shapes_overrides, "train.epochs=1",
                 "train.cpus_per_worker=0.5", f"run.storage_path={storage}", "run.name=submitted", job_id="vcl-test-job")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()

    status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={address}", "vcl-test-job"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    result = json.loads((storage / "submitted" / "result.json").read_text())
    assert result["final_metrics"]["epoch"] == 1
    assert result["num_workers"] == 2


def test_a_job_joins_the_running_head_unless_told_to_start_a_local_ray(token_head, repo_root):
    _, env, _, gcs_port = token_head
    probe = [sys.executable, "-c", "from vcl_dist.ray_cluster import connect_ray; print(connect_ray(2))"]
    joined = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert joined.returncode == 0 and joined.stdout.strip().endswith(f":{gcs_port}"), joined.stdout + joined.stderr[-2000:]
    assert "joined the Ray cluster at" in joined.stdout
    local = subprocess.run(probe, env=env | {"RAY_ADDRESS": "local"}, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert local.returncode == 0 and local.stdout.strip().endswith("started a local Ray"), local.stderr[-2000:]
