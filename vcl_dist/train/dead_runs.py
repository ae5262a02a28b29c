"""Resources that Ray Train still holds for a run whose driver was killed.

An elastic run's controller asks Ray's autoscaling coordinator (a detached actor every job
shares) for its workers' resources, renewing the request every 20 s; the coordinator keeps a
request for 180 s after its last renewal, counting those resources as taken. A controller
killed with its driver never cancels its request, so for three minutes the next run — most
often the same run, started again with ``--resume`` — finds the cluster full and does not start
("Detected ready resources for 0 workers"). Ray Train records each run and its Ray job when
``RAY_TRAIN_ENABLE_STATE_TRACKING`` is on: vcl-dist turns it on for a driver that joins a
cluster (which outlives it; a local Ray ends with its driver), and before each fit cancels the
requests of recorded runs whose job has ended.
"""

from __future__ import annotations

import os

from ..reservation import ended_jobs
from ..runtime.console import one_line, say, warn

TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # its actor's name and namespace


def track_runs() -> None:
    """Have Ray Train record this driver's runs (read in the driver when a run starts)."""
    os.environ.setdefault(TRACKING, "1")


def release_dead_runs_requests() -> list[str]:
    """Cancel the resource requests of Ray Train runs whose Ray job has ended; returns the names
    of those that had not finished (their driver was killed). Ray's internal actors may change
    between versions: when they cannot be asked, a warning says so and nothing else happens."""
    import ray

    try:
        from ray.train.v2._internal.state.state_actor import get_state_actor

        recorder = get_state_actor()
        if recorder is None:
            return []
        runs = list(ray.get(recorder.get_train_runs.remote(), timeout=10).values())
        ended = ended_jobs({run.job_id for run in runs})
        dead = [run for run in runs if run.job_id in ended]
        if not dead:
            return []
        try:
            coordinator = ray.get_actor(COORDINATOR[0], namespace=COORDINATOR[1])
        except ValueError:  # no elastic run has asked for resources yet
            return []
        ray.get([coordinator.cancel_request.remote(requester_id=f"train-{run.id}") for run in dead], timeout=10)
    except Exception as err:  # noqa: BLE001 # Ray internals: the requests still expire on their own
        warn(f"could not release the resources of Ray Train runs whose driver was killed "
             f"({type(err).__name__}: {one_line(err, 160)}); a run resumed now may wait up to 3 minutes for them")
        return []
    interrupted = [run.name for run in dead if not run.status.is_terminal() or run.status.value == "ABORTED"]
    if interrupted:
        say(f"released the workers' resources that Ray Train still held for {', '.join(sorted(set(interrupted)))} "
            "(its driver was killed)")
    return interrupted
