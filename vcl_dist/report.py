"""Terminal summaries of finished runs."""

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
