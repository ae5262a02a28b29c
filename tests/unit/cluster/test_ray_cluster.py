"""Which cluster a job joins, and whether that cluster can run it (ray_cluster)."""

import json
import os

import pytest

from vcl_dist import ray_cluster
from vcl_dist.ray_cluster import JobNeeds, ResourceWaitReporter, connect_ray, shortfall, workers_that_fit


def test_the_readme_job_does_not_fit_a_two_core_head():
    needs = JobNeeds(workers=2, cpus_per_worker=1, gpus_per_worker=0)
    assert needs.cpus == 3
    problem = shortfall([{"CPU": 2.0}], needs)
    assert problem == ("it has 2 CPUs and the job needs 3 CPUs: 2 training workers × 1 CPU (train.cpus_per_worker) "
                       "plus 1 for the data preprocessing tasks")
    assert shortfall([{"CPU": 2.0}], JobNeeds(2, 0.5, 0)) is None  # the fix the message suggests
    assert shortfall([{"CPU": 4.0}], needs) is None


def test_workers_must_fit_on_single_nodes():
    needs = JobNeeds(workers=2, cpus_per_worker=4, gpus_per_worker=1)
    assert workers_that_fit([{"CPU": 0}, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}], needs) == 2
    assert workers_that_fit([{"CPU": 8, "GPU": 1}, {"CPU": 2, "GPU": 1}], needs) == 1  # a GPU node short of CPUs
    problem = shortfall([{"CPU": 8, "GPU": 1}, {"CPU": 2, "GPU": 1}], needs)
    assert problem is not None and "10 CPUs and 2 GPUs" in problem and "2 GPUs:" in problem


def test_an_autoscaling_cluster_is_waited_for_with_a_line_per_interval(monkeypatch, capsys):
    nodes = [[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 4.0}]]
    monkeypatch.setattr(ray_cluster, "alive_node_resources", lambda: nodes.pop(0))
    reporter = ResourceWaitReporter(JobNeeds(2, 1, 0), interval_s=0.05)
    reporter.start()
    reporter.join(timeout=5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("vcl-dist: ") for line in lines)
    assert lines[0].startswith("vcl-dist: still waiting for the autoscaler") and "it has 2 CPUs" in lines[0]
    assert lines[-1].startswith("vcl-dist: the cluster can now hold the job")


def _fake_status(monkeypatch, statuses: list):
    """The GCS key the head's monitor writes, read back as ``statuses`` gives, one per read."""
    import ray.autoscaler.v2.utils
    import ray.experimental.internal_kv

    monkeypatch.setattr(ray.autoscaler.v2.utils, "is_autoscaler_v2", lambda fetch_from_server=False: False)
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get",
                        lambda key: statuses.pop(0) if len(statuses) > 1 else statuses[0])
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda s: None)


def test_a_head_whose_autoscaler_has_not_reported_yet_is_waited_for(monkeypatch):
    """A monitor writes its status before the autoscaler's first update (autoscaler_report null);
    a job submitted then must not take the cluster for a fixed one."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "ff00"}])
    launching = json.dumps({"autoscaler_report": {"node_type_mapping": {"ff00": "head"}, "pending_launches": {}}})
    _fake_status(monkeypatch, [None, json.dumps({"load_metrics_report": {}, "autoscaler_report": None}).encode(),
                               launching.encode()])
    assert ray_cluster.autoscaler_can_add_nodes(first_report_wait_s=60)
    # A fixed cluster's monitor (the read-only provider: a node type per node) says so at once.
    _fake_status(monkeypatch, [json.dumps({"autoscaler_report": {"node_type_mapping": {"ff00": "node_ff00"}}}).encode()])
    assert not ray_cluster.autoscaler_can_add_nodes(first_report_wait_s=60)
    # No report within the wait: taken as fixed (the job then stops with its one-line error).
    _fake_status(monkeypatch, [None])
    assert not ray_cluster.autoscaler_can_add_nodes(first_report_wait_s=0.05)


def test_a_dashboard_address_is_no_driver_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="is a dashboard address, for `ray job submit`") as err:
        connect_ray(2)
    assert "\n" not in str(err.value)


def test_custom_resources_per_worker_must_fit_on_the_workers_nodes():
    """``train.resources_per_worker``: a worker holds them on its own node, like its CPUs."""
    needs = JobNeeds(workers=2, cpus_per_worker=1, gpus_per_worker=0, custom_per_worker=(("train_gpu", 1.0),))
    assert workers_that_fit([{"CPU": 8}, {"CPU": 4, "train_gpu": 1}], needs) == 1  # CPUs alone hold no worker
    problem = shortfall([{"CPU": 8}, {"CPU": 4, "train_gpu": 1}], needs)
    assert problem == ("it has 12 CPUs and 1 train_gpu and the job needs 3 CPUs: 2 training workers × 1 CPU "
                       "(train.cpus_per_worker) + 1 train_gpu plus 1 for the data preprocessing tasks")
    assert shortfall([{"CPU": 0}, {"CPU": 4, "train_gpu": 1}, {"CPU": 4, "train_gpu": 1}], needs) is None


@pytest.mark.parametrize("resources, message", [({"GPU": 1}, "GPU has its own key"),
                                                ({"train_gpu": 0}, "positive finite amount"),
                                                ({"train_gpu": float("nan")}, "positive finite amount")])
def test_bad_custom_resources_are_refused_in_one_line(resources, message):
    from vcl_dist.config import Config

    with pytest.raises(ValueError, match=message):
        Config.model_validate({"train": {"resources_per_worker": resources}})


def test_a_local_ray_started_for_a_job_admits_no_one_without_its_token(tmp_path, monkeypatch):
    """Ray 2.60 binds a local Ray to the machine's network address (it resolves 127.0.0.1 to
    it); what keeps strangers out is the token. A driver with another token is refused."""
    import subprocess
    import sys

    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr("vcl_dist.ray_cluster.started_cluster_address", lambda: None)
    assert connect_ray(1).startswith("started a local Ray")
    try:
        gcs = ray.get_runtime_context().gcs_address
        stranger = tmp_path / "home"
        (stranger / ".ray").mkdir(parents=True)
        (stranger / ".ray" / "auth_token").write_text("0" * 32)
        joined = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{gcs}'); print('JOINED')"],
            env={**os.environ, "HOME": str(stranger), "RAY_AUTH_MODE": "token"},
            capture_output=True, text=True, timeout=120)
        assert "JOINED" not in joined.stdout and joined.returncode != 0, joined.stdout[-500:]
        assert "ConnectionError" in joined.stderr or "uthentication" in joined.stderr, joined.stderr[-800:]
    finally:
        ray.shutdown()


def test_a_running_head_that_refuses_the_job_is_named_not_called_gone(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "started_cluster_address", lambda: "10.0.0.7:6379")
    monkeypatch.setattr(ray_cluster, "unrecorded_clusters", lambda: {"10.0.0.7:6379"})
    monkeypatch.setattr(ray_cluster, "use_local_token", lambda: None)

    def refused(**_):
        raise ConnectionError("InvalidAuthToken")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ValueError, match=r"^cannot join the Ray cluster that `ray start` started at 10\.0\.0\.7:6379: "
                                         r"it runs but refused this process"):
        connect_ray(1)
