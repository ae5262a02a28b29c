"""Train a dual encoder: ``python jobs/train.py [--config FILE] [section.key=value ...]``.

Runs on the built-in shapes dataset by default. ``--resume`` continues a run (``run.name``, or the
one with the newest checkpoint in ``run.storage_path``) from its latest checkpoint, with its own saved config plus the
overrides given (say, ``train.epochs=12`` to train longer). Relative paths in the config are
resolved against the folder the command is started from.

Which Ray: RAY_ADDRESS=<host>:<port> (set by ``ray job submit``) joins that cluster; otherwise
the cluster ``ray start`` last started on this machine, if it runs; otherwise a new local Ray.
RAY_ADDRESS=local always starts a new local Ray. A cluster too small for the run (training
workers + 1 CPU for data) and without an autoscaler stops the job at once, in one line.

A ``run.name`` that exists already is continued only with ``--resume`` (without it: exit 2).
Shows progress inside each epoch (a live bar in a terminal, a line every ``run.progress_every_s``
seconds in a log) and logs to ``run.trackers`` (TensorBoard event files in ``<run>/tensorboard``
by default). Prints the run folder and a summary; exit code 2 for a bad config, 1 for a failed
run (the error in one line, then where the failed workers' logs are and the last metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue run.name (default: the run with the newest checkpoint) from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. loss.margin=0.3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from vcl_dist.config import load_config

    cfg = load_config(args.config, args.overrides)  # before Ray is even imported

    from ray.train import TrainingFailedError

    from vcl_dist.runtime.console import say
    from vcl_dist.runtime.tables import print_summary
    from vcl_dist.train.fatal import RunEndedByFatalError
    from vcl_dist.train.run_result import training_failure_message
    from vcl_dist.train.runner import resume_config, run_training

    if args.resume:
        cfg = resume_config(cfg, args.overrides)
        say(f"resuming run {cfg.run.name} in {cfg.run.storage_path}")
    try:
        outcome = run_training(cfg, resume=args.resume)
    except (TrainingFailedError, RunEndedByFatalError) as err:  # the latter: bad data, a NaN step (not retried)
        reason = training_failure_message(err) if isinstance(err, TrainingFailedError) else str(err)
        print(f"vcl-dist: training failed: {reason}", file=sys.stderr)
        for line in getattr(err, "details", []):  # where the logs are, the last metrics reported
            print(f"  {line}", file=sys.stderr)
        return 1
    print_summary(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
