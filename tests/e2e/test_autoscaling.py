"""The autoscaler at work under a vcl-dist job, on Ray's local autoscaling cluster with the node
types of ``ray-cluster.yaml`` (``tests/support/autoscaling_cluster.py``; GPUs stand in as a custom
resource the training workers ask for with ``train.resources_per_worker``)."""

import pytest
import ray
from autoscaling_cluster import LocalAutoscalingCluster, submit_training, wait_for
from ports import free_port

pytestmark = pytest.mark.e2e
# ray-cluster.yaml gives idle nodes 10 minutes; the suite cannot wait that long, so the test
# cluster shortens it (the only value not taken from the config).
IDLE_TIMEOUT_MINUTES = 0.25


@pytest.fixture(scope="module")
def autoscaling_cluster(repo_root):
    ray.shutdown()  # no in-process Ray of another test may linger
    cluster = LocalAutoscalingCluster(repo_root / "ray-cluster.yaml", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
                                      gcs_port=free_port(), dashboard_port=free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_submitted_run_scales_from_zero_and_its_nodes_are_given_back(autoscaling_cluster, repo_root,
                                                                         tiny_shapes_overrides, tmp_path):
    cluster = autoscaling_cluster
    wait_for(lambda: len(cluster.samples) >= 2, 60, "the node sampler")
    assert cluster.workers_at_last_sample() == 0  # min_workers 0 everywhere: no worker node yet

    storage = tmp_path / "runs"
    run = submit_training(cluster, repo_root, [*tiny_shapes_overrides, f"run.storage_path={storage}", "run.name=from-zero"],
                          job_id="from-zero")
    submitted, first_step, finished = run.submitted, run.first_step, run.finished
    assert run.returncode == 0, run.output[-4000:]
    assert (storage / "from-zero" / "result.json").is_file() and first_step is not None
    assert "vcl-dist: waiting for the autoscaler" in run.output  # the driver saw an empty cluster and waited, not refused

    during = [s for s in cluster.samples if submitted <= s.at <= finished]
    peak_train_nodes = max(s.workers.get("gpu_worker_spot", 0) for s in during)
    # One per training worker at least; more may come for the data tasks' CPUs: the autoscaler keeps
    # CPU-only work off nodes with a real GPU, but the stand-in resource is not one.
    assert 2 <= peak_train_nodes <= cluster.worker_types["gpu_worker_spot"]["max_workers"], \
        [(round(s.at), s.workers) for s in during]

    wait_for(lambda: cluster.workers_at_last_sample() == 0, IDLE_TIMEOUT_MINUTES * 60 + 120, "the idle nodes to go")
    gone = cluster.now()
    idle_cost = cluster.node_seconds(finished, gone)
    peaks = {kind: max(s.workers.get(kind, 0) for s in during) for kind in cluster.worker_types}
    print(f"\nscale from zero: peak worker nodes by type {peaks}; submit → first step {first_step - submitted:.1f} s, "
          f"run {finished - submitted:.1f} s, "
          f"worker nodes gone {gone - finished:.1f} s after the job (idle timeout {IDLE_TIMEOUT_MINUTES * 60:.0f} s), "
          f"node-seconds {cluster.node_seconds(submitted, gone):.0f} of which idle after the run {idle_cost:.0f}")
    assert gone - finished <= IDLE_TIMEOUT_MINUTES * 60 + 60
