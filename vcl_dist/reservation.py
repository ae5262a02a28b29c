"""A training job's share of a cluster that other jobs use too: taken whole, or waited for.

A run needs its training workers (Ray Train's placement group, held for the whole run) and CPUs
for the Ray Data tasks that feed them (short tasks, taken from what is free). Started side by
side, two jobs deadlock: each holds its workers, the data tasks of both wait for a CPU, and Ray
says nothing. So every vcl-dist job on a shared cluster is admitted through one ledger (a named
actor all drivers share): it starts only when the cluster's CPUs and GPUs, less what the jobs
already admitted need in all (workers and data CPUs), hold its own needs. Jobs are admitted in
the order they came; a waiting job says every 30 s what it needs and who holds the cluster.
Every admitted job can therefore always run its data tasks, and the second of two jobs that do
not fit together waits, whole, until the first is done.

The ledger counts vcl-dist jobs; other work on the cluster shows in the waiting message as what
is not theirs. A local Ray that this process started is its own and needs no ledger. On a
cluster that an autoscaler grows, a job that is first in line and finds nothing admitted starts
at once: its placement group is what makes the autoscaler add nodes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .runtime.console import say

NAMESPACE = "vcl-dist"
LEDGER_ACTOR = "vcl-dist-admission"
# A driver that stops renewing its entry (its machine gone) loses it after this long; one whose
# Ray job has ended (a killed driver) loses it at its next missed renewal.
LEASE_S = 60.0
RENEW_EVERY_S = 5.0
REPORT_EVERY_S = 30.0


@dataclass(frozen=True)
class Needs:
    """What a job holds while it runs: CPUs (workers' and data tasks'), GPUs, and in words."""

    cpus: float
    gpus: float
    text: str


class AdmissionLedger:
    """The cluster's queue of waiting vcl-dist jobs and the register of admitted ones (a
    detached Ray actor, one per cluster). Entries expire unless their driver renews them."""

    def __init__(self):
        self.queue: list[str] = []
        self.entries: dict[str, dict] = {}  # ticket -> who, cpus, gpus, needs, since, seen, admitted

    def _expire(self) -> None:
        now = time.time()
        late = {t: e for t, e in self.entries.items() if now - e["seen"] > 2 * RENEW_EVERY_S}
        ended = ended_jobs({e.get("job") for e in late.values()} - {None}) if late else set()
        for ticket, entry in late.items():
            if now - entry["seen"] > LEASE_S or entry.get("job") in ended:
                self.leave(ticket)

    def join(self, who: str, cpus: float, gpus: float, needs: str, job: str | None = None) -> str:
        ticket = uuid.uuid4().hex
        now = time.time()
        self.entries[ticket] = {"who": who, "cpus": cpus, "gpus": gpus, "needs": needs, "since": now, "seen": now,
                                "admitted": False, "job": job}
        self.queue.append(ticket)
        return ticket

    def poll(self, ticket: str, total_cpus: float, total_gpus: float, can_grow: bool = False) -> tuple[str, list[dict]]:
        """Renew ``ticket`` and admit it when it is first in line and fits beside the admitted
        jobs in a cluster of ``total_cpus`` / ``total_gpus`` (or nothing is admitted and the
        cluster ``can_grow``). Returns ``"admitted"``, ``"waiting"`` or ``"unknown"`` (expired),
        and the other entries."""
        self._expire()
        entry = self.entries.get(ticket)
        if entry is None:
            return "unknown", []
        entry["seen"] = time.time()
        others = [{k: e[k] for k in ("who", "needs", "since", "admitted")} for t, e in self.entries.items() if t != ticket]
        if not entry["admitted"] and self.queue and self.queue[0] == ticket:
            admitted = [e for e in self.entries.values() if e["admitted"]]
            free_cpus = total_cpus - sum(e["cpus"] for e in admitted)
            free_gpus = total_gpus - sum(e["gpus"] for e in admitted)
            if (entry["cpus"] <= free_cpus + 1e-9 and entry["gpus"] <= free_gpus + 1e-9) or (can_grow and not admitted):
                entry["admitted"] = True
                self.queue.pop(0)
        return ("admitted" if entry["admitted"] else "waiting"), others

    def leave(self, ticket: str) -> None:
        if ticket in self.queue:
            self.queue.remove(ticket)
        self.entries.pop(ticket, None)


def ended_jobs(job_ids: set[str]) -> set[str]:
    """Which of the Ray jobs ``job_ids`` (hex) have ended, by the cluster's job table; none when
    it cannot be read (the lease decides then)."""
    try:
        import ray._private.state

        return {job["JobID"] for job in ray._private.state.jobs() if job["JobID"] in job_ids and job.get("IsDead")}
    except Exception:  # noqa: BLE001 # an internal table: the lease still frees the entry
        return set()


def ledger_actor():
    """The cluster's `AdmissionLedger`, created by the first job that asks."""
    import ray

    return ray.remote(AdmissionLedger).options(name=LEDGER_ACTOR, namespace=NAMESPACE, lifetime="detached",
                                               get_if_exists=True, num_cpus=0).remote()


def describe_holders(others: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    admitted = [o for o in others if o["admitted"]]
    waiting = [o for o in others if not o["admitted"]]
    parts = [f"{o['who']} ({o['needs']}, for {(now - o['since']) / 60:.0f} min)" for o in admitted]
    text = "held by " + "; ".join(parts) if parts else "no vcl-dist job holds it (other work does)"
    if waiting:
        text += f"; {len(waiting)} other vcl-dist job(s) waiting too: " + ", ".join(o["who"] for o in waiting)
    return text


class JobReservation:
    """One job's place in the ledger: `acquire` returns once the job is admitted (saying
    every ``report_every_s`` what it waits for), `release` gives its share back. The
    cluster's size comes from ``cluster()`` → ``(cpus, gpus, can_grow)``; ``say(line)`` prints."""

    def __init__(self, who: str, needs: Needs, cluster, say=say, report_every_s: float = REPORT_EVERY_S):
        self.who, self.needs, self.cluster = who, needs, cluster
        self.say, self.report_every_s = say, report_every_s
        self.ledger = None
        self.ticket: str | None = None
        self._stop = threading.Event()

    def _join(self) -> None:
        import ray

        self.ticket = ray.get(self.ledger.join.remote(self.who, self.needs.cpus, self.needs.gpus, self.needs.text,
                                                      ray.get_runtime_context().get_job_id()))

    def _poll(self) -> tuple[str, list[dict]]:
        import ray

        cpus, gpus, can_grow = self.cluster()
        return ray.get(self.ledger.poll.remote(self.ticket, cpus, gpus, can_grow))

    def acquire(self) -> None:
        self.ledger = ledger_actor()
        self._join()
        try:
            self._wait_for_admission()
        except BaseException:  # Ctrl-C while waiting: leave the queue now, not when the lease runs out
            self.release()
            raise
        threading.Thread(target=self._renew, name="vcl-dist-admission", daemon=True).start()

    def _wait_for_admission(self) -> None:
        started, last_report = time.monotonic(), None
        while True:
            state, others = self._poll()
            if state == "admitted":
                break
            if state == "unknown":  # the lease ran out (this driver paused too long): queue again
                self._join()
            if last_report is None or time.monotonic() - last_report >= self.report_every_s:
                last_report = time.monotonic()
                self.say(f"vcl-dist: waiting ({last_report - started:.0f} s so far) for the cluster: this job needs "
                         f"{self.needs.text}; {describe_holders(others)}")
            time.sleep(1.0)
        if last_report is not None:
            self.say(f"vcl-dist: the cluster has room for this job after {time.monotonic() - started:.0f} s of waiting")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self._poll()
            # A missed renewal only shortens the lease; the run goes on.
            except Exception:  # noqa: BLE001 # nosec B110
                pass

    def release(self) -> None:
        import ray

        self._stop.set()
        if self.ledger is not None and self.ticket is not None:
            try:
                ray.get(self.ledger.leave.remote(self.ticket), timeout=30)
            # The lease runs out on its own.
            except Exception:  # noqa: BLE001 # nosec B110
                pass
            self.ticket = None


def job_label() -> str:
    """How other jobs' messages name this one: its Ray job id, host and process."""
    import ray

    return f"job {ray.get_runtime_context().get_job_id()} (pid {os.getpid()} on {socket.gethostname()})"


def training_needs(cfg, use_gpu: bool) -> Needs:
    """What a training run of ``cfg`` holds: its workers (at full size) and ``train.data_cpus``."""
    train = cfg.train
    worker_cpus = train.num_workers * train.cpus_per_worker
    data = train.data_cpus
    gpus = train.num_workers if use_gpu else 0
    workers = f"{train.num_workers} training workers × {train.cpus_per_worker:g} CPU" + (" + 1 GPU" if use_gpu else "")
    return Needs(worker_cpus + data, gpus, f"{worker_cpus + data:g} CPUs{f' and {gpus} GPUs' if gpus else ''} "
                                           f"({workers}, {data} for its data tasks)")


def cluster_size(can_grow: bool | None = None) -> tuple[float, float, bool]:
    """``(CPUs, GPUs, can grow)`` of the connected cluster now (``can_grow`` asked of the
    autoscaler unless given)."""
    import ray

    from .ray_cluster import autoscaler_can_add_nodes

    total = ray.cluster_resources()
    return total.get("CPU", 0.0), total.get("GPU", 0.0), autoscaler_can_add_nodes(0) if can_grow is None else can_grow


def reserve_for_training(cfg, use_gpu: bool, shared: bool, say=say) -> JobReservation | None:
    """Admit a training run of ``cfg`` through the cluster's ledger (blocking until it fits);
    None on a local Ray of this process alone (``shared`` false), which needs no ledger."""
    if not shared:
        return None
    can_grow = cluster_size()[2]
    reservation = JobReservation(job_label(), training_needs(cfg, use_gpu), lambda: cluster_size(can_grow), say=say)
    reservation.acquire()
    return reservation
