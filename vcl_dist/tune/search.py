"""Hyperparameter search with Ray Tune; every trial is one distributed Ray Train run.

The Train V2 way: Tune runs a driver function per trial (`run_trial`), which builds the
trial's config from the sampled values and calls `vcl_dist.train.runner.run_training`
with ``TuneReportCallback``, so each epoch's rank-0 report reaches Tune (and ASHA) as one
iteration. The dataset, tokenizer and row count are prepared once by the driver and handed to
every trial: all trials share one data pipeline definition. What the search leaves behind is
`.results`.
"""

from __future__ import annotations

import json
import re
import time

from ..config import Config, ConfigError, Distribution, override_values
from ..runtime.console import say
from ..storage import display_uri, exists, filesystem_for, newest_folder, read_text
from ..train.metrics import HISTORY_ONLY, reported_metric_names
from .results import TRAIN_RUNS, TuneOutcome, write_outputs

# Driver functions only wait on their TorchTrainer; the CPUs they would hold are better spent
# on training workers and data tasks.
TRIAL_DRIVER_CPUS = 0.01


def check_tune_config(cfg: Config) -> None:
    """Stop a bad search before any trial starts.

    Raises:
        ConfigError: an empty space, a key that names no setting, a distribution whose values
            the setting cannot take, or an unknown metric (one line).
    """
    space = cfg.tune.searched
    if not space:
        raise ConfigError("tune.space is empty: name at least one key to search")
    for key, dist in space.items():
        for value in ([*dist.values] if dist.type == "choice" else [dist.example(), _upper(dist)]):
            try:
                override_values(cfg, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.space[{key}]: {err}") from None
    if cfg.train.checkpoint_every_steps or cfg.train.checkpoint_every_minutes or cfg.train.max_steps:
        # Tune counts every report as an iteration (ASHA's clock); trials report once per epoch.
        raise ConfigError("train.checkpoint_every_steps, train.checkpoint_every_minutes and train.max_steps are not for "
                          "tune trials: leave them unset")
    if cfg.tune.metric not in reported_metric_names(cfg):
        raise ConfigError(f"tune.metric: {cfg.tune.metric!r} is not reported; one of {', '.join(sorted(reported_metric_names(cfg)))}")


def _upper(dist: Distribution):
    return int(dist.high) - 1 if dist.type == "randint" else dist.high


def search_space(cfg: Config) -> dict:
    from ray import tune

    domains = {
        "uniform": lambda d: tune.uniform(d.low, d.high),
        "loguniform": lambda d: tune.loguniform(d.low, d.high),
        "randint": lambda d: tune.randint(int(d.low), int(d.high)),
        "choice": lambda d: tune.choice(d.values),
    }
    return {key: domains[dist.type](dist) for key, dist in cfg.tune.searched.items()}


def trial_concurrency(cfg: Config, resources: dict) -> int:
    """Trials that fit side by side: the cluster's GPUs (or CPUs, keeping one for data tasks)
    divided by one trial's training workers. More would only queue idle trial drivers."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    if cfg.train.use_gpu is not False and resources.get("GPU", 0) >= cfg.train.num_workers:
        return max(1, int(resources["GPU"] // cfg.train.num_workers))
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int((resources.get("CPU", 1) - 1) // per_trial))


def run_trial(sampled: dict, *, base: dict, inputs, runs_uri: str) -> None:
    """One trial (a Tune function trainable): a full training run with the sampled values.

    What a trial run again by ``--resume`` does (Tune keeps no checkpoint of its own for a trial,
    so its iteration count starts again at 1):

    - interrupted or errored before its training run finished: it starts over at epoch 1, in a
      fresh run folder (``<trial>-2``, ``<trial>-3``, …; the unfinished one stays for inspection),
      so Tune's iterations and ASHA's rungs count the epochs this attempt trained;
    - its training run had finished (``result.json`` written; the search was stopped before Tune
      recorded the trial's end): it is not trained again — its epochs are reported to Tune from
      the run's ``metrics.jsonl``, one iteration each, the checkpoint with the last.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.run_result import RESULT_FILE
    from ..train.runner import TrialInfo, run_training

    cfg = override_values(Config.model_validate(base), sampled)
    trial = tune.get_context().get_trial_id()
    storage, root = filesystem_for(runs_uri, cfg.s3)
    attempts = trial_attempts(storage, root, trial)
    if attempts and exists(storage, f"{attempts[-1]}/{RESULT_FILE}"):
        for metrics in finished_run_reports(storage, attempts[-1]):
            tune.report(metrics)
        return
    cfg.run.name = trial if not attempts else f"{trial}-{len(attempts) + 1}"
    cfg.run.storage_path = runs_uri
    # Tracked as a run of its own (MLflow experiment / W&B group: the search's name).
    experiment = runs_uri.rstrip("/").rsplit("/", 2)[-2]
    run_training(cfg, inputs, callbacks=[TuneReportCallback()], trial=TrialInfo(experiment, sampled))


def trial_attempts(storage, root: str, trial: str) -> list[str]:
    """The training run folders of ``trial`` under ``root``, first attempt first."""
    import pyarrow.fs as pafs

    entries = storage.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    attempt = {e.path: (1 if e.base_name == trial else int(e.base_name.rsplit("-", 1)[1]))
               for e in entries if e.type == pafs.FileType.Directory
               and (e.base_name == trial or re.fullmatch(rf"{re.escape(trial)}-\d+", e.base_name))}
    return sorted(attempt, key=attempt.get)


def finished_run_reports(storage, run_path: str) -> list[dict]:
    """What a finished training run reported to Tune, epoch by epoch, rebuilt from its files:
    ``metrics.jsonl`` and, with the last epoch, the checkpoint of ``result.json``."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from ..train.run_result import METRICS_FILE, RESULT_FILE

    epochs = [json.loads(line) for line in read_text(storage, f"{run_path}/{METRICS_FILE}").splitlines() if line.strip()]
    reports = [{k: v for k, v in epoch.items() if k not in HISTORY_ONLY} for epoch in epochs]
    checkpoint = json.loads(read_text(storage, f"{run_path}/{RESULT_FILE}")).get("checkpoint")
    if reports and checkpoint:
        reports[-1][CHECKPOINT_PATH_KEY] = checkpoint.removeprefix("s3://")  # as Ray Train reports it: a path in storage
    return reports


def run_tune(cfg: Config, resume: bool = False) -> TuneOutcome:
    """Run (or resume) the search that ``cfg.tune`` describes and write its outputs."""
    from ray import tune

    from ..ray_cluster import connect_ray, cpus_for_training
    from ..train.run_inputs import prepare_inputs

    check_tune_config(cfg)
    import ray

    say(connect_ray(cpus_for_training(cfg.train.num_workers, cfg.train.cpus_per_worker)))
    storage_uri = cfg.tune.storage_path or cfg.run.storage_path
    storage, storage_path = filesystem_for(storage_uri, cfg.s3)
    name = cfg.tune.name or (latest_experiment(storage, storage_path) if resume else None) or f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = f"{storage_path}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), inputs=prepare_inputs(cfg),
                             runs_uri=f"{storage_uri.rstrip('/')}/{name}/{TRAIN_RUNS}"),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    if resume:
        if not tune.Tuner.can_restore(experiment, storage_filesystem=storage):
            raise FileNotFoundError(f"no tune run to resume at {display_uri(experiment, storage)}")
        say(f"resuming {display_uri(experiment, storage)}")
        # Finished trials keep their results; unfinished and errored ones run again.
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage)
    else:
        concurrency = trial_concurrency(cfg, ray.cluster_resources())
        say(f"{cfg.tune.num_samples} trials, up to {concurrency} at a time, in {display_uri(experiment, storage)}")
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                search_alg=_search_algorithm(cfg), scheduler=_scheduler(cfg), max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage, verbose=1),
        )
    grid = tuner.fit()
    return write_outputs(cfg, grid, storage, experiment)


def _search_algorithm(cfg: Config):
    if cfg.tune.search == "random":
        return None  # Tune's default: independent random samples of the space
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed))


def _scheduler(cfg: Config):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One iteration = one epoch's report; a trial runs at least grace_period epochs.
    # stop_last_trials=False: a trial that reaches the last epoch is left to finish on its own
    # (writing result.json and exporting its model) instead of being killed at its last report.
    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs, stop_last_trials=False,
                         grace_period=min(cfg.tune.grace_period, cfg.train.epochs), reduction_factor=cfg.tune.reduction_factor)


def latest_experiment(storage, path: str) -> str | None:
    """The name of the newest ``tune-*`` experiment under ``path`` (names carry their start time)."""
    newest = newest_folder(storage, path, "tune-")
    return newest.rsplit("/", 1)[-1] if newest else None


