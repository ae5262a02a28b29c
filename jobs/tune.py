"""Search hyperparameters: ``python jobs/tune.py [--config FILE] [--resume] [section.key=value ...]``.

Each trial is a distributed training run (Ray Train inside a Ray Tune trial) with values of
``tune.space`` sampled by Optuna or at random; ASHA stops weak trials early. Prints a ranked
table of the best trials and writes trials.csv, best_config.yaml, tune_result.json and a plot
to the experiment folder (local or s3://). ``--resume`` continues the newest (or the named,
``tune.name=…``) experiment without rerunning finished trials. Relative paths resolve against
the folder the command is started from. Which Ray it joins: as jobs/train.py --help says
(RAY_ADDRESS, else a running ``ray start`` cluster, else a new local Ray; RAY_ADDRESS=local
forces a new one). Exit code 2 for a bad config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tune.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    parser.add_argument("--top", type=int, default=5, help="trials shown in the ranked table")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. tune.num_samples=16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vcl_dist.runtime.console import run_job

    return run_job(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from vcl_dist.config import load_config
    from vcl_dist.tune import check_tune_config

    cfg = load_config(args.config, args.overrides)
    check_tune_config(cfg)  # a bad search space stops here, before Ray starts

    from vcl_dist.runtime.console import warn
    from vcl_dist.runtime.tables import print_trials
    from vcl_dist.tune import run_tune

    outcome = run_tune(cfg, resume=args.resume)
    print_trials(outcome.trials[: args.top], list(cfg.tune.searched), cfg.tune.metric)
    print(f"experiment: {outcome.experiment_path}")
    if outcome.best_config_path:
        print(f"best config: {outcome.best_config_path}  (train it: python jobs/train.py --config <that file>)")
    if outcome.summary.get("best_checkpoint"):
        print(f"best checkpoint: {outcome.summary['best_checkpoint']}")
    if outcome.summary["interrupted"]:
        warn(f"the search was interrupted; continue it with: python jobs/tune.py --resume tune.name={outcome.name} "
             "(and the same config and overrides)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
