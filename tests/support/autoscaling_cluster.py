"""A local autoscaling Ray cluster with the node types of ``ray-cluster.yaml``.

Ray's fake multi-node provider runs the real autoscaler (in the head's monitor process) over
nodes that are processes on this machine: it launches them from node types and resource demands
and terminates them when idle (here with spot reclaims added: `preemptible_provider`).
``ray.cluster_utils.AutoscalingCluster`` does the same but reads an example config that the
installed wheel does not ship, so the config is built here — from the repository's own cluster
config, so that a change there is a change to what is tested:

- every worker node type with its ``resources``, ``min_workers`` and ``max_workers``; a GPU is
  replaced by the custom resource `GPU_STAND_IN` (these nodes have none), which training
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


def autoscaling_config(cluster_yaml: Path, gcs_port: int, idle_timeout_minutes: float | None = None,
                       reclaim_dir: Path | None = None, node_boot_s: float = 0) -> dict:
    """The fake provider's autoscaling config for ``cluster_yaml``'s node types (with spot
    reclaims requested through ``reclaim_dir``: `preemptible_provider`)."""
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
                     "use_node_id_as_ip": True, "gcs_address": f"127.0.0.1:{gcs_port}",
                     **({"type": "external", "module": "preemptible_provider.PreemptibleFakeProvider",
                         "reclaim_dir": str(reclaim_dir), "boot_delay_s": node_boot_s} if reclaim_dir else {})},
        "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class NodeSample:
    at: float  # seconds since the cluster's clock started
    workers: dict[str, int]  # alive worker nodes by type
    ids: dict[str, str] = field(default_factory=dict)  # alive worker node id → its type


@dataclass
class LocalAutoscalingCluster:
    cluster_yaml: Path
    idle_timeout_minutes: float | None = None
    # The GCS declares a node whose raylet stopped answering dead after ~1 s instead of Ray's
    # ~15 s (health checks every 0.5 s, 2 misses): on a cloud a reclaimed node is known dead long
    # before its replacement boots (minutes), and so it must be here, where a node boots in seconds.
    fast_node_death: bool = False
    # How often the autoscaler acts (its AUTOSCALER_UPDATE_INTERVAL_S; Ray's default is 5 s). The
    # fake provider launches one node per update, so this is also how far apart nodes come.
    update_interval_s: int = 1
    # How long a launched node takes to come up beyond its own start (a cloud VM's boot; see
    # preemptible_provider). 0: as fast as a local process starts.
    node_boot_s: float = 0
    gcs_port: int = 0
    dashboard_port: int = 0
    env: dict = field(default_factory=dict)
    samples: list[NodeSample] = field(default_factory=list)

    def start(self) -> None:
        head, self.worker_types = read_node_types(self.cluster_yaml)
        self.temp_dir = tempfile.mkdtemp(prefix="vclas-", dir="/tmp")  # socket paths are length-limited
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(self.cluster_yaml, self.gcs_port, self.idle_timeout_minutes,
                                                        reclaim_dir=Path(self.temp_dir) / "reclaims", node_boot_s=self.node_boot_s)))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_FAKE_CLUSTER": "1",
                    # The head's monitor imports the provider (preemptible_provider) from here.
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
                    "AUTOSCALER_UPDATE_INTERVAL_S": str(self.update_interval_s), "RAY_AUTH_MODE": "disabled"}
        if self.fast_node_death:
            self.env |= {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                         "RAY_health_check_failure_threshold": "2"}
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

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

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
                nodes = list_nodes(address=self.gcs_address, detail=True, raise_on_missing_output=False)
                counts: dict[str, int] = {}
                ids: dict[str, str] = {}
                for node in nodes:
                    if node.state == "ALIVE" and not node.is_head_node:
                        kind = self.worker_type_of(node.resources_total) or "other"
                        counts[kind] = counts.get(kind, 0) + 1
                        ids[node.node_id] = kind
                self.samples.append(NodeSample(time.monotonic() - self.started, counts, ids))
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

    def preempt(self, node_id: str, timeout_s: float = 60) -> None:
        """Take a worker node away as a spot reclaim does, through the provider
        (`preemptible_provider`): every process of the node killed at once, with no notice,
        and the node no longer listed, so the autoscaler launches another for the demand still there.
        """
        (Path(self.temp_dir) / "reclaims" / node_id).touch()
        wait_for(lambda: (Path(self.temp_dir) / "reclaims" / f"{node_id}.done").exists(), timeout_s,
                 f"the provider to reclaim node {node_id}")

    def stop(self) -> None:
        if self._stop.is_set():
            return
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


class TrainingJob:
    """``ray job submit`` of ``jobs/train.py`` whose workers each ask for the GPU stand-in, followed
    line by line in a thread (so that a test can act while it runs); `wait` ends with its result.

    No ``--working-dir``: the fake nodes share this machine's session folder, and one node's
    runtime env agent deletes the unpacked working dir under the others' workers when it drops it
    from its cache; the project is installed in the venv the nodes run, so the job needs no package.
    """

    def __init__(self, cluster: LocalAutoscalingCluster, repo_root: Path, overrides: list[str], job_id: str,
                 epochs: int = 1, env_vars: dict[str, str] | None = None):
        self.cluster, self.epochs = cluster, epochs
        self.submitted = cluster.now()
        self.first_step: float | None = None
        self.lines: list[tuple[float, str]] = []  # (cluster clock, line)
        runtime_env = [f"--runtime-env-json={json.dumps({'env_vars': env_vars})}"] if env_vars else []
        command = [str(BIN / "ray"), "job", "submit", f"--address={cluster.address}", f"--submission-id={job_id}", *runtime_env, "--",
                   sys.executable, str(repo_root / "jobs/train.py"), *overrides, f"train.epochs={epochs}",
                   "train.use_gpu=false", f"train.resources_per_worker.{GPU_STAND_IN}=1"]
        self._process = subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self.lines.append((self.cluster.now(), line.rstrip("\n")))
            if self.first_step is None and f"vcl-dist: epoch 1/{self.epochs} step" in line:
                self.first_step = self.cluster.now()

    def running(self) -> bool:
        return self._process.poll() is None

    def wait(self, timeout_s: float = 900) -> SubmittedRun:
        returncode = self._process.wait(timeout=timeout_s)
        self._reader.join(timeout=30)
        return SubmittedRun(self.submitted, self.first_step, self.cluster.now(), returncode,
                            "\n".join(line for _, line in self.lines))


def submit_training(cluster: LocalAutoscalingCluster, repo_root: Path, overrides: list[str], job_id: str,
                    epochs: int = 1) -> SubmittedRun:
    """A `TrainingJob`, waited for."""
    return TrainingJob(cluster, repo_root, overrides, job_id, epochs).wait()


def checkpoint_metrics(run_folder: Path) -> list[dict]:
    """The metrics of every checkpoint of a run so far, in order (Ray Train's snapshot of them);
    a checkpoint inside an epoch has ``epoch_step``."""
    try:
        results = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return []
    return [r["metrics"] for r in results]


def checkpoint_world_sizes(run_folder: Path, epoch_ends: bool = False) -> list[int]:
    """The world size of every checkpoint of a run so far, in order (``epoch_ends``: of those
    that end an epoch, not the ones inside)."""
    return [m.get("world_size") for m in checkpoint_metrics(run_folder) if not epoch_ends or "epoch_step" not in m]


def training_worker_nodes(cluster: LocalAutoscalingCluster) -> list[str]:
    """The nodes of the live Ray Train workers, in no particular order."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return [actor.node_id for actor in actors]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)

