"""Terminal tables for the jobs: a run's summary, an evaluation's metrics, search hits, the best trials."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

SUMMARY_METRICS = [
    ("val_t2i_class_r1", "text→image class R@1"),
    ("val_i2t_class_r1", "image→text class R@1"),
    ("val_zero_shot_acc", "zero-shot accuracy"),
    ("val_i2t_r1", "image→text R@1"),
    ("val_t2i_r1", "text→image R@1"),
    ("val_rsum", "rsum (of 6)"),
    ("val_rsum_clip_benchmark", "rsum, CLIP_benchmark's rule"),
    ("train_loss", "train loss"),
    ("samples_per_s", "samples/s (all workers)"),
    ("data_wait_fraction", "data wait fraction"),
]


def print_summary(outcome) -> None:
    console = Console()
    table = Table(title="vcl-dist run", show_header=True)
    table.add_column("metric")
    table.add_column("final", justify="right")
    for key, label in SUMMARY_METRICS:
        if key in outcome.final_metrics:
            table.add_row(label, f"{outcome.final_metrics[key]:.4g}")
    console.print(table)
    console.print(f"run folder: {outcome.run_path}")
    if outcome.checkpoint_path:
        console.print(f"last checkpoint: {outcome.checkpoint_path}")
    if outcome.model_path:
        console.print(f"exported model: {outcome.model_path}")


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """Every metric of an evaluation, one row each."""
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}")
    Console().print(table)


def print_hits(hits, class_names: list[str] | None, title: str) -> None:
    """Search results: rank, score, key, class and caption."""
    table = Table(title=title, show_header=True)
    for column in ("rank", "score", "key", "class", "caption"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for hit in hits:
        label = class_names[hit.label] if class_names and 0 <= hit.label < len(class_names) else ("" if hit.label < 0 else str(hit.label))
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.key, label, hit.caption)
    Console().print(table)


def print_trials(trials: list[dict], keys: list[str], metric: str) -> None:
    """The best trials of a search, best first."""
    table = Table(title=f"best trials by final {metric}", show_header=True)
    for column in ["rank", "trial", *keys, f"final {metric}", f"best {metric}", "epochs", "stopped"]:
        table.add_column(column)
    for rank, row in enumerate(trials, 1):
        values = [row.get(key) for key in keys] + [row[f"final_{metric}"], row[f"best_{metric}"]]
        table.add_row(str(rank), str(row["trial_id"]), *(_cell(v) for v in values), str(row["epochs"]), row["stop_reason"])
    Console().print(table)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
