"""A local autoscaling Ray cluster with the node types of ``ray-cluster.yaml``.

Ray's fake multi-node provider runs the real autoscaler (in the head's monitor process) over
nodes that are processes on this machine: it launches them from node types and resource demands
and terminates them when idle. ``ray.cluster_utils.AutoscalingCluster`` does the same but reads
an example config that the installed wheel does not ship, so the config is built here — from
the repository's own cluster config, so that a change there is a change to what is tested:

- every worker node type with its ``resources``, ``min_workers`` and ``max_workers``; a GPU is
  replaced by the custom resource :data:`GPU_STAND_IN` (these nodes have none), which training
  workers ask for with ``train.resources_per_worker``;
- the head's resources (``CPU: 0``: nothing heavy runs on it), ``max_workers``,
  ``upscaling_speed`` and ``idle_timeout_minutes`` (a test may shorten the last, saying so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
GPU_STAND_IN = "train_gpu"
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's type


def _stand_in(resources: dict) -> dict:
    resources = dict(resources)
    if "GPU" in resources:
        resources[GPU_STAND_IN] = resources.pop("GPU")
    return resources


def read_node_types(cluster_yaml: Path) -> tuple[dict, dict]:
    """``(head resources, {worker type: {resources, min_workers, max_workers}})`` of a cluster config."""
    config = yaml.safe_load(cluster_yaml.read_text())
    head_type = config["head_node_type"]
    workers = {}
    for name, node_type in config["available_node_types"].items():
        if name == head_type:
            continue
        workers[name] = {"resources": _stand_in(node_type["resources"]), "min_workers": node_type.get("min_workers", 0),
                         "max_workers": node_type["max_workers"]}
    return _stand_in(config["available_node_types"][head_type]["resources"]), workers


def autoscaling_config(cluster_yaml: Path, gcs_port: int, idle_timeout_minutes: float | None = None) -> dict:
    """The fake provider's autoscaling config for ``cluster_yaml``'s node types."""
    config = yaml.safe_load(cluster_yaml.read_text())
    head, workers = read_node_types(cluster_yaml)
    types = {name: {**spec, "node_config": {}} for name, spec in workers.items()}
    types[FAKE_HEAD_TYPE] = {"resources": head, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "vcl-dist-local-autoscaling", "max_workers": config["max_workers"],
        "upscaling_speed": config.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": config["idle_timeout_minutes"] if idle_timeout_minutes is None else idle_timeout_minutes,
        # No node updaters: there is no SSH to run setup commands over (without this flag every
        # node is terminated at once as "launch failed").
        "provider": {"type": "fake_multinode", "disable_node_updaters": True, "disable_launch_config_check": True,
                     "use_node_id_as_ip": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class NodeSample:
    at: float  # seconds since the cluster's clock started
    workers: dict[str, int]  # alive worker nodes by type


@dataclass
class LocalAutoscalingCluster:
    cluster_yaml: Path
    idle_timeout_minutes: float | None = None
    gcs_port: int = 0
    dashboard_port: int = 0
    env: dict = field(default_factory=dict)
    samples: list[NodeSample] = field(default_factory=list)

    def start(self) -> None:
        head, self.worker_types = read_node_types(self.cluster_yaml)
        self.temp_dir = tempfile.mkdtemp(prefix="vclas-", dir="/tmp")  # socket paths are length-limited
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(self.cluster_yaml, self.gcs_port, self.idle_timeout_minutes)))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_FAKE_CLUSTER": "1",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
        head_resources = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        command = [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={config}", f"--num-cpus={int(head.get('CPU', 0))}",
                   "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        if head_resources:
            command.append(f"--resources={json.dumps(head_resources)}")
        subprocess.run(command, check=True, env=self.env, capture_output=True, timeout=120)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def worker_type_of(self, resources: dict) -> str | None:
        """The worker type whose resources a node has (spot and on-demand types share theirs: the first)."""
        for name, spec in self.worker_types.items():
            if all(abs(resources.get(k, 0) - v) < 1e-9 for k, v in spec["resources"].items()):
                return name
        return None

    def _sample(self) -> None:
        """Every second: the alive worker nodes by type, read from the GCS by ``ray list nodes``'s API."""
        from ray.util.state import list_nodes

        while not self._stop.is_set():
            try:
                nodes = list_nodes(address=f"127.0.0.1:{self.gcs_port}", detail=True, raise_on_missing_output=False)
                counts: dict[str, int] = {}
                for node in nodes:
                    if node.state == "ALIVE" and not node.is_head_node:
                        kind = self.worker_type_of(node.resources_total) or "other"
                        counts[kind] = counts.get(kind, 0) + 1
                self.samples.append(NodeSample(time.monotonic() - self.started, counts))
            except Exception:  # noqa: BLE001 - the state API may be briefly unavailable; sample again
                pass
            self._stop.wait(1.0)

    def now(self) -> float:
        return time.monotonic() - self.started

    def workers_at_last_sample(self) -> int:
        return sum(self.samples[-1].workers.values()) if self.samples else 0

    def node_seconds(self, start: float, stop: float) -> float:
        """Worker node-seconds between two moments of the cluster's clock (from the samples)."""
        total = 0.0
        for before, after in zip(self.samples, self.samples[1:]):
            lo, hi = max(before.at, start), min(after.at, stop)
            if hi > lo:
                total += sum(before.workers.values()) * (hi - lo)
        return total

    def stop(self) -> None:
        self._stop.set()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@dataclass
class SubmittedRun:
    """A training job submitted to the cluster, with the cluster clock's moments of its life."""

    submitted: float
    first_step: float | None
    finished: float
    returncode: int
    output: str


def submit_training(cluster: LocalAutoscalingCluster, repo_root: Path, overrides: list[str], job_id: str,
                    epochs: int = 1) -> SubmittedRun:
    """``ray job submit`` of ``jobs/train.py`` whose workers each ask for the GPU stand-in; waits for its end.

    No ``--working-dir``: the fake nodes share this machine's session folder, and one node's
    runtime env agent deletes the unpacked working dir under the others' workers when it drops it
    from its cache; the project is installed in the venv the nodes run, so the job needs no package.
    """
    submitted = cluster.now()
    command = [str(BIN / "ray"), "job", "submit", f"--address={cluster.address}", f"--submission-id={job_id}", "--",
               sys.executable, str(repo_root / "jobs/train.py"), *overrides, f"train.epochs={epochs}",
               "train.use_gpu=false", f"train.resources_per_worker.{GPU_STAND_IN}=1"]
    lines, first_step = [], None
    with subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        for line in job.stdout:
            lines.append(line.rstrip("\n"))
            if first_step is None and f"vcl-dist: epoch 1/{epochs} step" in line:
                first_step = cluster.now()
    return SubmittedRun(submitted, first_step, cluster.now(), job.returncode, "\n".join(lines))


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)

