"""The driver side of a training run: connect to Ray, prepare data, run the TorchTrainer, write results."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..config import Config, ConfigError, config_record, dump_config
from ..data.datasets import (
    DatasetSource,
    build_split,
    build_train_split,
    plan_train_units,
    read_class_names,
    resolve_source,
    sample_captions,
)
from ..data.tokenizer import load_pretrained_tokenizer, train_wordpiece
from ..data.train_stream import TrainUnit
from ..models import check_model_config
from ..models.open_clip_towers import is_open_clip, open_clip_tokenizer
from ..models.pretrained import adopt_pretrained_settings
from ..ray_cluster import JobNeeds, check_cluster_fits, connect_ray, cpus_for_training
from ..reservation import reserve_for_training
from ..step_phases import PHASES
from ..storage import display_uri, exists, filesystem_for, write_text_atomically
from ..tracking import RunIdentity, open_trackers, warn
from ..tracking.monitor import start_monitor
from ..tracking.progress import ProgressView
from ..tracking.watcher import RunWatcher
from .data_quality import worst_shards
from .fatal import raise_if_fatal
from .locked_features import feature_towers, locked_features

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
        reasons.add(f"{type(cause).__name__}: {' '.join(str(cause).split())}")
    return "; ".join(sorted(reasons)) or " ".join(str(err).split())[:500]


def _use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu != "auto":
        return bool(cfg.train.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def build_tokenizer(cfg: Config, source: DatasetSource | None):
    """The pretrained model's tokenizer (``model.init``'s, else the text tower's), or a WordPiece
    fitted to the training captions."""
    if is_open_clip(cfg.model.init):
        return open_clip_tokenizer(cfg.model.init)
    pretrained = cfg.model.init or cfg.model.text.pretrained
    if pretrained:
        return load_pretrained_tokenizer(pretrained)
    return train_wordpiece(sample_captions(source, source.train), cfg.model.text.vocab_size)


@dataclass
class RunInputs:
    """What a run needs from its data before training: computed once, shared by Tune's trials."""

    source: DatasetSource
    tokenizer: object
    class_names: list[str] | None
    train_units: list[TrainUnit]  # the training split's read units (data.train_stream)

    @property
    def train_rows(self) -> int:
        return sum(unit.rows for unit in self.train_units)


def prepare_inputs(cfg: Config, tokenizer=None) -> RunInputs:
    """Resolve (or generate) the dataset, fit or load the tokenizer (unless given: a resumed
    run's own), plan the training split's read units (which counts its rows: Parquet footers,
    tar sample counts; done once, also for all of Tune's trials).

    Raises:
        FileNotFoundError: shards or a bucket cannot be found or reached.
    """
    source = resolve_source(cfg.data, cfg.s3)
    return RunInputs(source, tokenizer or build_tokenizer(cfg, source), read_class_names(source),
                     plan_train_units(source, source.train))


def checkpoint_tokenizer(cfg: Config):
    """The tokenizer of the newest usable checkpoint of run ``cfg.run.name``: a resumed run's
    token ids must be the ones its embeddings were trained with. (Checkpoints skipped on the
    way were named by :func:`resume_config`, which found the same one.)"""
    import pyarrow.fs as pafs
    from transformers import AutoTokenizer

    from ..models.artifacts import TOKENIZER_DIR, newest_checkpoint

    storage, root = filesystem_for(cfg.run.storage_path, cfg.s3)
    checkpoint = newest_checkpoint(storage, f"{root}/{cfg.run.name}")
    if checkpoint is None:
        raise FileNotFoundError(f"run {cfg.run.name} under {cfg.run.storage_path} has no checkpoint to resume from")
    with tempfile.TemporaryDirectory() as folder:
        pafs.copy_files(f"{checkpoint}/{TOKENIZER_DIR}", folder, source_filesystem=storage,
                        destination_filesystem=pafs.LocalFileSystem())
        return AutoTokenizer.from_pretrained(folder)


def label_space_size(cfg: Config, class_names: list[str] | None) -> int | None:
    """How many class ids the run can use: the lines of ``classes.txt`` and, with VCRL's label
    tower, ``loss.num_classes``; rows with a label outside it are bad rows (counted, skipped)
    rather than an index error inside a training step."""
    sizes = [len(class_names)] if class_names else []
    if cfg.loss.name == "vcrl" and cfg.loss.label_tower and cfg.loss.num_classes:
        sizes.append(cfg.loss.num_classes)
    return min(sizes) if sizes else None


def resume_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """The config to continue a run with: the run's own, from its newest usable checkpoint (one
    that Ray Train registered, with every file readable: see
    :func:`~vcl_dist.models.artifacts.usable_checkpoints`), with ``overrides`` on top, under the
    same ``run.name`` and ``run.storage_path``, so that Ray Train hands the training function
    its latest checkpoint (which :mod:`.resume` falls back from when it cannot be read).

    The run is ``run.name`` if set, else the run under ``run.storage_path`` with the newest checkpoint.

    Raises:
        FileNotFoundError: no run, or a run without a checkpoint (one line).
    """
    import pyarrow.fs as pafs

    from ..config import load_config, load_saved_config
    from ..models.artifacts import CONFIG_FILE, newest_checkpoint, registered_metrics, warn_on_stderr

    storage, root = filesystem_for(cfg.run.storage_path, cfg.s3)

    if cfg.run.name:
        name, checkpoint = cfg.run.name, newest_checkpoint(storage, f"{root}/{cfg.run.name}", warn_on_stderr)
        if checkpoint is None:
            raise FileNotFoundError(f"run {name} under {cfg.run.storage_path} has no checkpoint to resume from")
    else:
        runs = storage.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        found = [(c.rsplit("/", 1)[-1], r.base_name, c) for r in runs if r.type == pafs.FileType.Directory
                 and (c := newest_checkpoint(storage, r.path, warn_on_stderr))]
        if not found:
            raise FileNotFoundError(f"no run with a checkpoint to resume under {cfg.run.storage_path}")
        _, name, checkpoint = max(found)  # the run whose last checkpoint is the newest
    with storage.open_input_stream(f"{checkpoint}/{CONFIG_FILE}") as stream:
        saved = load_saved_config(stream.read().decode(), display_uri(f"{checkpoint}/{CONFIG_FILE}", storage))
    resumed = load_config(None, overrides, base=saved)
    resumed.run.name, resumed.run.storage_path, resumed.s3 = name, cfg.run.storage_path, cfg.s3
    stop = resumed.train.max_steps
    if stop is not None and not any(o.split("=", 1)[0].strip() == "train.max_steps" for o in overrides):
        # A run that train.max_steps stopped goes on to train.epochs when resumed (set it again to stop again).
        step = registered_metrics(storage, checkpoint).get("step")
        if isinstance(step, int) and step >= stop:
            resumed.train.max_steps = None
            print(f"vcl-dist: run {name} stopped at train.max_steps={stop}; resuming it to train.epochs="
                  f"{resumed.train.epochs}", flush=True)
    return resumed


def run_training(cfg: Config, inputs: RunInputs | None = None, callbacks: Sequence = (), *,
                 resume: bool = False, trial: TrialInfo | None = None) -> TrainingOutcome:
    """Train with Ray Train as ``cfg`` says, write the run folder, export the model.

    ``inputs``: from :func:`prepare_inputs` (computed here when not given); ``callbacks``: Ray
    Train callbacks, such as Tune's ``TuneReportCallback`` when this run is a trial; ``resume``:
    continue the run ``cfg.run.name`` (see :func:`resume_config`). Without it, a run of that name
    must not exist yet — Ray Train would silently continue it, under another config. ``trial``:
    this run is a Tune trial (its trackers group it under the search).

    While it runs, rank 0's progress and metrics reach this process (:mod:`vcl_dist.tracking`):
    progress on the console, metrics to ``run.trackers``. A failed run's error carries
    ``details``: where the failed workers' logs are and the last metrics reported.

    Raises:
        ConfigError: ``run.name`` names an existing run and ``resume`` is False (one line).
    """
    import ray.data

    cfg = adopt_pretrained_settings(cfg)  # a pretrained model's preprocessing and sizes (printed)
    check_model_config(cfg.model)  # before any Ray work: a config error is one line, exit 2
    if cfg.run.trained_rows_log:  # the workers' working folders are not the driver's
        cfg = cfg.model_copy(deep=True)
        cfg.run.trained_rows_log = os.path.abspath(os.path.expanduser(cfg.run.trained_rows_log))
    storage, storage_path = filesystem_for(cfg.run.storage_path, cfg.s3)
    name = cfg.run.name or default_run_name()
    if not resume and exists(storage, f"{storage_path}/{name}"):
        raise ConfigError(f"run.name={name}: a run of that name exists in {display_uri(storage_path, storage)}; "
                          "continue it with --resume or choose another run.name")
    if cfg.run.name != name:  # saved with the run: an evaluation finds the run's tracker entries by it
        cfg = cfg.model_copy(deep=True)
        cfg.run.name = name
    workers = cfg.train.num_workers
    joined = connect_ray(cpus_for_training(workers, cfg.train.cpus_per_worker))
    print(f"vcl-dist: {joined}", flush=True)
    if trial is not None:
        # A trial's driver is a Ray worker: Ray Data would draw its bars there as log lines.
        ray.data.DataContext.get_current().enable_progress_bars = False
    use_gpu = _use_gpu(cfg)
    check_cluster_fits(JobNeeds(cfg.train.min_workers or workers, cfg.train.cpus_per_worker, 1 if use_gpu else 0,
                                tuple(sorted(cfg.train.resources_per_worker.items()))))
    # On a cluster other drivers use, the job's whole share (workers and data CPUs) or a wait.
    reservation = reserve_for_training(cfg, use_gpu, shared=not joined.startswith("started a local Ray"))
    try:
        return _train_reserved(cfg, inputs, callbacks, resume, trial, name, storage, storage_path, use_gpu)
    finally:
        if reservation is not None:
            reservation.release()


def _train_reserved(cfg: Config, inputs: RunInputs | None, callbacks: Sequence, resume: bool, trial: TrialInfo | None,
                    name: str, storage, storage_path: str, use_gpu: bool) -> TrainingOutcome:
    """:func:`run_training` once the job holds its share of the cluster."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    workers = cfg.train.num_workers
    # One progress bar per dataset, not one per operator: readable in logs of submitted jobs.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    inputs = inputs or prepare_inputs(cfg, checkpoint_tokenizer(cfg) if resume else None)
    source, tokenizer, class_names = inputs.source, inputs.tokenizer, inputs.class_names

    local_batch = cfg.train.batch_size // workers
    steps_per_epoch = inputs.train_rows // workers // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the training split")
    classes = label_space_size(cfg, class_names)
    # The training split goes to the workers as a plan that each reads its own part of (in the
    # same seeded order in every run: data.epoch_plan); the val split is one Ray Dataset, whole.
    train_split = build_train_split(source, inputs.train_units, cfg.data, tokenizer, seed=cfg.train.seed,
                                    num_classes=classes)
    towers = feature_towers(cfg)
    if towers:
        # Over the split's own units (the built-in data's are in the object store by now).
        train_split.features = locked_features(cfg, source, train_split.units, tokenizer, use_gpu)
        train_split.feature_towers = towers
    if cfg.model.image.lock and not cfg.model.image.unlocked_groups and cfg.data.augment:
        print("vcl-dist: the locked image tower runs every step because data.augment is on; with data.augment=false "
              "its outputs are computed once instead", flush=True)
    # Every Ray Data run from here on executes on the workers: no progress bars from there.
    ray.data.DataContext.get_current().enable_progress_bars = False
    val_split = build_split(source, source.val, cfg.data, tokenizer, num_classes=classes)
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {}) | cfg.train.resources_per_worker
    identity = RunIdentity(name, storage, storage_path, display_uri(f"{storage_path}/{name}", storage), resumed=resume,
                           group=trial.experiment if trial else None, searched=trial.searched if trial else {})
    trackers = open_trackers(cfg, identity)  # a tracker that cannot start stops the run here, in one line
    monitor = start_monitor()
    watcher = RunWatcher(monitor, trackers, ProgressView(cfg.run.progress_every_s))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            # The tokenizer and the splits in Ray's object store, for the workers to take from
            # there: Ray Train's controller unpickles the loop config (and the trainer's
            # datasets), and would import transformers for the tokenizer (≈ 0.6 s of every
            # run's start-up on 2 CPUs) only to pass it on. Rank 0 reads the val split whole.
            "inputs": ray.put({"tokenizer": tokenizer, "class_names": class_names, "train_split": train_split,
                               "val": val_split}),
            "monitor": monitor,
        },
        # Ray Train picks nccl when the workers have GPUs and gloo otherwise.
        # Elastic with train.min_workers: Ray Train starts with as many workers as fit (up to
        # num_workers) and restarts the group at another size when nodes go, or, checking every
        # train.elastic_resize_interval_s, when nodes come.
        scaling_config=ray.train.ScalingConfig(
            num_workers=(cfg.train.min_workers, workers) if cfg.train.min_workers else workers,
            use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=cfg.train.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # A dead worker (a preempted node, a SIGKILL) restarts the worker group, which picks
            # up the latest checkpoint through ray.train.get_checkpoint().
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )
    started = time.perf_counter()
    watcher.start()
    try:
        result = trainer.fit()
        raise_if_fatal(result.return_value)
    except BaseException as err:
        watcher.close()
        failed_ranks = sorted(getattr(err, "worker_failures", None) or {}) or None
        # Shown under the one-line error (jobs/train.py): the failed workers' logs, the last metrics.
        err.details = watcher.failure_lines(failed_ranks) or []
        if not any(line.startswith("last") for line in err.details):
            err.details += last_checkpoint_metrics(storage, f"{storage_path}/{name}")
        watcher.finish(failed=True)
        ray.kill(monitor)
        raise
    wall = time.perf_counter() - started
    watcher.close()
    ray.kill(monitor)
    history = (result.return_value or {}).get("history", [])
    final = dict(history[-1]) if history else dict(result.metrics or {})
    run_path = result.path
    model_path = export_run_model(result.checkpoint, storage, run_path, history, class_names) if result.checkpoint else None
    summary = {
        "run_name": name,
        "run_path": display_uri(run_path, storage),
        "checkpoint": display_uri(result.checkpoint.path, storage) if result.checkpoint else None,
        "model": display_uri(model_path, storage) if model_path else None,
        "final_metrics": final,
        "throughput": {
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
            "wall_time_s": wall,
            # Where the last epoch's step time went (fractions add up to 1; step_phases.PHASES).
            "step_time_s": final.get("step_time_s"),
            "step_time_breakdown": {name: final[f"step_{name}_fraction"] for name in PHASES
                                    if f"step_{name}_fraction" in final},
        },
        "num_workers": workers,
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
    watcher.finish(failed=False)
    return TrainingOutcome(summary["run_path"], final, history, summary["checkpoint"], summary["model"])


@dataclass
class TrialInfo:
    """A Tune trial's place in its search, for the trackers."""

    experiment: str
    searched: dict


def last_checkpoint_metrics(storage, run_root: str) -> list[str]:
    """A line with the metrics of the run's newest checkpoint (a worker group that failed before
    it reported anything of its own: a resumed run that fails at once)."""
    from ..models.artifacts import newest_checkpoint, registered_metrics
    from ..tracking.monitor import short_metrics

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


def default_run_name() -> str:
    """``vcl-<start time>-<random>``: sorts by start time, and two runs started in the same
    second (say, by a script) still get different folders."""
    return f"vcl-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def worst_shard_rows(history: list[dict], key: str) -> list[dict]:
    """``[{"shard", "bad_rows"}]``, worst first: bad rows per shard summed over the epochs of
    ``history`` (each epoch keeps its worst shards under ``key``)."""
    total: Counter = Counter()
    for epoch in history:
        total.update(dict(epoch.get(key) or []))
    return [{"shard": shard, "bad_rows": count} for shard, count in worst_shards(total)]


def export_run_model(checkpoint, storage, run_path: str, history: list[dict] | None, class_names: list[str] | None) -> str:
    """Export the run's last checkpoint as ``<run>/model`` (safetensors, config, tokenizer; see
    :mod:`vcl_dist.models.artifacts`); returns its path inside ``storage``. ``history`` and
    ``class_names``: None takes the checkpoint's own."""
    import pyarrow.fs as pafs

    from ..models.artifacts import EXPORT_DIR, export_model, upload_export

    target = f"{run_path}/{EXPORT_DIR}"
    with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        if isinstance(storage, pafs.LocalFileSystem):
            export_model(folder, target, history=history, class_names=class_names)
        else:
            export_model(folder, f"{staging}/{EXPORT_DIR}", history=history, class_names=class_names)
            upload_export(f"{staging}/{EXPORT_DIR}", storage, target)
    return target
