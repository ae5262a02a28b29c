"""The cluster path, for real, as the cluster guide (docs/guides/vm-cluster.md) and the cluster configs do it: a token made with
`ray get-auth-token --generate` at Ray's default path, `ray start --head --dashboard-host=127.0.0.1`
with RAY_AUTH_MODE=token (and no --num-cpus: the machine's own CPUs), `ray job submit` of
jobs/train.py with and without the token, `ray stop`."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from ports import free_port

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head started as ray-cluster.yaml starts it: RAY_AUTH_MODE=token, the token at
    ~/.ray/auth_token (a home of the test's own), dashboard and job server on 127.0.0.1."""
    ray.shutdown()  # no in-process Ray of another test may linger
    home = tmp_path_factory.mktemp("home")
    # Unix socket paths are length-limited: keep the temp dir short. Named `ray` under a root of
    # its own, as Ray's default `$RAY_TMPDIR/ray` is, so a driver given RAY_TMPDIR=root finds the
    # head's address record where it would find a plain `ray start --head`'s.
    temp_root = tempfile.mkdtemp(prefix="vclray-", dir="/tmp")
    temp_dir = os.path.join(temp_root, "ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=base, check=True, capture_output=True, timeout=60)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32
    env = base | {"RAY_AUTH_MODE": "token"}
    dashboard_port, gcs_port = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--dashboard-host=127.0.0.1",  # the cluster guide's flags
             "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, base, gcs_port, temp_root
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(address: str, env: dict, repo_root: Path, *entrypoint: str, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={repo_root}",
                           f"--submission-id={job_id}", "--", *entrypoint], env=env, capture_output=True, text=True, timeout=900)


def test_job_submission_without_the_token_is_refused(token_head, repo_root, tmp_path):
    address, _, no_auth, *_ = token_head
    stranger = no_auth | {"HOME": str(tmp_path)}  # no token anywhere, auth mode not set
    refused = submit(address, stranger, repo_root, "python", "-c", "print('ran')", job_id="stranger")
    assert refused.returncode != 0 and "ran" not in refused.stdout
    assert "401" in refused.stdout + refused.stderr or "nauthori" in refused.stdout + refused.stderr
    wrong = submit(address, stranger | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, repo_root,
                   "python", "-c", "print('ran')", job_id="wrong-token")
    assert wrong.returncode != 0 and "ran" not in wrong.stdout


def test_readme_job_submit_trains_or_stops_in_one_line(token_head, repo_root, tiny_shapes_overrides, tmp_path):
    """The cluster guide's command as written, on this machine's CPUs: 2 workers × 1 CPU + 1 CPU for
    data needs 3; a 2-core machine's head has 2, so the job must stop at once, saying so."""
    address, env, *_ = token_head
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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback (sqlite store, proxied artifacts), stopped with
    its worker processes at the end."""
    import signal
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                               "--artifacts-destination", str(folder / "artifacts")],
                              stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> str:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    return url
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)

    try:
        yield ready  # started now, waited for when needed: it boots while `ray start` runs
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_submitted_job_trains_tracks_and_shows_progress(mlflow_server, token_head, repo_root, tiny_shapes_overrides,
                                                          tmp_path):
    """The fix the one-line error suggests (half a CPU per worker leaves one for the data
    tasks), tracked by all three trackers: a real MLflow server, W&B offline (no key, no
    network), TensorBoard; each read back with its own reader equals metrics.jsonl. The job's
    log (no terminal) shows progress inside the epoch as a few plain lines, no progress bar per
    worker and no false warning."""
    from mlflow.tracking import MlflowClient
    from tracked_metrics import assert_tensorboard_matches_metrics, epoch_scalars, logged_step_losses, read_epochs
    from wandb_records import history

    address, env, *_ = token_head
    storage = tmp_path / "runs"
    mlflow_server = mlflow_server()
    # Credentials in the tracking URI (the server ignores them) must reach no record and no log line.
    secret = "e2e-pa55w0rd-71c3"
    job = submit(address, env, repo_root, "python", "jobs/train.py", *tiny_shapes_overrides, "train.epochs=2",
                 "train.cpus_per_worker=0.5", f"run.storage_path={storage}", "run.name=submitted",
                 "run.trackers=[tensorboard,mlflow,wandb]",
                 f"mlflow.tracking_uri={mlflow_server.replace('http://', f'http://vcl:{secret}@')}",
                 "mlflow.experiment=job-submit", job_id="vcl-test-job")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()

    status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={address}", "vcl-test-job"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    run = storage / "submitted"
    result = json.loads((run / "result.json").read_text())
    assert result["final_metrics"]["epoch"] == 2
    assert result["num_workers"] == 2

    logs = subprocess.run([str(BIN / "ray"), "job", "logs", f"--address={address}", "vcl-test-job"], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    lines = logs.splitlines()
    for epoch in (1, 2):  # progress inside each epoch: the first line at once, then one per 30 s at most
        progress = [line for line in lines if line.startswith(f"vcl-dist: epoch {epoch}/2 step ")]
        assert 1 <= len(progress) <= 2, logs[-4000:]
        assert sum(line.startswith(f"vcl-dist: epoch {epoch}/2 done in ") for line in lines) == 1, logs[-4000:]
    assert not [line for line in lines if "%|" in line or "Running Dataset" in line or "Reporting training result" in line]
    assert "does not have any available CPUs" not in logs and "Traceback" not in logs
    # Ray itself records and echoes a job's entrypoint as typed: the command line is the one
    # place the secret may show (the security guide says to give credentials through the environment).
    leaked_lines = [line for line in (logs + job.stdout + job.stderr).splitlines()
                    if secret in line and "jobs/train.py" not in line]
    assert not leaked_lines, leaked_lines
    leaked = [str(f) for f in storage.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert not leaked and "http://***@127.0.0.1" in (run / "config.yaml").read_text()
    assert "vcl-dist: MLflow run at http://***@127.0.0.1:" in logs  # MLflow's own link, masked

    epochs = read_epochs(run)
    assert_tensorboard_matches_metrics(run, log_every_steps=4)
    expected_losses = logged_step_losses(epochs, 4)

    client = MlflowClient(mlflow_server)
    [tracked] = client.search_runs([client.get_experiment_by_name("job-submit").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "submitted"
    assert tracked.data.params["train.cpus_per_worker"] == "0.5" and tracked.data.params["loss.name"] == "triplet"
    assert tracked.data.params["mlflow.tracking_uri"].startswith("http://***@127.0.0.1:")
    assert tracked.data.tags["vcl_dist.run_path"] == str(run) and tracked.data.tags["vcl_dist.storage_path"] == str(storage)
    run_id = tracked.info.run_id
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses == pytest.approx(expected_losses, rel=1e-9)
    for epoch in epochs:
        for key, value in epoch_scalars(epoch).items():
            assert [m.value for m in client.get_metric_history(run_id, key) if m.step == epoch["step"]] == [
                pytest.approx(value, rel=1e-9)], key
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")} | {a.path for a in client.list_artifacts(run_id, "run")}
    assert {"model/model.safetensors", "model/config.yaml", "run/result.json", "run/metrics.jsonl"} <= artifacts

    [log] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(log)
    assert {step: row["train/loss"] for step, row in rows if "train/loss" in row} == pytest.approx(expected_losses, rel=1e-9)
    assert [row["val_rsum"] for _, row in rows if "val_rsum" in row] == pytest.approx([e["val_rsum"] for e in epochs])


def test_two_jobs_that_do_not_fit_together_run_one_after_the_other(token_head, repo_root, tiny_shapes_overrides, tmp_path):
    """Two trainings sent 5 s apart to a head whose CPUs hold one at a time (workers and a CPU for
    data tasks): both finish, the second after waiting whole, saying what it waited for."""
    import time

    address, env, *_ = token_head
    cpus = os.cpu_count() or 2
    per_worker = f"{(cpus - 1) / 2:g}"  # 2 workers and 1 data CPU: every CPU of the head
    storage = tmp_path / "runs"
    for name in ("first", "second"):
        started = subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={repo_root}",
                                  f"--submission-id=share-{name}", "--no-wait", "--", "python", "jobs/train.py",
                                  *tiny_shapes_overrides, "train.epochs=1", f"train.cpus_per_worker={per_worker}",
                                  f"run.storage_path={storage}", f"run.name={name}"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-2000:]
        time.sleep(5)
    logs = {}
    for name in ("first", "second"):  # `ray job logs --follow` returns when the job ends
        logs[name] = subprocess.run([str(BIN / "ray"), "job", "logs", f"--address={address}", "--follow", f"share-{name}"],
                                    env=env, capture_output=True, text=True, timeout=600).stdout
        status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={address}", f"share-{name}"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower(), logs[name][-4000:]
        assert (storage / name / "result.json").is_file()
    assert "vcl-dist: waiting" not in logs["first"]
    waits = [line for line in logs["second"].splitlines() if line.startswith("vcl-dist: waiting")]
    assert waits, logs["second"][-4000:]
    assert f"this job needs {cpus:g} CPUs (2 training workers × {per_worker} CPU, 1 for its data tasks); held by job " in waits[0]
    assert "vcl-dist: the cluster has room for this job after" in logs["second"]
    # The second wrote nothing before the first had written its last file.
    first_done = (storage / "first" / "result.json").stat().st_mtime
    assert min(f.stat().st_mtime for f in (storage / "second").rglob("*") if f.is_file()) >= first_done


def test_a_job_joins_the_running_head_unless_told_to_start_a_local_ray(token_head, repo_root):
    _, env, base, gcs_port, temp_root = token_head
    probe = [sys.executable, "-c", "from vcl_dist.ray_cluster import connect_ray; print(connect_ray(2))"]
    address = f"127.0.0.1:{gcs_port}"
    joined = subprocess.run(probe, env=env | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120,
                            cwd=repo_root)
    assert joined.returncode == 0, joined.stdout + joined.stderr[-2000:]
    said = joined.stdout.strip()
    assert said.startswith("joined the Ray cluster at ") and said.endswith(f":{gcs_port} (RAY_ADDRESS)"), said
    # A user's own machine: `ray start --head`, then `python jobs/train.py` with neither
    # RAY_ADDRESS nor RAY_AUTH_MODE set. The head has token authentication on (the token is at
    # ~/.ray/auth_token, as any earlier local Ray leaves one); the job joins it with that token
    # rather than being refused and starting a Ray of its own.
    recorded = subprocess.run(probe, env=base | {"RAY_TMPDIR": temp_root}, capture_output=True, text=True,
                              timeout=120, cwd=repo_root)
    said = recorded.stdout.strip()
    assert recorded.returncode == 0 and said.endswith(f":{gcs_port} (the one `ray start` started)"), \
        said + recorded.stderr[-1500:]
    # This head keeps its address record in its own --temp-dir, as another driver's private
    # local Ray keeps none: a driver that is not told joins neither, and says why.
    alone = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120, cwd=repo_root)
    said = alone.stdout.strip()
    assert alone.returncode == 0 and said.startswith("started a local Ray"), alone.stdout + alone.stderr[-2000:]
    assert "(not joining the Ray running at" in said and f":{gcs_port}" in said and "set RAY_ADDRESS to join it" in said
    local = subprocess.run(probe, env=env | {"RAY_ADDRESS": "local"}, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert local.returncode == 0 and local.stdout.strip().startswith("started a local Ray"), local.stderr[-2000:]
