"""The autoscaler under a vcl-dist run, with the idle timeout of ``ray-cluster.yaml`` itself: a
timeline of nodes, the run's moments, and what the nodes cost (issue 19).

    python benchmarks/autoscale.py [--idle-timeout-minutes M] [--epochs 1] [overrides …]

Ray's local autoscaling cluster (the real autoscaler over the fake multi-node provider: nodes
are processes on this machine) is built from ``ray-cluster.yaml``'s node types by
``tests/autoscaling_cluster.py`` (a GPU stands in as the custom resource ``train_gpu``). With no
worker node running, the built-in default is submitted with ``ray job submit`` (each training
worker asks for the stand-in), and the script waits until every worker node is given back. It
prints the node count by type over time, submit → first worker node, → first step, → job done,
→ last worker node gone, and the worker node-seconds: in all, while the run ran, and idle after
it (what a cloud bill counts beyond the run's need). ``--idle-timeout-minutes`` overrides the
config's (10 minutes there) for a shorter look.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from autoscaling_cluster import LocalAutoscalingCluster, read_node_types, submit_training, wait_for  # noqa: E402
from ports import free_port  # noqa: E402


def timeline(cluster: LocalAutoscalingCluster, every_s: float) -> list[str]:
    """The node counts by type whenever they changed, and at least every ``every_s`` seconds."""
    rows, last, last_at = [], None, float("-inf")
    for sample in cluster.samples:
        counts = tuple(sample.workers.get(kind, 0) for kind in cluster.worker_types)
        if counts != last or sample.at - last_at >= every_s:
            rows.append(f"| {sample.at:7.1f} | " + " | ".join(str(c) for c in counts) + " |")
            last, last_at = counts, sample.at
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "ray-cluster.yaml"))
    parser.add_argument("--idle-timeout-minutes", type=float, default=None, help="default: the config's own")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", default="/tmp/vcl-autoscale-runs", help="run.storage_path of the submitted run")
    parser.add_argument("overrides", nargs="*", help="config overrides for the run (e.g. data.shapes.num_train=2000)")
    args = parser.parse_args()
    config = Path(args.config)
    cluster = LocalAutoscalingCluster(config, idle_timeout_minutes=args.idle_timeout_minutes, gcs_port=free_port(),
                                      dashboard_port=free_port())
    idle_minutes = args.idle_timeout_minutes if args.idle_timeout_minutes is not None else \
        yaml.safe_load(config.read_text())["idle_timeout_minutes"]
    head, workers = read_node_types(config)
    print(f"node types of {config.name}: head {head}; " + "; ".join(
        f"{name} {spec['resources']} (min {spec['min_workers']}, max {spec['max_workers']})" for name, spec in workers.items()),
        flush=True)
    cluster.start()
    try:
        wait_for(lambda: len(cluster.samples) >= 2, 60, "the node sampler")
        name = f"autoscale-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run folder each time
        run = submit_training(cluster, ROOT, [*args.overrides, f"run.storage_path={args.runs}", f"run.name={name}"],
                              job_id="autoscale", epochs=args.epochs)
        if run.returncode != 0:
            raise SystemExit(f"the run failed (exit {run.returncode}); its output ends:\n{run.output[-3000:]}")
        wait_for(lambda: cluster.workers_at_last_sample() == 0, idle_minutes * 60 + 300, "the idle nodes to go")
        gone = cluster.now()
    finally:
        cluster.stop()
    first_node = next((s.at for s in cluster.samples if s.at >= run.submitted and sum(s.workers.values())), float("nan"))
    print(f"\nidle timeout {idle_minutes:g} min; times from the cluster's start (s)")
    print("| t | " + " | ".join(cluster.worker_types) + " |")
    print("|---:|" + "---:|" * len(cluster.worker_types))
    print("\n".join(timeline(cluster, every_s=30)))
    print(f"\nsubmit at {run.submitted:.1f} s → first worker node +{first_node - run.submitted:.1f} s → first step "
          f"+{run.first_step - run.submitted:.1f} s → job done +{run.finished - run.submitted:.1f} s → last worker node "
          f"gone +{gone - run.submitted:.1f} s ({gone - run.finished:.1f} s after the job)")
    total = cluster.node_seconds(run.submitted, gone)
    during = cluster.node_seconds(run.submitted, run.finished)
    print(f"worker node-seconds: {total:.0f} in all, {during:.0f} while the job ran, {total - during:.0f} idle after it "
          f"({(total - during) / max(total, 1e-9):.0%} of the bill)")


if __name__ == "__main__":
    main()
