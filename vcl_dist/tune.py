"""Hyperparameter search with Ray Tune; every trial is one distributed Ray Train run.

The Train V2 way: Tune runs a driver function per trial (:func:`run_trial`), which builds the
trial's config from the sampled values and calls :func:`~vcl_dist.train.runner.run_training`
with ``TuneReportCallback``, so each epoch's rank-0 report reaches Tune (and ASHA) as one
iteration. The dataset, tokenizer and row count are prepared once by the driver and handed to
every trial: all trials share one data pipeline definition.

Outputs, in the experiment folder (local or ``s3://``): ``trials.csv`` (every trial: its
values, final and best metric, epochs run, why it stopped), ``best_config.yaml`` (the best
trial's resolved config, ready for ``jobs/train.py --config``), ``tune_result.json`` (best
trial, metric, checkpoint and exported model) and ``metric_vs_params.png``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass

from .config import Config, ConfigError, Distribution, dump_config, override_values
from .storage import display_uri, filesystem_for, write_bytes_atomically, write_text_atomically

TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
SUMMARY = "tune_result.json"
PLOT = "metric_vs_params.png"
TRAIN_RUNS = "train_runs"  # the trials' Ray Train run folders, inside the experiment folder
# Driver functions only wait on their TorchTrainer; the CPUs they would hold are better spent
# on training workers and data tasks.
TRIAL_DRIVER_CPUS = 0.01


def reported_metrics(cfg: Config) -> set[str]:
    """The metric names every epoch's report carries (see ``train.loop``), for checking ``tune.metric``."""
    names = {"train_loss", "samples_per_s", "data_wait_fraction"}
    for direction in ("i2t", "t2i"):
        names |= {f"val_{direction}_median_rank", f"val_{direction}_mean_rank"}
        for k in cfg.eval.recall_ks:
            names |= {f"val_{direction}_r{k}", f"val_{direction}_class_r{k}"}
    return names | {"val_rsum", "val_zero_shot_acc"}


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
    if cfg.train.checkpoint_every_steps or cfg.train.max_steps:
        # Tune counts every report as an iteration (ASHA's clock); trials report once per epoch.
        raise ConfigError("train.checkpoint_every_steps and train.max_steps are not for tune trials: leave them unset")
    if cfg.tune.metric not in reported_metrics(cfg):
        raise ConfigError(f"tune.metric: {cfg.tune.metric!r} is not reported; one of {', '.join(sorted(reported_metrics(cfg)))}")


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
    """One trial (a Tune function trainable): a full training run with the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train.runner import run_training

    cfg = override_values(Config.model_validate(base), sampled)
    cfg.run.name = tune.get_context().get_trial_id()
    cfg.run.storage_path = runs_uri
    run_training(cfg, inputs, callbacks=[TuneReportCallback()])


@dataclass
class TuneOutcome:
    experiment_path: str
    name: str
    trials: list[dict]  # best first
    best_config_path: str | None
    summary: dict


def run_tune(cfg: Config, resume: bool = False) -> TuneOutcome:
    """Run (or resume) the search that ``cfg.tune`` describes and write its outputs."""
    from ray import tune

    from .ray_cluster import connect_ray
    from .train.runner import prepare_inputs

    check_tune_config(cfg)
    import ray

    print(f"vcl-dist: {connect_ray(int(cfg.train.num_workers * cfg.train.cpus_per_worker) + 2)}", flush=True)
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
        print(f"vcl-dist: resuming {display_uri(experiment, storage)}", flush=True)
        # Finished trials keep their results; unfinished and errored ones run again.
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage)
    else:
        concurrency = trial_concurrency(cfg, ray.cluster_resources())
        print(f"vcl-dist: {cfg.tune.num_samples} trials, up to {concurrency} at a time, in {display_uri(experiment, storage)}",
              flush=True)
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
    """The newest ``tune-*`` experiment under ``path`` (names carry their start time)."""
    import pyarrow.fs as pafs

    entries = storage.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("tune-"))
    return names[-1] if names else None


def trial_rows(cfg: Config, grid) -> list[dict]:
    """One dict per trial, best first: id, sampled values, final and best metric, epochs, stop reason."""
    metric, sign = cfg.tune.metric, 1 if cfg.tune.mode == "max" else -1
    rows = []
    interrupted = search_interrupted(cfg, grid)
    for result in grid:
        history = result.metrics_dataframe
        values = history[metric].dropna().tolist() if history is not None and metric in history else []
        reported = result.metrics or {}
        epochs = int(reported.get("training_iteration", 0))
        if result.error is not None:
            stop = f"error: {type(result.error).__name__}"
        elif epochs >= cfg.train.epochs:
            stop = "completed"
        elif interrupted:
            stop = "unfinished"
        else:
            stop = "stopped early (asha)"
        rows.append({
            "trial_id": reported.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
            **{key: (result.config or {}).get(key) for key in cfg.tune.searched},
            f"final_{metric}": values[-1] if values else None,
            f"best_{metric}": (max if sign > 0 else min)(values) if values else None,
            "epochs": epochs,
            "stop_reason": stop,
            "checkpoint": (result.metrics or {}).get("checkpoint_path"),
        })

    def rank(row):
        final = row[f"final_{metric}"]
        return (final is None, -sign * final if final is not None else 0.0)

    return sorted(rows, key=rank)


def search_interrupted(cfg: Config, grid) -> bool:
    """Whether the search stopped (say, on Ctrl-C) before all ``tune.num_samples`` trials ended."""
    return len(grid) < cfg.tune.num_samples or grid.num_terminated + grid.num_errors < len(grid)


def write_outputs(cfg: Config, grid, storage, experiment: str) -> TuneOutcome:
    rows = trial_rows(cfg, grid)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(storage, f"{experiment}/{TRIALS_CSV}", buffer.getvalue())

    metric = cfg.tune.metric
    best = next((r for r in rows if r[f"final_{metric}"] is not None), None)
    best_config_path = None
    if best is not None:
        best_cfg = override_values(cfg, {key: best[key] for key in cfg.tune.searched})
        best_cfg.run.name = None  # a new run of its own, next to the other runs
        best_config_path = f"{experiment}/{BEST_CONFIG}"
        write_text_atomically(storage, best_config_path, dump_config(best_cfg))
    write_bytes_atomically(storage, f"{experiment}/{PLOT}", plot_metric_vs_params(cfg, rows))
    best_model = best and best_trial_model(storage, f"{experiment}/{TRAIN_RUNS}/{best['trial_id']}", best["checkpoint"])
    summary = {
        "experiment": display_uri(experiment, storage),
        "metric": metric,
        "mode": cfg.tune.mode,
        "best_trial": best and best["trial_id"],
        f"best_{metric}": best and best[f"final_{metric}"],
        "best_values": best and {key: best[key] for key in cfg.tune.searched},
        "best_checkpoint": best and best["checkpoint"] and display_uri(best["checkpoint"], storage),
        "best_model": best_model and display_uri(best_model, storage),
        "best_config": best_config_path and display_uri(best_config_path, storage),
        "trials": len(rows),
        "stopped_early": sum(r["stop_reason"].startswith("stopped early") for r in rows),
        "interrupted": search_interrupted(cfg, grid),
    }
    write_text_atomically(storage, f"{experiment}/{SUMMARY}", json.dumps(summary, indent=2))
    return TuneOutcome(display_uri(experiment, storage), experiment.rsplit("/", 1)[-1], rows, summary["best_config"], summary)


def best_trial_model(storage, run_path: str, checkpoint: str | None) -> str | None:
    """The best trial's exported model: its run's ``model/`` when it finished, else exported
    here from its last checkpoint (a trial that ASHA stopped never exported one); None when
    there is neither."""
    from .retrieval.model import EXPORT_DIR, WEIGHTS_FILE
    from .storage import exists

    model = f"{run_path}/{EXPORT_DIR}"
    if exists(storage, f"{model}/{WEIGHTS_FILE}"):
        return model
    if not checkpoint or not exists(storage, checkpoint):
        return None
    import ray.train

    from .train.runner import export_run_model

    return export_run_model(ray.train.Checkpoint(checkpoint, filesystem=storage), storage, run_path, None, None)


def plot_metric_vs_params(cfg: Config, rows: list[dict]) -> bytes:
    """PNG: the final metric against each searched value, one panel each (log axes for log
    distributions), plus margin × λ coloured by the metric when both are searched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    metric = cfg.tune.metric
    done = [r for r in rows if r[f"final_{metric}"] is not None]
    keys = [k for k, d in cfg.tune.searched.items() if d.type != "choice" or all(isinstance(v, (int, float)) for v in d.values)]
    pair = "loss.margin" in keys and "loss.reg_lambda" in keys
    panels = len(keys) + pair
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.2 * max(panels, 1), 3.6), squeeze=False)
    full = [r for r in done if r["stop_reason"] == "completed"]
    early = [r for r in done if r["stop_reason"] != "completed"]
    for ax, key in zip(axes[0], keys):
        # Trials stopped early report an earlier epoch's metric: drawn apart, not compared as equals.
        ax.scatter([r[key] for r in full], [r[f"final_{metric}"] for r in full], c="tab:blue", label="completed")
        ax.scatter([r[key] for r in early], [r[f"final_{metric}"] for r in early], facecolors="none", edgecolors="tab:gray",
                   label="stopped early")
        ax.set(xlabel=key, ylabel=metric, xscale="log" if cfg.tune.searched[key].type == "loguniform" else "linear")
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0][0].legend(fontsize=8)
    if pair:
        ax = axes[0][-1]
        points = ax.scatter([r["loss.margin"] for r in done], [r["loss.reg_lambda"] for r in done],
                            c=[r[f"final_{metric}"] for r in done], cmap="viridis")
        ax.set(xlabel="loss.margin", ylabel="loss.reg_lambda", yscale="log", title=metric)
        ax.yaxis.set_minor_formatter(NullFormatter())
        fig.colorbar(points, ax=ax)
    fig.suptitle(f"{metric} per trial ({len(done)} trials)")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()
