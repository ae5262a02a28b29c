"""Watching a run while it happens: trackers (TensorBoard, MLflow, Weights & Biases), progress
on the driver's console, and what a failure message says about where to look.

Rank 0 measures, the driver writes (`.monitor`): every ``run.log_every_steps`` steps the
step metrics (``train/loss`` — the mean over workers of that step's loss, the value
``metrics.jsonl`` keeps in ``step_losses`` —, ``train/lr``, ``train/samples_per_s``,
``train/data_wait_fraction``, and ``train/logit_scale`` or ``train/margin_violation_fraction``),
every epoch the epoch's scalars under their ``metrics.jsonl`` names, at the global step the
epoch ended on. Parameters: the resolved config, flattened (``train.lr``, …); tags: the run's
name, storage path and folder (a resumed run continues its MLflow / W&B run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Config, config_record


@dataclass
class RunIdentity:
    """What names a run to the trackers."""

    name: str
    storage: Any  # pyarrow filesystem of run.storage_path
    storage_root: str  # run.storage_path inside it
    run_uri: str  # the run folder as a user writes it (local path or s3://…)
    resumed: bool = False
    group: str | None = None  # a Tune search's name: its trials are grouped under it
    searched: dict[str, Any] = field(default_factory=dict)  # a Tune trial's sampled values

    @property
    def run_root(self) -> str:
        return f"{self.storage_root}/{self.name}"

    @property
    def local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.storage, pafs.LocalFileSystem)

    def tags(self) -> dict[str, str]:
        tags = {"vcl_dist.run_name": self.name, "vcl_dist.run_path": self.run_uri,
                "vcl_dist.storage_path": self.run_uri.rsplit("/", 1)[0]}
        if self.group:
            tags["vcl_dist.tune_experiment"] = self.group
            tags["vcl_dist.searched"] = ",".join(sorted(self.searched))
        return tags


class Tracker(Protocol):
    name: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def log_artifacts(self, local_folder: str, artifact_path: str) -> None: ...

    def finish(self, failed: bool) -> None: ...


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as ``section.key`` → text (nested sections joined with dots)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = "null" if node is None else str(node)

    walk("", config_record(cfg))
    return flat


def open_trackers(cfg: Config, identity: RunIdentity) -> list[Tracker]:
    """The trackers ``run.trackers`` names, each started with the run's parameters and tags.

    Raises:
        ValueError: a tracker's package is missing or its server cannot be reached (one line).
    """
    trackers: list[Tracker] = []
    for name in cfg.run.trackers:
        if name == "tensorboard":
            from .tensorboard_log import TensorBoardTracker

            trackers.append(TensorBoardTracker(cfg, identity))
        elif name == "mlflow":
            from .mlflow_log import MlflowTracker

            trackers.append(MlflowTracker(cfg, identity))
        elif name == "wandb":
            from .wandb_log import WandbTracker

            trackers.append(WandbTracker(cfg, identity))
    return trackers


def missing_package(tracker: str, package: str, extra: str) -> ValueError:
    return ValueError(f"run.trackers has {tracker}, but {package} is not installed: pip install 'vcl-dist[{extra}]'")

