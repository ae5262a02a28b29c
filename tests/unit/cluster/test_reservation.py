"""A job's share of a shared cluster: the admission ledger, and what a waiting job is told (two
real jobs on one cluster: tests/e2e/test_job_submit.py)."""

import time

from vcl_dist import reservation
from vcl_dist.config import load_config
from vcl_dist.reservation import AdmissionLedger, describe_holders, training_needs


def test_jobs_are_admitted_in_order_while_their_whole_needs_fit():
    ledger = AdmissionLedger()
    first = ledger.join("job 1", 2, 0, "2 CPUs")
    second = ledger.join("job 2", 2, 0, "2 CPUs")
    third = ledger.join("job 3", 1, 0, "1 CPU")
    assert ledger.poll(first, 4, 0)[0] == "admitted"
    assert ledger.poll(third, 4, 0)[0] == "waiting"  # it would fit, but job 2 came first
    assert ledger.poll(second, 4, 0)[0] == "admitted"
    state, others = ledger.poll(third, 4, 0)
    assert state == "waiting" and [(o["who"], o["admitted"]) for o in others] == [("job 1", True), ("job 2", True)]
    ledger.leave(first)  # job 1 is done
    assert ledger.poll(third, 4, 0)[0] == "admitted"


def test_gpus_count_and_a_growing_cluster_starts_the_first_job_at_once():
    ledger = AdmissionLedger()
    gpu_job = ledger.join("gpu job", 16, 4, "16 CPUs and 4 GPUs")
    assert ledger.poll(gpu_job, 64, 2)[0] == "waiting"  # CPUs enough, GPUs not
    assert ledger.poll(gpu_job, 64, 2, can_grow=True)[0] == "admitted"  # its placement group makes the autoscaler grow
    other = ledger.join("other", 8, 1, "8 CPUs and 1 GPU")
    assert ledger.poll(other, 64, 2, can_grow=True)[0] == "waiting"  # not alone any more: it waits for room
    assert ledger.poll(other, 64, 5, can_grow=True)[0] == "admitted"


def test_a_driver_that_stops_renewing_loses_its_place(monkeypatch):
    ledger = AdmissionLedger()
    dead = ledger.join("dead job", 2, 0, "2 CPUs")
    alive = ledger.join("live job", 2, 0, "2 CPUs")
    assert ledger.poll(dead, 2, 0)[0] == "admitted"
    now = time.time()
    monkeypatch.setattr(reservation.time, "time", lambda: now + reservation.LEASE_S + 1)
    ledger.entries[alive]["seen"] = now + reservation.LEASE_S  # renewed a second ago
    assert ledger.poll(alive, 2, 0)[0] == "admitted"
    assert ledger.poll(dead, 2, 0) == ("unknown", [])


def test_a_killed_drivers_place_goes_at_its_first_missed_renewals_not_after_the_lease(monkeypatch):
    ledger = AdmissionLedger()
    killed = ledger.join("killed job", 2, 0, "2 CPUs", job="02000000")
    paused = ledger.join("paused job", 2, 0, "2 CPUs", job="03000000")
    assert ledger.poll(killed, 4, 0)[0] == "admitted" and ledger.poll(paused, 4, 0)[0] == "admitted"
    asked = []
    monkeypatch.setattr(reservation, "ended_jobs", lambda jobs: asked.append(set(jobs)) or {"02000000"} & jobs)
    now = time.time()
    monkeypatch.setattr(reservation.time, "time", lambda: now + 2 * reservation.RENEW_EVERY_S + 1)
    newcomer = ledger.join("new job", 2, 0, "2 CPUs", job="04000000")
    assert ledger.poll(newcomer, 4, 0)[0] == "admitted"  # the killed job's CPUs are free again
    assert asked == [{"02000000", "03000000"}]  # only late entries are looked up
    assert ledger.poll(killed, 4, 0) == ("unknown", [])
    assert ledger.poll(paused, 4, 0)[0] == "admitted"  # its job runs: it keeps its place until the lease ends


def test_a_job_counts_its_workers_and_its_data_cpus(repo_root):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", ["train.cpus_per_worker=0.5"])
    needs = training_needs(cfg, use_gpu=False)
    assert (needs.cpus, needs.gpus) == (2, 0)
    assert needs.text == "2 CPUs (2 training workers × 0.5 CPU, 1 for its data tasks)"
    gpu = training_needs(load_config(repo_root / "jobs/configs/gpu.yaml", ["train.data_cpus=8"]), use_gpu=True)
    assert (gpu.cpus, gpu.gpus) == (24, 4) and gpu.text.startswith("24 CPUs and 4 GPUs (4 training workers × 4 CPU + 1 GPU")


def test_a_waiting_job_is_told_who_holds_the_cluster():
    now = 1000.0
    others = [{"who": "job 01000000 (pid 7 on a)", "needs": "2 CPUs (2 training workers × 0.5 CPU, 1 for its data tasks)",
               "since": now - 125, "admitted": True},
              {"who": "job 03000000 (pid 9 on a)", "needs": "…", "since": now - 3, "admitted": False}]
    text = describe_holders(others, now)
    assert text.startswith("held by job 01000000 (pid 7 on a) (2 CPUs (2 training workers × 0.5 CPU, 1 for its data "
                           "tasks), for 2 min)")
    assert text.endswith("1 other vcl-dist job(s) waiting too: job 03000000 (pid 9 on a)")
    assert describe_holders([], now) == "no vcl-dist job holds it (other work does)"


def test_a_second_reservation_waits_on_a_real_ledger_until_the_first_is_released():
    """The ledger actor on a local Ray: the second job says at once what it waits for and who
    holds the cluster, and is admitted when the first releases; a Ctrl-C while waiting leaves the queue."""
    import threading

    import ray

    from vcl_dist.reservation import JobReservation, Needs

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        cluster = lambda: (2.0, 0.0, False)  # noqa: E731 - a 2-CPU cluster that cannot grow
        needs = Needs(2, 0, "2 CPUs (2 training workers × 0.5 CPU, 1 for its data tasks)")
        first = JobReservation("job A", needs, cluster, say=lambda line: None)
        first.acquire()
        said: list[str] = []
        second = JobReservation("job B", needs, cluster, say=said.append)
        waiter = threading.Thread(target=second.acquire)
        waiter.start()
        time.sleep(3)
        assert waiter.is_alive() and said and said[0].startswith("vcl-dist: waiting (0 s so far) for the cluster: this "
                                                                  "job needs 2 CPUs (2 training workers")
        assert "held by job A (2 CPUs" in said[0]
        first.release()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and said[-1].startswith("vcl-dist: the cluster has room for this job after ")
        second.release()

        third = JobReservation("job C", needs, lambda: (1.0, 0.0, False), say=lambda line: None)
        third.say = lambda line: (_ for _ in ()).throw(KeyboardInterrupt())  # interrupted at its first wait line
        try:
            third.acquire()
        except KeyboardInterrupt:
            pass
        assert third.ticket is None
        fourth = JobReservation("job D", needs, cluster, say=lambda line: None)
        fourth.acquire()  # nobody left ahead of it
        fourth.release()
        # The cluster's job table, as the ledger reads it: this job runs, an unknown one is not "ended".
        assert reservation.ended_jobs({ray.get_runtime_context().get_job_id(), "7f000000"}) == set()
    finally:
        ray.shutdown()
