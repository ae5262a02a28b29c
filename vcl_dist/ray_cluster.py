"""The Ray cluster a job runs on: which one it joins, whether that one can run it, and the Ray
Data settings every vcl-dist pipeline runs with.

Which cluster (`connect_ray`), in this order:

1. ``RAY_ADDRESS=local``: a fresh local Ray in this process, whatever else runs on the machine.
2. ``RAY_ADDRESS=<host>:<port>`` (the GCS address; ``ray job submit`` sets it for the job):
   that cluster.
3. Otherwise the cluster that ``ray start`` last started on this machine (the address it
   recorded), joined with this machine's Ray token as Ray would join it, if it still runs (one
   that runs but refuses the job is an error), else a fresh local Ray sized for the job. Never another
   driver's private local Ray: Ray's ``address="auto"`` would join any running one, and two
   jobs would then share resources that neither planned for.

A local Ray listens on the machine's network address (Ray 2.60 resolves ``127.0.0.1`` to it and
offers no loopback-only setting), so it runs with Ray's token authentication: a process without
``~/.ray/auth_token`` cannot join it or run code on it. ``RAY_AUTH_MODE=disabled`` turns that
off, with a warning in the job's log.

Whether it can run the job (`check_cluster_fits`): the training workers' placement
group holds ``num_workers × cpus_per_worker`` CPUs (and a GPU each) for the whole run, and the
Ray Data tasks that feed them need at least one more CPU. A cluster that cannot hold both never
starts training and Ray says nothing: the data tasks wait forever. Without an autoscaler that
is an error at once, with what the job needs and what the cluster has; with one, the job waits
and says every minute what it is waiting for (`ResourceWaitReporter`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass

from .runtime.console import say, warn

RAY_DATA_ENV = {
    # Ray's Parquet reader packs row groups into read tasks of up to 128 MiB: right for tabular
    # data, but 128 MiB of encoded images is ~10,000 rows that one map task then decodes on one
    # CPU.
    "RAY_DATA_PARQUET_BIN_PACKING_BYTES": str(8 * 2**20),
    # For every execution (every epoch of every split) Ray 2.60's Parquet reader starts this
    # many footer-reading actors, 32 by default, and kills them when the files are listed:
    # 32 new processes per epoch, measured at ~3 CPU-seconds and a second of start-up before
    # the first read. Two actors, each with 128 concurrent reads, still list thousands of S3
    # files in seconds.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
}
# Ray reads these variables in the driver (when ``read_parquet`` plans) and in the workers
# that list files: ``use_ray_data_settings`` sets them in the driver, ``connect_ray`` in a
# local Ray's workers, and ``ray-cluster.yaml`` / ``cluster/`` on clusters.


def use_ray_data_settings() -> None:
    """The Ray Data settings of vcl-dist, for the pipelines this process builds from now on.

    Besides ``RAY_DATA_ENV``: Ray Data reserves half of the CPUs for each operator by default,
    so while the Parquet reads of an epoch are still queued the decode operator may use only
    half of the CPUs it could (measured on 2 CPUs: one decode task at a time for the first
    seconds of every epoch). The pipeline is a straight line whose reads are cheap, so
    reservation buys nothing here; streaming backpressure still bounds memory.
    """
    import ray.data

    for name, value in RAY_DATA_ENV.items():
        os.environ.setdefault(name, value)
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False


# Logical CPUs that the data pipeline needs beside the training workers: one preprocessing
# task at a time at least (more run when there is room).
DATA_CPUS = 1
WAIT_REPORT_INTERVAL_S = 60.0
# How long a job waits for the head's monitor to write its first report (autoscaler_can_add_nodes).
FIRST_AUTOSCALER_REPORT_WAIT_S = 60.0


class ClusterTooSmallError(ValueError):
    """The cluster cannot hold the job and nothing will grow it; ``str(err)`` is one line."""


def cpus_for_training(workers: int, cpus_per_worker: float) -> int:
    """Logical CPUs a local Ray gets for a training run: the workers' plus room for two
    preprocessing tasks at a time."""
    return int(workers * cpus_per_worker) + 2


def connect_ray(cpus_needed: int) -> str:
    """Connect as the module docstring says; returns what was done, for the job's log.

    A fresh local Ray gets at least ``cpus_needed`` logical CPUs, so that the training workers
    and the preprocessing tasks can all be scheduled on a small laptop (Ray oversubscribes;
    the OS shares the cores), and the Ray Data settings of ``RAY_DATA_ENV`` in its workers'
    environment.

    Raises:
        ValueError: ``RAY_ADDRESS`` names a dashboard (``http://…``), which is for
            ``ray job submit``, not for a driver (one line).
    """
    import ray

    drop_false_ray_data_warnings()
    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address.startswith(("http://", "https://")):
        raise ValueError(f"RAY_ADDRESS={address} is a dashboard address, for `ray job submit`; run this job with "
                         "`ray job submit --address … -- python jobs/…`, or unset RAY_ADDRESS (RAY_ADDRESS=local: a local Ray)")
    gone = ""
    if address and address != "local":
        try:
            ray.init(address=address)
        except ConnectionError:
            raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}") from None
        keep_ray_data_stats_on_this_node()
        return f"joined the Ray cluster at {ray.get_runtime_context().gcs_address} (RAY_ADDRESS)"
    recorded = started_cluster_address() if address != "local" else None
    if recorded:
        use_local_token()
        try:
            ray.init(address=recorded)
            keep_ray_data_stats_on_this_node()
            return f"joined the Ray cluster at {ray.get_runtime_context().gcs_address} (the one `ray start` started)"
        except ConnectionError:
            if recorded in unrecorded_clusters():  # its GCS still runs: it refused this process
                raise ValueError(
                    f"cannot join the Ray cluster that `ray start` started at {recorded}: it runs but refused this "
                    "process (token authentication: the token of whoever started it goes in ~/.ray/auth_token, or "
                    "RAY_AUTH_TOKEN_PATH); RAY_ADDRESS=local runs the job on a Ray of its own") from None
            gone = f" (the cluster `ray start` started at {recorded} is gone)"
    others = unrecorded_clusters()
    for name, value in RAY_DATA_ENV.items():  # inherited by the local Ray's workers
        os.environ.setdefault(name, value)
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        warn("RAY_AUTH_MODE=disabled: the local Ray listens on this machine's network address without a token; "
             "anyone who can reach it can run code as you — unset it outside a private network")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed))
    if others:
        gone += (f" (not joining the Ray running at {', '.join(sorted(others))}: no `ray start` recorded it, so it may be "
                 "another job's own; set RAY_ADDRESS to join it)")
    return f"started a local Ray{gone}"


def use_local_token() -> None:
    """Send this machine's Ray token (``~/.ray/auth_token``) when joining the cluster that
    ``ray start`` recorded, as Ray does for a cluster it finds by itself (``address="auto"``).

    ``ray start`` turns token authentication on when that file exists, and any earlier local
    Ray of this user wrote it; Ray sends it only when ``RAY_AUTH_MODE`` is set or the address
    was found rather than given, and this driver gives the recorded address (so as not to join
    another driver's private Ray). Without the token, the join failed after 20 s of retries.
    An explicit ``RAY_AUTH_MODE`` is left as it is. Private API, guarded."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def unrecorded_clusters() -> set[str]:
    """GCS addresses of Ray instances running on this machine (found by process name)."""
    try:
        from ray._private.services import find_gcs_addresses

        return set(find_gcs_addresses())
    except Exception:  # noqa: BLE001 - only a hint for the log line
        return set()


def started_cluster_address() -> str | None:
    """The address of the cluster that ``ray start`` last started on this machine, as Ray
    records it (never a driver's own local Ray, which records nothing); None when there is none."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # another Ray: no record to read, so nothing is joined unasked
        return None
    return read_ray_address() or None


def keep_ray_data_stats_on_this_node() -> None:
    """Create Ray Data's per-cluster statistics actor now, from this driver, so that it lives on
    the driver's node (the head, on a cluster).

    Ray Data makes that actor (detached: it outlives every job) on the node of the first process
    that runs a dataset. In a training run that is a training worker, so the actor pinned a
    worker node for good and the autoscaler never gave that node back — measured on the local
    autoscaling cluster of ``tests/e2e/test_autoscaling.py``: one GPU-type node kept after every job.
    The actor holds no CPU, so a head with ``CPU: 0`` takes it. Private API (``ray.data._internal``),
    guarded: without it, the old placement.
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    try:
        get_or_create_stats_actor()
    except Exception as err:  # noqa: BLE001 - an optimisation of node placement, never a reason to stop a job
        warnings.warn(f"vcl-dist: could not place Ray Data's statistics actor on this node: {err}", stacklevel=2)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def drop_false_ray_data_warnings() -> None:
    """Ray Data warns that a dataset "will hang unless more CPUs are freed up" whenever no CPU
    happens to be free at the moment it starts — as when a job's own model actors or training
    workers hold the CPUs for a moment — and the job goes on to succeed. vcl-dist checks that a
    cluster can run its jobs before it starts them (`check_cluster_fits`), so the
    driver's log does not carry that warning."""
    dataset_logger = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _DropMessages) for f in dataset_logger.filters):
        dataset_logger.addFilter(_DropMessages("does not have any available CPUs"))


@dataclass(frozen=True)
class JobNeeds:
    """What a training run holds while it runs."""

    workers: int  # the fewest the run can start with (train.min_workers for elastic runs)
    cpus_per_worker: float
    gpus_per_worker: int
    custom_per_worker: tuple[tuple[str, float], ...] = ()  # train.resources_per_worker

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + DATA_CPUS

    def describe(self) -> str:
        gpus = f" and {self.workers * self.gpus_per_worker} GPUs" if self.gpus_per_worker else ""
        custom = "".join(f" + {_number(amount)} {name}" for name, amount in self.custom_per_worker)
        return (f"{_number(self.cpus)} CPUs{gpus}: {self.workers} training workers × {_number(self.cpus_per_worker)} CPU "
                f"(train.cpus_per_worker){' + 1 GPU' if self.gpus_per_worker else ''}{custom} plus {DATA_CPUS} for the "
                "data preprocessing tasks")


def _number(value: float) -> str:
    return f"{value:g}"


def workers_that_fit(nodes: list[dict[str, float]], needs: JobNeeds) -> int:
    """How many training workers the nodes' total resources can hold (a worker's CPUs and GPU
    must be on one node)."""
    count = 0
    for node in nodes:
        fits = node.get("CPU", 0) / needs.cpus_per_worker
        if needs.gpus_per_worker:
            fits = min(fits, node.get("GPU", 0) / needs.gpus_per_worker)
        for name, amount in needs.custom_per_worker:
            fits = min(fits, node.get(name, 0) / amount)
        count += int(fits + 1e-9)
    return count


def shortfall(nodes: list[dict[str, float]], needs: JobNeeds) -> str | None:
    """Why the nodes cannot hold the job, or None when they can."""
    total_cpus = sum(node.get("CPU", 0) for node in nodes)
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    has = f"{_number(total_cpus)} CPUs" + (f" and {_number(total_gpus)} GPUs" if needs.gpus_per_worker else "")
    has += "".join(f" and {_number(sum(node.get(name, 0) for node in nodes))} {name}" for name, _ in needs.custom_per_worker)
    if workers_that_fit(nodes, needs) < needs.workers or total_cpus + 1e-9 < needs.cpus:
        return f"it has {has} and the job needs {needs.describe()}"
    return None


def check_cluster_fits(needs: JobNeeds) -> None:
    """Stop a job that the connected cluster can never run; on an autoscaling cluster, start a
    `ResourceWaitReporter` instead when the cluster is short now.

    Raises:
        ClusterTooSmallError: short, and no autoscaler can add nodes (one line, with the fixes).
    """
    import ray

    problem = shortfall(alive_node_resources(), needs)
    if problem is None:
        return
    if autoscaler_can_add_nodes():
        say(f"waiting for the autoscaler: {problem}")
        ResourceWaitReporter(needs).start()
        return
    raise ClusterTooSmallError(
        f"the Ray cluster at {ray.get_runtime_context().gcs_address} cannot run this job and no autoscaler can add nodes: "
        f"{problem}. Use fewer workers (train.num_workers), fewer CPUs each (e.g. train.cpus_per_worker="
        f"{_number(max(0.25, needs.cpus_per_worker / 2))}), or start Ray with more logical CPUs "
        f"(ray start --head --num-cpus={math.ceil(needs.cpus)})"
    )


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def autoscaler_can_add_nodes(first_report_wait_s: float = FIRST_AUTOSCALER_REPORT_WAIT_S) -> bool:
    """Whether an autoscaler that launches nodes watches this cluster.

    Every head runs Ray's monitor; without an autoscaling config it uses the read-only node
    provider, whose node types are the nodes themselves (``node_<node id>``). An autoscaler v2
    (KubeRay) is taken as able to add nodes. The monitor writes its first report at its first
    update (every 5 s by default; longer on a busy head): a job submitted right after the head
    started waits up to ``first_report_wait_s`` for it rather than take a cluster it cannot yet
    read for a fixed one.
    """
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + first_report_wait_s
    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return True
        # ray_constants.DEBUG_AUTOSCALING_STATUS: the monitor's latest status; its autoscaler
        # part is null until the autoscaler's first update.
        while not (report := _autoscaler_report(_internal_kv_get("__autoscaling_status"))) and time.monotonic() < deadline:
            time.sleep(1.0)
    except (ray.exceptions.RayError, ConnectionError, RuntimeError, AttributeError):
        # A GCS of another Ray version without these calls or keys: take the cluster for a fixed one.
        return False
    if not report:
        return False
    node_types = set((report.get("node_type_mapping") or {}).values())
    readonly = {f"node_{node['NodeID']}" for node in ray.nodes()}
    return bool(node_types - readonly) or bool(report.get("pending_launches")) or bool(report.get("pending_nodes"))


def _autoscaler_report(status: bytes | None) -> dict:
    try:
        return (json.loads(status) if status else {}).get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return {}


class ResourceWaitReporter(threading.Thread):
    """Says every minute, until the cluster can hold the job, what the job waits for."""

    def __init__(self, needs: JobNeeds, interval_s: float = WAIT_REPORT_INTERVAL_S):
        super().__init__(name="vcl-dist-resource-wait", daemon=True)
        self.needs, self.interval_s = needs, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        waited = 0.0
        while not self.stopped.wait(self.interval_s):
            waited += self.interval_s
            problem = shortfall(alive_node_resources(), self.needs)
            if problem is None:
                say(f"the cluster can now hold the job (after {waited / 60:.0f} min)")
                return
            say(f"still waiting for the autoscaler after {waited / 60:.0f} min: {problem}")
