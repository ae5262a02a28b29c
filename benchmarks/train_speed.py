"""What Ray costs and what scaling gives: vcl-dist's training against a plain ``torchrun`` loop
doing the same work, weak scaling across workers and nodes, and how long training waits for its input.

    python benchmarks/train_speed.py [--epochs 4] [--skip-scaling] [--skip-comparison] [--skip-input-wait]
                                     [--startup-repeats 3] [overrides …]

**Against torchrun.** The built-in default (its Parquet shards, model, triplet loss, global batch
128, ``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs, AdamW and schedule) run
(a) by ``jobs/train.py`` — Ray Data streaming the planned rows, Ray Train's DDP workers, evaluation
and a checkpoint after each epoch — and (b) by ``benchmarks/plain_ddp.py`` under ``torchrun``: the
same model, loss, optimizer and step function fed by a torch ``DataLoader`` with
``train.cpus_per_worker`` processes per rank doing the same preprocessing. Steady state: the
median over epochs 2… of each epoch's samples/s over its training loop (evaluation and checkpoints
not counted; vcl-dist's ``samples_per_s`` of ``metrics.jsonl``, the plain loop's own clock). Start-up:
process start → the first step done (vcl-dist: its driver's first progress line, which shows
rank 0's first step within the 0.5 s it polls; the plain loop: rank 0 prints after its step).

**Start-up on a running cluster** (``ray start --head``, then the job connects to it, as ``ray job
submit`` jobs do): ``--startup-repeats`` starts of each (the plain loop's before the cluster
starts), medians; with Ray Train's own account of each worker group's start (placement group,
worker actors, train context, launching the training function), from its controller's debug log.

**Weak scaling.** ``jobs/train.py`` with 1, 2 and 4 workers of 1 CPU (torch threads 1) and 64 rows
per worker per step (global batch 64·W), then 2 workers on 2 nodes of a local
``ray.cluster_utils.Cluster`` (a head holding one CPU for the data tasks, two 1-CPU nodes,
``train.placement_strategy=STRICT_SPREAD``): step time, samples/s per worker and the efficiency
(per-worker samples/s against 1 worker's), and the step's shares: waiting for data, the lock-step
all-reduce (``sync``: waiting for the slowest worker), the embedding gather, backward (DDP's
gradient all-reduce overlaps it and is counted in it), forward. Medians over epochs 2….

**Input wait.** ``jobs/train.py`` at the default settings, for the built-in default model and for
a ViT-B/32 image tower at 224 px reading crawl-like JPEGs (256–512 px a side, as
``benchmarks/data_speed.py`` makes them; ``data.source=parquet``): steady samples/s next to the
share of step time spent waiting for the next batch (``data_wait_fraction``) and the first
batch's wait, medians of epochs 2…. The goal: under 5 %.

Every run is a subprocess with its own fresh folder under a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_STEP = {"vcl-dist": re.compile(r"epoch 1/\d+ step \d+/"), "plain": re.compile(r"^first step done")}
# Where a vcl-dist run's start-up goes: the moments its output shows, in order.
MILESTONES = {"Ray started": re.compile(r"vcl-dist: (started a local Ray|connected to|joined the Ray cluster)"),
              "worker group started": re.compile(r"Started training worker group"),
              "model built, data planned": re.compile(r"vcl-dist: \d+ workers on \d+ node"),
              "first step done": FIRST_STEP["vcl-dist"]}


def timed_run(command: list[str], markers: dict[str, re.Pattern], env: dict, log: Path,
              limit_s: float = 1800) -> tuple[list[str], dict[str, float], float]:
    """Run ``command``; its output lines, the seconds from its start to the first line matching
    each of ``markers`` (NaN for one never seen), and the whole run's seconds."""
    started = time.perf_counter()
    lines: list[str] = []
    seen: dict[str, float] = {}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        timer = threading.Timer(limit_s, proc.kill)
        timer.start()
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            for name, pattern in markers.items():
                if name not in seen and pattern.search(line):
                    seen[name] = time.perf_counter() - started
        timer.cancel()
    log.write_text("\n".join(lines) + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} … failed (exit {proc.returncode}); its output: {log}")
    return lines, {name: seen.get(name, float("nan")) for name in markers}, time.perf_counter() - started


def run_env(threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # an embedded local Ray for each run
    return env


def vcl_dist_epochs(run_folder: Path) -> list[dict]:
    with open(run_folder / "metrics.jsonl") as file:
        return [json.loads(line) for line in file if line.strip()]


def steady(values: list[float]) -> float:
    """The median of the epochs after the first (the first holds the start-up)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def milestone_steps(milestones: dict[str, float]) -> list[str]:
    """``"name +seconds since the previous milestone"`` for each milestone, in order."""
    before, steps = 0.0, []
    for name, at in milestones.items():
        steps.append(f"{name} +{at - before:.1f} s")
        before = at
    return steps


def compare_with_torchrun(work: Path, epochs: int, overrides: list[str]) -> list[str]:
    python = sys.executable
    plain_lines, plain_seen, plain_wall = timed_run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "benchmarks/plain_ddp.py",
         f"train.epochs={epochs}", *overrides], {"first step": FIRST_STEP["plain"]}, run_env(), work / "plain.log")
    plain_start = plain_seen["first step"]
    plain = [json.loads(line)["samples_per_s"] for line in plain_lines if line.startswith('{"epoch"')]

    run = work / "runs" / "speed"
    _, milestones, vcl_wall = timed_run(
        [python, "jobs/train.py", f"run.storage_path={work / 'runs'}", "run.name=speed", f"train.epochs={epochs}", *overrides],
        MILESTONES, run_env(), work / "vcl-dist.log")
    vcl_start = milestones["first step done"]
    steps = milestone_steps(milestones)
    history = vcl_dist_epochs(run)
    vcl = [m["samples_per_s"] for m in history]
    ratio = steady(vcl) / steady(plain)
    return [
        f"\nThe built-in default, 2 workers × 1 CPU, global batch 128, {epochs} epochs (steady state: median of epochs 2–{epochs})",
        "| | samples/s per epoch | steady samples/s | start-up (process → first step) | whole run |",
        "|---|---|---:|---:|---:|",
        *(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {steady(values):.1f} | {start:.1f} s | {wall:.0f} s |"
          for name, values, start, wall in (("plain torchrun + DataLoader", plain, plain_start, plain_wall),
                                            ("vcl-dist (jobs/train.py)", vcl, vcl_start, vcl_wall))),
        f"vcl-dist / plain, steady samples/s: **{ratio:.3f}×**; start-up difference {vcl_start - plain_start:+.1f} s "
        f"(vcl-dist's whole run also evaluates and checkpoints after every epoch)",
        f"vcl-dist's start-up, as its output shows it: {', '.join(steps)}; the first batch waited "
        f"{history[0]['data_wait_first_batch_s']:.1f} s",
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_up_on_a_running_cluster(work: Path, overrides: list[str], repeats: int) -> list[str]:
    """The start-up when a Ray cluster is already running (``ray start --head``, as before ``ray
    job submit``): the job connects instead of starting one. ``repeats`` runs of a few steps
    each, against as many starts of the plain loop (one epoch each) in the same minutes; medians,
    and where each vcl-dist start went — its output's moments and Ray Train's own account of its
    worker group's start (its controller's debug log)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = run_env()
    plain_starts = []
    for repeat in range(repeats):
        _, seen, _ = timed_run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "benchmarks/plain_ddp.py",
             "train.epochs=1", *overrides], {"first step": FIRST_STEP["plain"]}, env, work / f"plain-start-{repeat}.log")
        plain_starts.append(seen["first step"])
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths have a length limit
    subprocess.run([ray_cli, "start", "--head", "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats",
                    f"--port={free_port()}", f"--temp-dir={temp}"], env=env, check=True, capture_output=True)
    starts, rows = [], []
    try:
        for repeat in range(repeats):
            _, milestones, _ = timed_run(
                [sys.executable, "jobs/train.py", f"run.storage_path={work / 'runs'}", f"run.name=attached-{repeat}",
                 "train.epochs=1", "train.max_steps=3", *overrides], MILESTONES, {**env, "RAY_ADDRESS": "auto"},
                work / f"attached-{repeat}.log")
            starts.append(milestones["first step done"])
            rows.append(f"| {repeat + 1} | {plain_starts[repeat]:.1f} s | {starts[-1]:.1f} s | {', '.join(milestone_steps(milestones))} |")
        worker_group = worker_group_start_phases(temp)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)
    plain, vcl = statistics.median(plain_starts), statistics.median(starts)
    return [
        f"\nStart-up on a running cluster (ray start --head --num-cpus=3, then RAY_ADDRESS=auto), {repeats} starts each:",
        "| start | plain torchrun | vcl-dist | vcl-dist's moments (+ seconds since the one before) |",
        "|---:|---:|---:|---|",
        *rows,
        f"median: plain {plain:.1f} s, vcl-dist {vcl:.1f} s: **{vcl - plain:+.1f} s**",
        *(f"Ray Train's worker group start, run {i + 1} (its controller's log): {phases}" for i, phases in enumerate(worker_group)),
    ]


# Ray Train's controller logs each phase of a worker group's start at DEBUG (worker_group.py).
WORKER_GROUP_PHASES = re.compile(r"\[Worker Group Initialization\] (Placement group ready|\d+ worker actors created|"
                                 r"Train context initialized on workers|Train function launched on workers|"
                                 r"Worker group startup completed) in ([\d.]+)s")


def worker_group_start_phases(temp: Path) -> list[str]:
    """Per run (controller log), the worker group's start phases from Ray Train's debug log."""
    found = []
    for log in sorted((temp / "session_latest" / "logs" / "train").glob("ray-train-sys-controller-*.log"),
                      key=lambda path: path.stat().st_mtime):
        phases = [f"{m.group(1)} {float(m.group(2)):.1f} s" for m in WORKER_GROUP_PHASES.finditer(log.read_text())]
        if phases:
            found.append(", ".join(phases))
    return found


SHARES = ("data_wait", "sync", "gather", "forward", "backward", "optimizer")

MULTI_NODE = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from vcl_dist.config import load_config
from vcl_dist.train.runner import run_training
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
outcome = run_training(load_config("jobs/configs/default.yaml", sys.argv[1:]))
print("HISTORY " + json.dumps(outcome.history))
ray.shutdown()
cluster.shutdown()
"""


def scaling_row(label: str, history: list[dict], single: float | None) -> tuple[str, float]:
    per_worker = steady([m["samples_per_s_per_worker"] for m in history])
    step_ms = 1000 * steady([m["step_time_s"] for m in history])
    shares = " | ".join(f"{100 * steady([m[f'step_{name}_fraction'] for m in history]):.1f}%" for name in SHARES)
    efficiency = f"{per_worker / single:.2f}" if single else "1.00"
    return (f"| {label} | {history[-1]['world_size']} | {history[-1].get('worker_nodes', 1)} | {step_ms:.0f} ms | "
            f"{per_worker:.1f} | {efficiency} | {shares} |"), per_worker


def weak_scaling(work: Path, epochs: int, overrides: list[str]) -> list[str]:
    lines = [f"\nWeak scaling: 64 rows per worker per step, 1 CPU and 1 torch thread per worker, {epochs} epochs "
             f"(medians of epochs 2–{epochs})",
             "| run | workers | nodes | step | samples/s per worker | efficiency | " + " | ".join(SHARES) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(SHARES)]
    single = None
    common = [f"train.epochs={epochs}", "train.cpus_per_worker=1", *overrides]
    for workers in (1, 2, 4):
        name = f"weak-{workers}"
        timed_run([sys.executable, "jobs/train.py", f"run.storage_path={work / 'runs'}", f"run.name={name}",
                   f"train.num_workers={workers}", f"train.batch_size={64 * workers}", *common],
                  {}, run_env(), work / f"{name}.log")
        row, per_worker = scaling_row(f"one node, {workers} worker{'s' * (workers > 1)}", vcl_dist_epochs(work / "runs" / name), single)
        single = single or per_worker
        lines.append(row)
    output, _, _ = timed_run([sys.executable, "-c", MULTI_NODE, f"run.storage_path={work / 'runs'}", "run.name=weak-2-nodes",
                              "train.num_workers=2", "train.batch_size=128", "train.placement_strategy=STRICT_SPREAD", *common],
                             {}, {**run_env(), "PYTHONPATH": str(ROOT)}, work / "weak-2-nodes.log")
    history = json.loads(next(line for line in output if line.startswith("HISTORY "))[len("HISTORY "):])
    lines.append(scaling_row("two local nodes, 1 worker each", history, single)[0])
    return lines


def input_wait(work: Path, epochs: int, overrides: list[str]) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_speed import crawl_like_dataset

    jpegs = crawl_like_dataset(Path.home() / ".cache" / "vcl-dist", 1024, 128)
    runs = {
        "built-in default (small ResNet, 48 px shapes)": [],
        "ViT-B/32 at 224 px, crawl-like JPEGs": [
            "model.image.arch=vit_b_32", "data.image_size=224", "data.source=parquet",
            f"data.train_path={jpegs / 'train'}", f"data.val_path={jpegs / 'val'}", "train.batch_size=32"],
    }
    lines = [f"\nInput wait at the default settings ({epochs} epochs; medians of epochs 2–{epochs})",
             "| model | global batch | steady samples/s | data wait (share of step time) | first batch wait (s) |",
             "|---|---:|---:|---:|---:|"]
    for index, (label, settings) in enumerate(runs.items()):
        name = f"input-wait-{index}"
        timed_run([sys.executable, "jobs/train.py", f"run.storage_path={work / 'runs'}", f"run.name={name}",
                   f"train.epochs={epochs}", *settings, *overrides], {}, run_env(), work / f"{name}.log", limit_s=3600)
        history = vcl_dist_epochs(work / "runs" / name)
        batch = next((s.split("=")[1] for s in settings if s.startswith("train.batch_size=")), "128")
        lines.append(f"| {label} | {batch} | {steady([e['samples_per_s'] for e in history]):.1f} | "
                     f"{steady([e['data_wait_fraction'] for e in history]):.1%} | "
                     f"{steady([e['data_wait_first_batch_s'] for e in history]):.2f} |")
    return lines


def prepare_built_in_data(overrides: list[str]) -> None:
    """Generate the built-in shards once, before any run is timed (every run then finds them)."""
    sys.path.insert(0, str(ROOT))
    from vcl_dist.config import load_config
    from vcl_dist.data.shapes import ensure_shapes_dataset

    cfg = load_config(ROOT / "jobs/configs/default.yaml", overrides)
    s = cfg.data.shapes
    ensure_shapes_dataset(Path(cfg.data.cache_dir).expanduser(), s.num_train, s.num_val, s.image_size,
                          s.val_captions_per_image, s.seed)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: not a count (0 or more)")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--scaling-epochs", type=int, default=3)
    parser.add_argument("--skip-comparison", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-input-wait", action="store_true")
    parser.add_argument("--startup-repeats", type=non_negative_int, default=3,
                        help="starts of each on a running cluster (0: none)")
    parser.add_argument("--keep", default=None, help="a folder for the runs and their logs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. data.shapes.num_train=2000)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="vcl-train-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"runs and logs in {work}; {os.cpu_count()} CPUs", flush=True)
    prepare_built_in_data(args.overrides)
    lines: list[str] = []
    if not args.skip_comparison:
        lines += compare_with_torchrun(work, args.epochs, args.overrides)
        print("\n".join(lines), flush=True)
    if args.startup_repeats:
        print("\n".join(start_up_on_a_running_cluster(work, args.overrides, args.startup_repeats)), flush=True)
    if not args.skip_scaling:
        scaling = weak_scaling(work, args.scaling_epochs, args.overrides)
        print("\n".join(scaling), flush=True)
    if not args.skip_input_wait:
        print("\n".join(input_wait(work, args.scaling_epochs, args.overrides)), flush=True)


if __name__ == "__main__":
    main()
