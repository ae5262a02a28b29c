"""A chaos soak: one training run under a seeded storm of faults, checked against an
uninterrupted run of the same config.

    python benchmarks/chaos.py [--minutes 5] [--seed 0] [--out FILE] [--workdir DIR]

The cluster is Ray's on one machine (``ray.cluster_utils.Cluster``): a head that runs no tasks
and two 3-CPU worker nodes, one 2-CPU training worker on each (``train.min_workers=1``,
``train.keep_global_batch=true``: a group that lost a node goes on with one worker that also
takes the absent worker's rows, so the losses stay those of two). The run's storage is S3 —
moto's server behind a TCP proxy that this script can take down — and the worker nodes'
local disk (``TMPDIR``, where a worker writes a checkpoint before uploading it) is a small
tmpfs (mounting it needs root). The data is the built-in shapes in 16 Parquet shards. The run
is started as users start it, ``python jobs/train.py`` joined to the cluster, and resumed with
``--resume`` when its driver is killed; a worker group that Ray Train tries to start on a node
that just died gives up after 20 s (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``; Ray's 60 s is
for nodes an autoscaler is still booting).

The faults, drawn from ``--seed``: a training worker SIGKILLed; a worker node's raylet
SIGKILLed (the node dies; a new one joins once the run trains on without it); a node reclaimed
(removed) and replaced; the worker nodes' disk filled just before a checkpoint is written;
the S3 endpoint gone for 30 s; the driver SIGKILLed and the job started again with
``--resume``; and last, a data shard overwritten with garbage mid-epoch. Each fires a drawn
number of steps after the previous one's recovery (2–5 in a short soak, 2–5 minutes' worth in a
long one), at a drawn moment: inside a step, while a checkpoint is written, or in the first
steps of the worker group that the previous fault restarted. ``--minutes 5`` draws one fault of
each kind; longer soaks draw one every 2–5 minutes of training. The run trains in float64
(``train.dtype``): across a change of world size only the order of float sums differs, and
float32's rounding grows through training past any fixed tolerance.

Checked, with exit code 1 on any miss: the run finishes; every row of every epoch is trained
on exactly once (``run.trained_rows_log``), except rows of the garbled shard, which are
counted as bad; every step's loss equals the uninterrupted run's within 1e-6 up to the first
step with a bad row; no worker group resumed from a checkpoint left half-written. Prints the
faults as a table: when each fired, the time the run lost to it, whether it survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

KINDS = ("worker_kill", "raylet_kill", "node_reclaim", "disk_full", "s3_outage", "driver_kill")
LAST_KIND = "shard_unreadable"  # last: the losses are compared up to the first bad row
MOMENTS = ("in a step", "checkpoint write", "after a restart")
CHECKPOINT_EVERY = 4
NODE_CPUS = 3
OUTAGE_S = 30.0
DISK_FULL_HOLD_S = 15.0
TOLERANCE = 1e-6


# ---------------------------------------------------------------- the schedule


@dataclass
class Fault:
    kind: str
    gap: int  # fires once the run has trained this many steps past the previous fault's recovery ...
    moment: str  # ... at this moment
    delay: float  # fraction of a step to wait before firing "in a step"
    fired_s: float | None = None
    step: int | None = None
    lost_s: float | None = None
    survived: bool = False
    note: str = ""


def fault_count(minutes: float) -> int:
    """One of each kind for a short soak, one every 3.5 minutes on average for a long one."""
    return max(len(KINDS) + 1, round(minutes / 3.5))


def draw_schedule(seed: int, minutes: float, step_seconds: float) -> list[Fault]:
    """The faults of a soak: the kinds in shuffled rounds, the garbled shard last, each 2–5
    steps after the previous one's recovery in a short soak (the first after 10), 2–5 minutes
    of training in a long one. "After a restart" fires in the first steps of the group that
    the previous fault restarted, whatever the gap."""
    rng = random.Random(seed)
    count = fault_count(minutes)
    kinds: list[str] = []
    while len(kinds) < count - 1:
        kinds += rng.sample(KINDS, len(KINDS))
    kinds = kinds[: count - 1] + [LAST_KIND]
    unit = 1.0 if count == len(KINDS) + 1 else 60.0 / step_seconds
    faults = []
    for i, kind in enumerate(kinds):
        moment = "checkpoint write" if kind == "disk_full" else rng.choice(MOMENTS)
        if kind == LAST_KIND or (i == 0 and moment == "after a restart"):
            moment = "in a step"
        gap = 10 if i == 0 and unit == 1.0 else max(1, round(rng.uniform(2, 5) * unit))
        faults.append(Fault(kind, gap, moment, rng.random()))
    return faults


# ---------------------------------------------------------------- what the run did


class RunProgress:
    """The run's steps as its workers log them (``run.trained_rows_log``): which worker group
    trained which steps, with how many workers, seen at what time."""

    def __init__(self, folder: Path):
        self.folder, self.offsets = folder, {}
        self.groups: dict[float, dict] = {}  # group -> {"pids", "steps", "first_s"}
        self.max_step, self.step_times = 0, []  # the times new highest steps were seen

    def poll(self) -> None:
        for path in sorted(self.folder.glob("*.jsonl")):
            with path.open() as file:
                file.seek(self.offsets.get(path, 0))
                text = file.read()
            complete = text[: text.rfind("\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete.encode())
            for line in complete.splitlines():
                record = json.loads(line)
                group = self.groups.setdefault(record["group"], {"pids": set(), "steps": set(), "first_s": time.monotonic()})
                group["pids"].add(path.name)
                group["steps"].add(record["step"])
                if record["step"] > self.max_step:
                    self.max_step = record["step"]
                    self.step_times.append(time.monotonic())

    @property
    def latest_group(self) -> dict | None:
        return self.groups[max(self.groups)] if self.groups else None

    def step_seconds(self) -> float:
        recent = self.step_times[-6:]
        return (recent[-1] - recent[0]) / (len(recent) - 1) if len(recent) > 1 else 0.5


# ---------------------------------------------------------------- the S3 endpoint's outage


class OutageProxy:
    """A TCP proxy in front of the S3 server that can go away (connections refused, open ones
    cut) and come back on the same port: an endpoint outage without losing the bucket."""

    def __init__(self, target_port: int):
        from ports import free_port

        self.target, self.port = target_port, free_port()
        self.up, self.connections, self.lock = threading.Event(), set(), threading.Lock()
        self.listener = None
        self.bring_up()

    def bring_up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.up.set()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def go_down(self) -> None:
        self.up.clear()
        self.listener.close()
        with self.lock:
            for conn in list(self.connections):
                _close(conn)
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self.up.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.connections |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                _close(conn)
                with self.lock:
                    self.connections.discard(conn)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


# ---------------------------------------------------------------- the nodes' full disk


class SmallDisk:
    """A tmpfs the worker nodes use as their local disk, and a ballast file that fills it."""

    def __init__(self, path: Path, mebibytes: int = 256):
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mebibytes}m", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"chaos: cannot mount a tmpfs for the nodes' disk (needs root): {result.stderr.strip()}")
        self.path, self.ballast = path, path / "ballast"

    def fill(self) -> None:
        stats = os.statvfs(self.path)
        free = stats.f_bavail * stats.f_frsize
        with open(self.ballast, "wb") as file:
            os.posix_fallocate(file.fileno(), 0, max(0, free - 32 * 1024))

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


# ---------------------------------------------------------------- the soak


def training_overrides(data: Path, epochs: int, seed: int, rows_log: Path) -> list[str]:
    return [
        "data.source=parquet", f"data.train_path={data}/train", f"data.val_path={data}/val",
        "data.image_size=32", "data.preprocess_batch_size=64", "data.max_bad_fraction=0.1",
        "model.embed_dim=32", "model.image.width=8", "model.text.hidden_size=32", "model.text.intermediate_size=64",
        "model.text.num_heads=2", "model.text.num_layers=1",
        # float64: at another world size only the order of float sums differs, and float32's
        # rounding would grow through training (a hinge's choice of negative flips on a near tie).
        "train.dtype=float64", "train.num_workers=2", "train.min_workers=1", "train.cpus_per_worker=2", "train.keep_global_batch=true",
        "train.elastic_resize_interval_s=2", "train.max_failures=-1", "train.batch_size=64", "train.warmup_steps=2",
        f"train.epochs={epochs}", f"train.seed={seed}", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
        "run.checkpoints_to_keep=100000", f"run.trained_rows_log={rows_log}", "run.log_every_steps=4",
        "run.progress_every_s=10",
    ]


def write_shards(folder: Path, shards: int = 16) -> int:
    """The built-in shapes (768 training rows) as ``shards`` Parquet files; returns the row count."""
    import pyarrow.parquet as pq

    from vcl_dist.data.shapes import ensure_shapes_dataset

    source = ensure_shapes_dataset(folder / "cache", 768, 64, 32, 2, seed=0)
    table = pq.read_table(sorted((source / "train").glob("*.parquet")))
    (folder / "train").mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // shards)
    for i in range(shards):
        pq.write_table(table.slice(i * per, per), folder / "train" / f"part-{i:05d}.parquet")
    shutil.copytree(source / "val", folder / "val")
    shutil.copy(source / "classes.txt", folder / "val" / "classes.txt")
    return table.num_rows


class Soak:
    def __init__(self, args):
        from ray.cluster_utils import Cluster
        from s3_server import moto_s3

        self.args, self.rng = args, random.Random(args.seed + 1)
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="vcl-chaos-"))
        self.disk = SmallDisk(self.work / "node-disk")
        self.s3 = moto_s3()
        endpoint = self.s3.__enter__()
        self.proxy = OutageProxy(int(endpoint.rsplit(":", 1)[1]))
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="chaos")
        self.rows = write_shards(self.work / "data")
        # The nodes' processes inherit TMPDIR (their checkpoints are written there first);
        # Ray's own files stay on the real disk.
        os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
        with self.on_node_disk():
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            self.nodes = [self.cluster.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
            self.cluster.wait_for_nodes()
        self.driver: subprocess.Popen | None = None
        self.driver_logs: list[Path] = []

    def close(self) -> None:
        """Everything the soak started, each step whatever the one before did."""
        steps = [lambda: self.driver and self.driver.poll() is None and self.driver.kill(), self.cluster.shutdown,
                 lambda: self.s3.__exit__(None, None, None), self.disk.unmount]
        for step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 # the others still run
                print(f"chaos: cleaning up: {type(err).__name__}: {err}", file=sys.stderr)

    # -- the driver

    def start_driver(self, overrides: list[str], resume: bool = False) -> subprocess.Popen:
        log = self.work / f"driver-{len(self.driver_logs)}.log"
        self.driver_logs.append(log)
        # A group that Ray Train tries to start on a node that just died waits this long before
        # it tries a smaller one (Ray's default, 60 s, is for nodes an autoscaler is still booting).
        env = {**os.environ, "RAY_ADDRESS": self.cluster.address, "PYTHONUNBUFFERED": "1",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
        command = [sys.executable, str(ROOT / "jobs/train.py"), *(["--resume"] if resume else []), *overrides]
        self.driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return self.driver

    def run_reference(self, overrides: list[str]) -> tuple[list[dict], float]:
        started = time.monotonic()
        driver = self.start_driver([*overrides, f"run.storage_path={self.work / 'reference'}", "run.name=reference"])
        if driver.wait() != 0:
            raise SystemExit(f"chaos: the uninterrupted run failed: see {self.driver_logs[-1]}")
        return read_history(self.work / "reference" / "reference" / "metrics.jsonl"), time.monotonic() - started

    # -- the faults

    def node_with_a_worker(self):
        return self.rng.choice(self.nodes)

    def replace_node(self, gone) -> None:
        self.nodes.remove(gone)
        with self.on_node_disk():
            self.nodes.append(self.cluster.add_node(num_cpus=NODE_CPUS))

    @contextmanager
    def on_node_disk(self) -> Iterator[None]:
        """TMPDIR on the small disk while nodes start here (their processes inherit it), as it was after."""
        saved = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.disk.path)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TMPDIR")
            else:
                os.environ["TMPDIR"] = saved


def read_history(path: Path, filesystem=None) -> list[dict]:
    if filesystem is None:
        text = path.read_text()
    else:
        with filesystem.open_input_stream(str(path)) as stream:
            text = stream.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def processes_titled(word: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if word in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return sorted(pids)


class Injector:
    """Fires the schedule's faults into the running soak and times the run's recovery."""

    def __init__(self, soak: Soak, progress: RunProgress, overrides: list[str], deadline: float):
        self.soak, self.progress, self.overrides, self.deadline = soak, progress, overrides, deadline
        self.started = time.monotonic()
        self.restarts_seen = 0

    def wait(self, condition, what: str, timeout: float | None = None) -> bool:
        end = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        while time.monotonic() < end:
            self.progress.poll()
            if condition():
                return True
            if self.soak.driver.poll() is not None and self.soak.driver.returncode != 0:
                raise RuntimeError(f"the run's driver exited with {self.soak.driver.returncode} while waiting for {what}")
            if self.soak.driver.poll() is not None:
                return condition()
            time.sleep(0.1)
        return False

    def fire_all(self, schedule: list[Fault]) -> None:
        for fault in schedule:
            self.progress.poll()
            due = self.progress.max_step + fault.gap
            if fault.moment != "after a restart" and not self.wait(lambda: self.progress.max_step >= due, f"step {due}"):
                fault.note = "the run ended first"
                return
            if self.soak.driver.poll() is not None:
                fault.note = "the run ended first"
                return
            self.reach_moment(fault)
            self.fire(fault)

    def reach_moment(self, fault: Fault) -> None:
        seconds = self.progress.step_seconds()
        if fault.moment == "checkpoint write":
            # The step before a checkpoint: the disk fills as that step trains; other faults
            # land just after the checkpoint's step, while it is written and uploaded.
            target = CHECKPOINT_EVERY - 1 if fault.kind == "disk_full" else 0
            self.wait(lambda: self.progress.max_step % CHECKPOINT_EVERY == target, "a checkpoint step")
            if fault.kind != "disk_full":
                time.sleep(self.soak.rng.uniform(0.0, 0.3))
        elif fault.moment == "after a restart":  # the previous fault's group has just trained past it
            time.sleep(fault.delay * seconds)
        else:
            start = self.progress.max_step
            self.wait(lambda: self.progress.max_step > start, "the next step")
            time.sleep(fault.delay * seconds)

    def fire(self, fault: Fault) -> None:
        soak, progress = self.soak, self.progress
        progress.poll()
        before_step, before_group = progress.max_step, max(progress.groups)
        fault.step, fault.fired_s = before_step, time.monotonic() - self.started
        fired = time.monotonic()
        print(f"chaos: {fault.fired_s:6.1f}s step {before_step}: {fault.kind} ({fault.moment})", flush=True)
        lost = 0.0
        if fault.kind == "worker_kill":
            workers = processes_titled("RayTrainWorker")
            os.kill(soak.rng.choice(workers), signal.SIGKILL)
        elif fault.kind in ("raylet_kill", "node_reclaim"):
            node = soak.node_with_a_worker()
            if fault.kind == "raylet_kill":
                node.kill_raylet()
                soak.cluster.remove_node(node, allow_graceful=False)
            else:
                soak.cluster.remove_node(node, allow_graceful=True)
            # The run goes on with one worker for a few steps, then a new node joins and the group grows back.
            self.wait(lambda: progress.max_step > before_step + 1, "training without the node")
            lost += time.monotonic() - fired
            soak.replace_node(node)
            added, step_added = time.monotonic(), progress.max_step
            grown = self.wait(lambda: len(progress.latest_group["pids"]) == 2 and progress.max_step > step_added,
                              "the group to grow back", timeout=180)
            fault.note = "grew back to 2 workers" if grown else "did not grow back within 180 s"
            lost += time.monotonic() - added - progress.step_seconds() * max(0, progress.max_step - step_added)
            fault.lost_s = lost
            fault.survived = grown
            return
        elif fault.kind == "disk_full":
            # Full while the next step trains and its checkpoint is written, and for a while
            # after: the restarted group finds the disk full too, until it is freed.
            soak.disk.fill()
            self.wait(lambda: max(progress.groups) != before_group or progress.max_step > before_step, "the checkpoint step",
                      timeout=60)
            time.sleep(DISK_FULL_HOLD_S)
            soak.disk.free()
            fault.note = f"full for {time.monotonic() - fired:.0f} s"
        elif fault.kind == "s3_outage":
            soak.proxy.go_down()
            time.sleep(OUTAGE_S)
            soak.proxy.bring_up()
            fault.note = f"endpoint down {OUTAGE_S:.0f} s"
        elif fault.kind == "driver_kill":
            soak.driver.kill()
            soak.driver.wait()
            time.sleep(2)
            soak.start_driver([*self.overrides_for_resume()], resume=True)
            fault.note = "resubmitted with --resume"
        elif fault.kind == LAST_KIND:
            shard = sorted((soak.work / "data" / "train").glob("*.parquet"))[soak.rng.randrange(16)]
            size = shard.stat().st_size
            shard.write_bytes(random.Random(0).randbytes(size))
            fault.note = f"{shard.name} garbled"
            fault.survived = self.wait(lambda: progress.max_step > before_step or self.finished(), "a step after the shard")
            fault.lost_s = 0.0
            return
        recovered = self.wait(lambda: progress.max_step > before_step or self.finished(), "recovery")
        fault.lost_s = time.monotonic() - fired - progress.step_seconds() if recovered else None
        fault.lost_s = max(0.0, fault.lost_s) if fault.lost_s is not None else None
        fault.survived = recovered

    def finished(self) -> bool:
        """The run ended well (a fault in its last step has no later step to recover in)."""
        return self.soak.driver.poll() == 0

    def overrides_for_resume(self) -> list[str]:
        keep = ("run.name=", "run.storage_path=", "s3.")
        return [o for o in self.overrides if o.startswith(keep)]


# ---------------------------------------------------------------- the checks


def check_rows(rows_log: Path, all_keys: set[str], shard_keys: set[str], epochs: int) -> tuple[list[str], int]:
    """Misses of the row audit, and the first step with a bad row (0 when none)."""
    from vcl_dist.train.trained_rows import final_lines, trained_rows

    misses = []
    trained, skipped = trained_rows(rows_log), trained_rows(rows_log, "skipped")
    if sorted(trained) != list(range(epochs)):
        misses.append(f"epochs trained: {sorted(trained)}, expected {epochs}")
    for epoch, keys in sorted(trained.items()):
        if len(keys) != len(set(keys)):
            misses.append(f"epoch {epoch + 1}: {len(keys) - len(set(keys))} rows trained twice")
        missing = all_keys - set(keys)
        if set(keys) - all_keys:
            misses.append(f"epoch {epoch + 1}: rows that are not in the data")
        if missing - shard_keys:
            misses.append(f"epoch {epoch + 1}: {len(missing - shard_keys)} rows never trained on")
        if len(missing) != len(skipped.get(epoch, [])):
            misses.append(f"epoch {epoch + 1}: {len(missing)} rows not trained, {len(skipped.get(epoch, []))} counted bad")
    first_bad = min((line["step"] for line in final_lines(rows_log) if line.get("skipped")), default=0)
    return misses, first_bad


def check_losses(history: list[dict], reference: list[dict], first_bad: int) -> tuple[list[str], int, float]:
    """Misses, the last step compared, and the largest difference of a step's loss."""
    steps = [loss for record in history for loss in record["step_losses"]]
    expected = [loss for record in reference for loss in record["step_losses"]]
    upto = (first_bad - 1) if first_bad else len(expected)
    if len(steps) != len(expected):
        return [f"{len(steps)} step losses, the uninterrupted run has {len(expected)}"], 0, float("nan")
    differences = [abs(a - b) for a, b in zip(steps[:upto], expected[:upto])]
    worst = max(differences, default=0.0)
    if worst <= TOLERANCE:
        return [], upto, worst
    first = next(i for i, d in enumerate(differences) if d > TOLERANCE)
    return [f"step losses differ by up to {worst:.2e} (> {TOLERANCE}) before the first bad row, first at step "
            f"{first + 1}: {steps[first]!r} against {expected[first]!r}"], upto, worst


def check_checkpoints(soak: Soak, run: str) -> tuple[list[str], int]:
    """Misses (a resumed-from checkpoint that is half-written), and how many half-written ones the storage holds."""
    import pyarrow.fs as pafs

    from vcl_dist.config import S3Config
    from vcl_dist.storage import filesystem_for
    from vcl_dist.train.checkpoint import checkpoint_problem

    filesystem, root = filesystem_for(run, S3Config(endpoint_url=soak.endpoint))
    folders = [i.path for i in filesystem.get_file_info(pafs.FileSelector(root)) if i.base_name.startswith("checkpoint_")]
    broken = {f.rsplit("/", 1)[-1] for f in folders if checkpoint_problem(filesystem, f)}
    chosen = set()
    for log in soak.driver_logs[1:]:
        for line in log.read_text(errors="replace").splitlines():
            if "resumed from the checkpoint checkpoint_" in line:
                chosen.add(line.split("resumed from the checkpoint ", 1)[1].split()[0])
    misses = [f"resumed from the half-written checkpoint {name}" for name in sorted(chosen & broken)]
    return misses, len(broken)


def check_driver_logs(soak: Soak, schedule: list[Fault]) -> list[str]:
    """Misses in what the drivers said: the run's watcher lost (progress and tracking stop when
    its monitor dies with a node), or a resumed driver that did not release the resources Ray
    Train kept for the killed one (the resumed run would wait 3 minutes)."""
    logs = [log.read_text(errors="replace") for log in soak.driver_logs[1:]]
    misses = ["the run's progress and tracking stopped" for text in logs if "progress and tracking stopped" in text]
    kills = sum(f.kind == "driver_kill" and f.fired_s is not None for f in schedule)
    released = sum("released the workers' resources that Ray Train still held" in text for text in logs[1:])
    if released < kills:
        misses.append(f"{kills - released} resumed driver(s) did not release the killed run's resources")
    return misses


def print_table(schedule: list[Fault]) -> None:
    print("\n| # | fault | moment | step | fired at (s) | run time lost (s) | survived | note |")
    print("|---:|---|---|---:|---:|---:|---|---|")
    for i, f in enumerate(schedule, 1):
        fired = f"{f.fired_s:.1f}" if f.fired_s is not None else "–"
        lost = f"{f.lost_s:.1f}" if f.lost_s is not None else "–"
        print(f"| {i} | {f.kind.replace('_', ' ')} | {f.moment} | {f.step if f.step is not None else '–'} | {fired} | "
              f"{lost} | {'yes' if f.survived else 'NO'} | {f.note} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="the soak's length (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="draws the faults and the run's seed")
    parser.add_argument("--workdir", help="where the data, logs and the reference run go (default: a new temp folder)")
    parser.add_argument("--step-seconds", type=float, default=0.8, help="a step's expected time, to size the run")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Stopped from outside (SIGTERM): unmount the nodes' disk and shut the cluster down on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soak = Soak(args)
    try:
        return soak_and_check(soak, args)
    finally:
        soak.close()


def soak_and_check(soak: Soak, args) -> int:
    steps_per_epoch = soak.rows // 64
    # Training time: the soak's minutes less about 25 s of restart per fault.
    train_s = max(60.0, args.minutes * 60 - 25 * fault_count(args.minutes))
    epochs = max(3, round(train_s / args.step_seconds / steps_per_epoch))
    rows_log = soak.work / "rows"
    overrides = training_overrides(soak.work / "data", epochs, args.seed, soak.work / "reference-rows")
    print(f"chaos: {epochs} epochs of {steps_per_epoch} steps; the uninterrupted run first", flush=True)
    reference, reference_s = soak.run_reference(overrides)
    schedule = draw_schedule(args.seed, args.minutes, args.step_seconds)
    run = "s3://chaos/runs"
    overrides = [*training_overrides(soak.work / "data", epochs, args.seed, rows_log), f"run.storage_path={run}",
                 "run.name=soak", f"s3.endpoint_url={soak.endpoint}"]
    progress = RunProgress(rows_log)
    rows_log.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    soak.start_driver(overrides)
    injector = Injector(soak, progress, overrides, deadline=started + max(6 * args.minutes * 60, 900))
    injector.fire_all(schedule)
    remaining = max(1.0, injector.deadline - time.monotonic())
    try:
        code = soak.driver.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        soak.driver.kill()
        code = None
    soak_s = time.monotonic() - started

    misses = [] if code == 0 else [f"the run did not finish (driver exit {code}; log {soak.driver_logs[-1]})"]
    misses += [f"fault {i} ({f.kind}) not survived" for i, f in enumerate(schedule, 1) if not f.survived]
    all_keys, shard_keys = shard_key_sets(soak, schedule)
    row_misses, first_bad = check_rows(rows_log, all_keys, shard_keys, epochs)
    misses += row_misses
    upto, worst = 0, float("nan")
    if code == 0:
        from vcl_dist.config import S3Config
        from vcl_dist.storage import filesystem_for

        filesystem, root = filesystem_for(f"{run}/soak", S3Config(endpoint_url=soak.endpoint))
        history = read_history(Path(f"{root}/metrics.jsonl"), filesystem)
        (soak.work / "soak-metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
        loss_misses, upto, worst = check_losses(history, reference, first_bad)
        misses += loss_misses
    checkpoint_misses, half_written = check_checkpoints(soak, f"{run}/soak")
    misses += checkpoint_misses + check_driver_logs(soak, schedule)

    print_table(schedule)
    injected = sum(f.fired_s is not None for f in schedule)
    print(f"\nfaults injected {injected} of {len(schedule)}, survived {sum(f.survived for f in schedule)}; "
          f"soak {soak_s:.0f} s, the uninterrupted run {reference_s:.0f} s; "
          f"{epochs} epochs × {soak.rows} rows audited; step losses equal within {worst:.1e} for steps 1–{upto} "
          f"(first bad row at step {first_bad or '–'}); half-written checkpoints left {half_written}, resumed from 0"
          if not checkpoint_misses else "")
    for miss in misses:
        print(f"MISS: {miss}")
    return 1 if misses else 0


def shard_key_sets(soak: Soak, schedule: list[Fault]) -> tuple[set[str], set[str]]:
    """Every training row's key, and those of the shard the soak garbled (read from the run's
    reference copy of the data: the garbled file no longer says)."""
    import pyarrow.parquet as pq

    from vcl_dist.data.shapes import ensure_shapes_dataset

    source = ensure_shapes_dataset(soak.work / "data" / "cache", 768, 64, 32, 2, seed=0)
    table = pq.read_table(sorted((source / "train").glob("*.parquet")), columns=["key"])
    keys = [str(k) for k in table.column(0).to_pylist()]
    garbled = [f.note.split()[0] for f in schedule if f.kind == LAST_KIND and f.fired_s is not None]
    per = -(-len(keys) // 16)
    shard = set()
    for name in garbled:
        index = int(name.removeprefix("part-").removesuffix(".parquet"))
        shard |= set(keys[index * per:(index + 1) * per])
    return set(keys), shard


if __name__ == "__main__":
    sys.exit(main())
