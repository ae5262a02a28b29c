"""The driver's side of watching a run: a thread that drains the monitor (`.monitor`)
every half second, shows progress and hands metrics to the trackers.

A tracker that fails mid-run (a tracking server gone) is dropped with one warning: a run is
never lost to its bookkeeping. Closing drains what is left, so the last epoch's metrics are
logged before the trackers finish.
"""

from __future__ import annotations

import threading

import ray

from ..runtime.console import warn
from . import Tracker
from .monitor import describe_failure
from .progress import ProgressView


class RunWatcher:
    def __init__(self, monitor, trackers: list[Tracker], view: ProgressView | None, interval_s: float = 0.5):
        self.monitor, self.trackers, self.view, self.interval_s = monitor, list(trackers), view, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vcl-dist-run-watcher", daemon=True)
        self._lock = threading.Lock()
        self._lost = False

    def start(self) -> "RunWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.drain()

    def drain(self) -> None:
        with self._lock:
            if self._lost:
                return
            try:
                records = ray.get(self.monitor.drain.remote(), timeout=60)
            except Exception as err:  # noqa: BLE001 - the monitor gone: training goes on, unwatched
                warn(f"run progress and tracking stopped: {err}")
                self._lost = True
                self._stop.set()
                return
            for record in records:
                if self.view is not None:
                    self.view.show(record)
                if record["kind"] in ("step", "epoch"):
                    self._to_trackers("log_metrics", record["metrics"], record["step"])
                if record["kind"] == "epoch":
                    self._to_trackers("flush")

    def _to_trackers(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001
                warn(f"{tracker.name} tracking stopped: {err}")
                self.trackers.remove(tracker)

    def close(self) -> None:
        """Stop the thread and drain the rest (the trackers stay open: see `finish`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.drain()
        if self.view is not None:
            self.view.close()

    def log_artifacts(self, local_folder: str, artifact_path: str) -> None:
        self._to_trackers("log_artifacts", local_folder, artifact_path)

    def finish(self, failed: bool) -> None:
        self._to_trackers("finish", failed)
        self.trackers = []

    def failure_lines(self, ranks: list[int] | None = None) -> list[str]:
        try:
            return describe_failure(ray.get(self.monitor.failure_context.remote(), timeout=30), ranks)
        except Exception:  # noqa: BLE001 - the message goes out without them
            return []
