"""What a search leaves behind, in its experiment folder (local or ``s3://``): ``trials.csv``
(every trial: its values, final and best metric, epochs run, why it stopped),
``best_config.yaml`` (the best trial's resolved config, ready for ``jobs/train.py --config``),
``tune_result.json`` (best trial, metric, checkpoint and exported model) and
``metric_vs_params.png``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from ..config import Config, dump_config, override_values
from ..storage import display_uri, write_bytes_atomically, write_text_atomically

TRIALS_CSV = "trials.csv"
BEST_CONFIG = "best_config.yaml"
SUMMARY = "tune_result.json"
PLOT = "metric_vs_params.png"
TRAIN_RUNS = "train_runs"  # the trials' Ray Train run folders, inside the experiment folder

@dataclass
class TuneOutcome:
    experiment_path: str
    name: str
    trials: list[dict]  # best first
    best_config_path: str | None
    summary: dict


def trial_rows(cfg: Config, grid) -> list[dict]:
    """One dict per trial, best first: id, sampled values, final and best metric, epochs, stop reason."""
    metric, sign = cfg.tune.metric, 1 if cfg.tune.mode == "max" else -1
    rows = []
    interrupted = search_interrupted(cfg, grid)
    for result in grid:
        history = last_attempt(result.metrics_dataframe)
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


def last_attempt(history):
    """The rows of a trial's progress that its last attempt reported: a trial run again after an
    interruption starts over at iteration 1 (see `.search.run_trial`)."""
    if history is None or "training_iteration" not in history or history.empty:
        return history
    starts = history.index[history["training_iteration"] == 1]
    return history.loc[starts[-1]:] if len(starts) else history


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
    best_model = best and best_trial_model(storage, best["checkpoint"])
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


def best_trial_model(storage, checkpoint: str | None) -> str | None:
    """The best trial's exported model: the ``model/`` of the training run that holds its last
    checkpoint, when that run finished, else exported there from the checkpoint (a trial that
    ASHA stopped never exported one) — or, when that checkpoint cannot be read, from the run's
    newest one that can (with a warning); None without a checkpoint."""
    from ..models.export import EXPORT_DIR, WEIGHTS_FILE
    from ..runtime.console import warn
    from ..storage import exists
    from ..train.checkpoint import checkpoint_problem, newest_checkpoint

    if not checkpoint or not exists(storage, checkpoint):
        return None
    run_path = checkpoint.rstrip("/").rsplit("/", 1)[0]
    model = f"{run_path}/{EXPORT_DIR}"
    if exists(storage, f"{model}/{WEIGHTS_FILE}"):
        return model
    problem = checkpoint_problem(storage, checkpoint)
    if problem is not None:
        warn(f"skipped the checkpoint {display_uri(checkpoint, storage)}: {problem}")
        checkpoint = newest_checkpoint(storage, run_path, warn)
        if checkpoint is None:
            return None
    import ray.train

    from ..train.run_result import export_run_model

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
