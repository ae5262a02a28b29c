"""What a finished run leaves: the exported model, ``metrics.jsonl``, ``config.yaml`` and
``result.json`` in the run folder, the same files handed to the trackers that keep artifacts,
and, for a failed run, the lines that say where to look."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass

from ..config import Config, config_record, dump_config
from ..runtime.console import one_line, warn
from ..runtime.step_phases import PHASES
from ..storage import display_uri, write_text_atomically
from ..tracking.watcher import RunWatcher
from .data_quality import worst_shards

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainingOutcome:
    run_path: str
    final_metrics: dict
    history: list[dict]
    checkpoint_path: str | None
    model_path: str | None = None


def training_failure_message(err: Exception) -> str:
    """One line naming why a Ray Train run failed: the workers' own exceptions, without the
    tracebacks Ray wraps them in (``WorkerGroupError.worker_failures``)."""
    reasons = set()
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        cause = getattr(failure, "_base_exc", failure)
        reasons.add(f"{type(cause).__name__}: {one_line(cause)}")
    return "; ".join(sorted(reasons)) or one_line(err, 500)


def write_run_files(cfg: Config, result, storage, watcher: RunWatcher, class_names: list[str] | None, wall_s: float,
                    use_gpu: bool) -> TrainingOutcome:
    """Export the model and write the run folder's files from Ray Train's ``result``."""
    history = (result.return_value or {}).get("history", [])
    final = dict(history[-1]) if history else dict(result.metrics or {})
    run_path = result.path
    model_path = export_run_model(result.checkpoint, storage, run_path, history, class_names) if result.checkpoint else None
    summary = {
        "run_name": cfg.run.name,
        "run_path": display_uri(run_path, storage),
        "checkpoint": display_uri(result.checkpoint.path, storage) if result.checkpoint else None,
        "model": display_uri(model_path, storage) if model_path else None,
        "final_metrics": final,
        "throughput": throughput_summary(final, history, wall_s),
        "num_workers": cfg.train.num_workers,
        "use_gpu": use_gpu,
        "config": config_record(cfg),
    }
    write_text_atomically(storage, f"{run_path}/{METRICS_FILE}", "".join(json.dumps(m) + "\n" for m in history))
    write_text_atomically(storage, f"{run_path}/config.yaml", dump_config(cfg))
    write_text_atomically(storage, f"{run_path}/{RESULT_FILE}", json.dumps(summary, indent=2))
    try:
        log_run_artifacts(watcher, storage, run_path, model_path)
    except OSError as err:  # the run folder has them either way: a trained run does not fail over a copy
        warn(f"the model and run files were not added to the trackers: {err}")
    return TrainingOutcome(summary["run_path"], final, history, summary["checkpoint"], summary["model"])


def throughput_summary(final: dict, history: list[dict], wall_s: float) -> dict:
    """``result.json``'s throughput block: speed, data waits, memory, bad rows, step time."""
    return {
        "samples_per_s": final.get("samples_per_s"),
        "samples_per_s_per_worker": final.get("samples_per_s_per_worker"),
        "data_wait_fraction": final.get("data_wait_fraction"),
        "data_wait_first_batch_s": final.get("data_wait_first_batch_s"),
        "peak_memory_gib": max((m.get("peak_memory_gib", 0.0) for m in history), default=None),
        "bad_rows": sum(m.get("bad_rows", 0) for m in history),
        # The shards to look at first: bad rows per shard over all epochs and workers. The val
        # split is read once and cached, so its last epoch holds all of its counts.
        "bad_rows_worst_shards": worst_shard_rows(history, "bad_shards"),
        "val_bad_rows_worst_shards": worst_shard_rows(history[-1:], "val_bad_shards"),
        "wall_time_s": wall_s,
        # Where the last epoch's step time went (fractions add up to 1; step_phases.PHASES).
        "step_time_s": final.get("step_time_s"),
        "step_time_breakdown": {name: final[f"step_{name}_fraction"] for name in PHASES
                                if f"step_{name}_fraction" in final},
    }


def worst_shard_rows(history: list[dict], key: str) -> list[dict]:
    """``[{"shard", "bad_rows"}]``, worst first: bad rows per shard summed over the epochs of
    ``history`` (each epoch keeps its worst shards under ``key``)."""
    total: Counter = Counter()
    for epoch in history:
        total.update(dict(epoch.get(key) or []))
    return [{"shard": shard, "bad_rows": count} for shard, count in worst_shards(total)]


def last_checkpoint_metrics(storage, run_root: str) -> list[str]:
    """A line with the metrics of the run's newest checkpoint (a worker group that failed before
    it reported anything of its own: a resumed run that fails at once)."""
    from ..models.locate import registered_metrics
    from ..tracking.monitor import short_metrics
    from .checkpoint import newest_checkpoint

    try:
        checkpoint = newest_checkpoint(storage, run_root)
        metrics = registered_metrics(storage, checkpoint) if checkpoint else {}
    except OSError:
        return []
    return [f"last checkpoint's metrics ({display_uri(checkpoint, storage)}): {short_metrics(metrics)}"] if metrics else []


def log_run_artifacts(watcher: RunWatcher, storage, run_path: str, model_path: str | None) -> None:
    """Hand the exported model and the run's files to the trackers that keep artifacts (MLflow)."""
    import pyarrow.fs as pafs

    if not any(t.name == "mlflow" for t in watcher.trackers):
        return
    with tempfile.TemporaryDirectory() as staging:
        local = pafs.LocalFileSystem()
        os.makedirs(f"{staging}/run")
        for file in (RESULT_FILE, METRICS_FILE, "config.yaml"):
            pafs.copy_files(f"{run_path}/{file}", f"{staging}/run/{file}", source_filesystem=storage,
                            destination_filesystem=local)
        watcher.log_artifacts(f"{staging}/run", "run")
        if model_path:
            pafs.copy_files(model_path, f"{staging}/model", source_filesystem=storage, destination_filesystem=local)
            watcher.log_artifacts(f"{staging}/model", "model")


def export_run_model(checkpoint, storage, run_path: str, history: list[dict] | None, class_names: list[str] | None) -> str:
    """Export the run's last checkpoint as ``<run>/model`` (safetensors, config, tokenizer; see
    `vcl_dist.models.export`); returns its path inside ``storage``. ``history`` and
    ``class_names``: None takes the checkpoint's own."""
    import pyarrow.fs as pafs

    from ..models.export import EXPORT_DIR, export_model, upload_export

    target = f"{run_path}/{EXPORT_DIR}"
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        if isinstance(storage, pafs.LocalFileSystem):
            export_model(folder, target, history=history, class_names=class_names)
        else:
            export_model(folder, f"{staging}/{EXPORT_DIR}", history=history, class_names=class_names)
            upload_export(f"{staging}/{EXPORT_DIR}", storage, target)
    return target
