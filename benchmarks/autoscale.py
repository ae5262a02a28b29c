"""The autoscaler under a vcl-dist run: a timeline of nodes, workers and steps, and what the
nodes cost.

    python benchmarks/autoscale.py [--scenario from-zero|elastic] [--idle-timeout-minutes M] [--epochs N] [overrides …]

Ray's local autoscaling cluster (the real autoscaler over the fake multi-node provider: nodes
are processes on this machine) is built from ``ray-cluster.yaml``'s node types (or ``--config
cluster/gcp.yaml``'s) by ``tests/support/autoscaling_cluster.py`` (a GPU stands in as the custom resource
``train_gpu``, which each training worker asks for). With no worker node running, a run is
submitted with ``ray job submit``; the script waits until every worker node is given back.

``from-zero`` (the default): the built-in default as configured. Prints submit → first worker
node, → first step, → job done, → last worker node gone, and the worker node-seconds: in all,
while the run ran, and idle after it (what a cloud bill counts beyond the run's need), with the
config's own idle timeout unless ``--idle-timeout-minutes`` says otherwise.

``elastic``: ``train.min_workers=1`` of 2 workers, with nodes that take 60 s to boot
(``tests/support/preemptible_provider.py``), as a cloud's take minutes, and an autoscaler that acts every
25 s (Ray's default is 5 s; the fake provider launches one node per update), so train nodes come
25 s apart rather than at once: the run starts on the first and grows to 2 on the second. Once
it has checkpointed at 2 workers, one of its train nodes is reclaimed through the provider as a
cloud reclaims a spot VM (its processes killed at once, the node no longer listed); the run goes
on from its latest checkpoint on the remaining node, the autoscaler launches a node in its place
and the run grows back to 2. (Ray Train waits up to 60 s for a worker group's resources before
it tries a smaller group; with nodes that boot in a minute rather than several, the job sets
that wait, ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, to 10 s to keep the cloud's order of
events.) Checked, with a non-zero exit when not: every epoch done; world sizes 1 → 2, ending at
2; after the preemption, a group of 1 from a checkpoint, then of 2; a new node in place of the
preempted one; every row of every epoch trained on exactly once (``run.trained_rows_log``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from autoscaling_cluster import (  # noqa: E402
    GPU_STAND_IN,
    LocalAutoscalingCluster,
    TrainingJob,
    checkpoint_metrics,
    checkpoint_world_sizes,
    read_node_types,
    training_worker_nodes,
    wait_for,
)
from ports import free_port  # noqa: E402


def timeline(cluster: LocalAutoscalingCluster, every_s: float, events: list[tuple[float, str]] = ()) -> list[str]:
    """The node counts by type whenever they changed (and at least every ``every_s`` seconds),
    with the run's ``events`` at their moments."""
    rows, last, last_at = [], None, float("-inf")
    pending = sorted(events)
    for sample in cluster.samples:
        counts = tuple(sample.workers.get(kind, 0) for kind in cluster.worker_types)
        while pending and pending[0][0] <= sample.at:
            at, event = pending.pop(0)
            rows.append(f"| {at:7.1f} | " + " | ".join(str(c) for c in (last or counts)) + f" | {event} |")
            last_at = at
        if counts != last or sample.at - last_at >= every_s:
            rows.append(f"| {sample.at:7.1f} | " + " | ".join(str(c) for c in counts) + " | |")
            last, last_at = counts, sample.at
    rows.extend(f"| {at:7.1f} | " + " | ".join(str(c) for c in last or ()) + f" | {event} |" for at, event in pending)
    return rows


def print_timeline(cluster: LocalAutoscalingCluster, idle_minutes: float, events: list[tuple[float, str]]) -> None:
    print(f"\nidle timeout {idle_minutes:g} min; times from the cluster's start (s)")
    print("| t | " + " | ".join(cluster.worker_types) + " | run |")
    print("|---:|" + "---:|" * len(cluster.worker_types) + "---|")
    print("\n".join(timeline(cluster, every_s=30, events=events)))


ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]")
GROUP_STARTED = re.compile(r"vcl-dist: (\d+) workers? on (\d+) nodes?")
STEP = re.compile(r"vcl-dist: epoch (\d+)/(\d+) (step \d+/\d+|done)")


def run_events(job: TrainingJob) -> list[tuple[float, str]]:
    """The run's moments from its output: each worker group's start (its size) with its first
    step, and each epoch's end."""
    events, group_first_step, seen = [], False, set()
    for at, line in job.lines:
        # The fake nodes share one session folder, so each node's log monitor forwards every
        # worker's lines: the same line (with its worker's pid) comes once per node, some of
        # them folded by Ray's log deduplication ("[repeated 2x across cluster]").
        line = REPEATED.sub("", ANSI.sub("", line))
        if line in seen:
            continue
        seen.add(line)
        if match := GROUP_STARTED.search(line):
            events.append((at, f"group of {match[1]} workers on {match[2]} nodes starts"))
            group_first_step = True
        elif match := STEP.search(line):
            if match[3] == "done":
                events.append((at, f"epoch {match[1]}/{match[2]} done"))
            elif group_first_step:
                events.append((at, f"first step of the group: epoch {match[1]}, {match[3]}"))
                group_first_step = False
    return events


def from_zero(cluster: LocalAutoscalingCluster, args, idle_minutes: float) -> None:
    name = f"autoscale-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run folder each time
    job = TrainingJob(cluster, ROOT, [*args.overrides, f"run.storage_path={args.runs}", f"run.name={name}"],
                      job_id=name, epochs=args.epochs)
    run = job.wait()
    if run.returncode != 0:
        raise SystemExit(f"the run failed (exit {run.returncode}); its output ends:\n{run.output[-3000:]}")
    wait_for(lambda: cluster.workers_at_last_sample() == 0, idle_minutes * 60 + 300, "the idle nodes to go")
    gone = cluster.now()
    cluster.stop()
    first_node = next((s.at for s in cluster.samples if s.at >= run.submitted and sum(s.workers.values())), float("nan"))
    print_timeline(cluster, idle_minutes, [(run.submitted, "submitted"), *run_events(job), (run.finished, "job done")])
    print(f"\nsubmit at {run.submitted:.1f} s → first worker node +{first_node - run.submitted:.1f} s → first step "
          f"+{run.first_step - run.submitted:.1f} s → job done +{run.finished - run.submitted:.1f} s → last worker node "
          f"gone +{gone - run.submitted:.1f} s ({gone - run.finished:.1f} s after the job)")
    print_cost(cluster, run.submitted, run.finished, gone)


def print_cost(cluster: LocalAutoscalingCluster, submitted: float, finished: float, gone: float) -> None:
    total = cluster.node_seconds(submitted, gone)
    during = cluster.node_seconds(submitted, finished)
    print(f"worker node-seconds: {total:.0f} in all, {during:.0f} while the job ran, {total - during:.0f} idle after it "
          f"({(total - during) / max(total, 1e-9):.0%} of the bill)")


GROUP_START_TIMEOUT_S = 10
ELASTIC_UPDATE_INTERVAL_S = 25  # > Ray Train's 20-s view of the cluster (its AutoscalingCoordinator's tick)
EARLY_IN_EPOCH_STEPS = 4  # of 8 at 2 workers (1,024 rows, 64 a worker): the reclaim lands mid-epoch
ELASTIC_NODE_BOOT_S = 60  # > GROUP_START_TIMEOUT_S + that 20-s view: the run restarts on what is left first


def elastic(cluster: LocalAutoscalingCluster, args, idle_minutes: float) -> None:
    name = f"elastic-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder, rows = Path(args.runs) / name, Path(args.runs) / f"{name}-rows"
    rows_per_epoch = 1024
    job = TrainingJob(cluster, ROOT, [
        f"data.shapes.num_train={rows_per_epoch}", *args.overrides, f"run.storage_path={args.runs}", f"run.name={name}",
        "train.num_workers=2", "train.min_workers=1", "train.max_failures=3", "train.elastic_resize_interval_s=5",
        "train.checkpoint_every_steps=4", "run.checkpoints_to_keep=1000", f"run.trained_rows_log={rows}"],
        job_id=name, epochs=args.epochs, env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(GROUP_START_TIMEOUT_S)})
    events = [(job.submitted, "submitted (train.min_workers=1, train.num_workers=2)")]
    # The reclaim: once the run has checkpointed at 2 workers early in an epoch (most of the
    # epoch's steps still to come), one of its train nodes goes.
    wait_for(lambda: any(m.get("world_size") == 2 and 0 < m.get("epoch_step", 0) <= EARLY_IN_EPOCH_STEPS
                         for m in checkpoint_metrics(run_folder)) or not job.running(), 900,
             "a checkpoint at 2 workers early in an epoch")
    if not job.running():
        raise SystemExit("the run ended before it checkpointed at 2 workers (more epochs: --epochs); its output ends:\n"
                         + "\n".join(line for _, line in job.lines[-40:]))
    victim = training_worker_nodes(cluster)[0]
    preempted = cluster.now()
    cluster.preempt(victim)
    events.append((preempted, f"node …{victim[-5:]} preempted"))
    run = job.wait()
    log = Path(args.runs) / f"{name}-job.log"
    log.write_text("".join(f"{at:7.1f} {line}\n" for at, line in job.lines))
    print(f"the job's output, with the cluster clock's moments: {log}")
    events += [*run_events(job), (run.finished, f"job done (exit {run.returncode})")]
    if run.returncode == 0:
        wait_for(lambda: cluster.workers_at_last_sample() == 0, idle_minutes * 60 + 300, "the idle nodes to go")
    gone = cluster.now()
    cluster.stop()
    print_timeline(cluster, idle_minutes, events)
    sizes = checkpoint_world_sizes(run_folder)
    groups = [event.split()[2] if event.startswith("group of") else "preempted" for _, event in sorted(events)
              if event.startswith(("group of", "node …"))]
    print(f"\nworker groups, in order (their sizes): {' → '.join(groups)}")
    print(f"world size of each checkpoint, in order: {sizes}")
    if run.returncode != 0:
        raise SystemExit(f"the run failed (exit {run.returncode}); its output ends:\n{run.output[-3000:]}")
    print_cost(cluster, run.submitted, run.finished, gone)
    failures = elastic_failures(cluster, run_folder, rows, sizes, victim, preempted, args.epochs, rows_per_epoch)
    resumed = next((event for at, event in sorted(events) if at > preempted and event.startswith("first step")), None)
    if resumed is None or "epoch 1, step 1/" in resumed:
        failures.append(f"after the preemption the run did not go on from a checkpoint: {resumed}")
    after = groups[groups.index("preempted") + 1:]
    if "1" not in after or after[-1] != "2":
        failures.append(f"worker groups after the preemption {after}: not 1 on the remaining node, then 2")
    print("\n".join(["", *[f"FAILED: {f}" for f in failures]]) if failures else "\nchecks passed: every epoch done; "
          "started at 1 worker and grew to 2; after the preemption went on from a checkpoint on the remaining node, a new "
          "node replaced the preempted one and the run grew back to 2; every row of every epoch trained on once")
    if failures:
        raise SystemExit(1)


def elastic_failures(cluster, run_folder: Path, rows: Path, sizes: list[int], victim: str, preempted: float,
                     epochs: int, rows_per_epoch: int) -> list[str]:
    """What the elastic run's records contradict of the scenario (nothing, when it went right)."""
    from vcl_dist.train.trained_rows import trained_rows

    failures = []
    history = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    if [m["epoch"] for m in history] != list(range(1, epochs + 1)):
        failures.append(f"epochs {[m['epoch'] for m in history]}")
    if not (sizes and sizes[0] == 1 and 2 in sizes and sizes[-1] == 2 and history[-1]["world_size"] == 2):
        failures.append(f"world sizes of the checkpoints {sizes}: not 1, then 2, ending at 2")
    if not any(m["resumed_from_step"] > 0 for m in history if m["world_size"] == 2):
        failures.append("no epoch at 2 workers resumed from a checkpoint")
    train_types = {kind for kind, spec in cluster.worker_types.items() if GPU_STAND_IN in spec["resources"]}
    before = {n for s in cluster.samples if s.at < preempted for n, kind in s.ids.items() if kind in train_types}
    after = {n for s in cluster.samples if s.at > preempted + 5 for n, kind in s.ids.items() if kind in train_types}
    if victim in after or not after - before:
        failures.append(f"train nodes before the preemption {sorted(before)}, after {sorted(after)}: no replacement")
    trained = trained_rows(rows)  # for every step, the lines of the last worker group that trained it
    if sorted(trained) != list(range(epochs)):
        failures.append(f"trained-rows log covers epochs {sorted(trained)}")
    for epoch, keys in sorted(trained.items()):
        if len(keys) != len(set(keys)):
            failures.append(f"epoch {epoch + 1}: {len(keys) - len(set(keys))} rows trained on twice")
        # Rows that do not fill a last step on every worker (under a global batch) are left out.
        if not rows_per_epoch - 128 < len(set(keys)) <= rows_per_epoch:
            failures.append(f"epoch {epoch + 1}: {len(set(keys))} of {rows_per_epoch} rows trained on")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["from-zero", "elastic"], default="from-zero")
    parser.add_argument("--config", default=str(ROOT / "ray-cluster.yaml"))
    parser.add_argument("--idle-timeout-minutes", type=float, default=None, help="default: the config's own")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 (from-zero), 24 (elastic)")
    parser.add_argument("--runs", default="/tmp/vcl-autoscale-runs", help="run.storage_path of the submitted run")
    parser.add_argument("overrides", nargs="*", help="config overrides for the run (e.g. data.shapes.num_train=2000)")
    args = parser.parse_args()
    args.epochs = args.epochs or (24 if args.scenario == "elastic" else 1)
    config = Path(args.config)
    elastic_run = args.scenario == "elastic"
    cluster = LocalAutoscalingCluster(config, idle_timeout_minutes=args.idle_timeout_minutes, gcs_port=free_port(),
                                      dashboard_port=free_port(), fast_node_death=elastic_run,
                                      update_interval_s=ELASTIC_UPDATE_INTERVAL_S if elastic_run else 1,
                                      node_boot_s=ELASTIC_NODE_BOOT_S if elastic_run else 0)
    idle_minutes = args.idle_timeout_minutes if args.idle_timeout_minutes is not None else \
        yaml.safe_load(config.read_text())["idle_timeout_minutes"]
    head, workers = read_node_types(config)
    print(f"node types of {config.name}: head {head}; " + "; ".join(
        f"{name} {spec['resources']} (min {spec['min_workers']}, max {spec['max_workers']})" for name, spec in workers.items()),
        flush=True)
    cluster.start()
    try:
        wait_for(lambda: len(cluster.samples) >= 2, 60, "the node sampler")
        (elastic if elastic_run else from_zero)(cluster, args, idle_minutes)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
