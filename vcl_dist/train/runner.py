"""The driver side of a training run, as a sequence of steps (`run_training`):

check the config → connect to Ray → reserve the job's share of the cluster → plan the data →
start watching (progress, trackers) → build the trainer → fit → write the results.

Each step hands the next what it needs; the workers' side is `.loop`.
"""

from __future__ import annotations

import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from ..config import Config, ConfigError
from ..data.datasets import build_split, build_train_split
from ..models import check_model_config
from ..models.pretrained import adopt_pretrained_settings
from ..ray_cluster import JobNeeds, check_cluster_fits, connect_ray, cpus_for_training
from ..reservation import reserve_for_training
from ..runtime.console import say, warn
from ..storage import display_uri, exists, filesystem_for
from ..tracking import RunIdentity, open_trackers
from ..tracking.monitor import start_monitor
from ..tracking.progress import ProgressView
from ..tracking.watcher import RunWatcher
from .checkpoint import checkpoint_tokenizer
from .dead_runs import release_dead_runs_requests, track_runs
from .fatal import raise_if_fatal
from .locked_features import feature_towers, locked_features
from .run_inputs import RunInputs, label_space_size, prepare_inputs
from .run_result import TrainingOutcome, last_checkpoint_metrics, write_run_files


@dataclass
class TrialInfo:
    """A Tune trial's place in its search, for the trackers."""

    experiment: str
    searched: dict


@dataclass
class RunPlace:
    """Where the run's folder is: ``<storage_path>/<name>`` in ``storage``."""

    storage: object
    storage_path: str
    name: str

    @property
    def root(self) -> str:
        return f"{self.storage_path}/{self.name}"


@dataclass
class DataPlan:
    """What the workers read: the training split as a plan, the val split whole."""

    inputs: RunInputs
    train_split: object
    val_split: object


@dataclass
class Watch:
    """The run seen from the driver: rank 0's monitor actor and what shows its records."""

    monitor: object
    watcher: RunWatcher
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0  # the fit's wall time


def run_training(cfg: Config, inputs: RunInputs | None = None, callbacks: Sequence = (), *,
                 resume: bool = False, trial: TrialInfo | None = None) -> TrainingOutcome:
    """Train with Ray Train as ``cfg`` says, write the run folder, export the model.

    ``inputs``: from `.run_inputs.prepare_inputs` (computed here when not given);
    ``callbacks``: Ray Train callbacks, such as Tune's ``TuneReportCallback`` when this run is a
    trial; ``resume``: continue the run ``cfg.run.name`` (see `resume_config`). Without it,
    a run of that name must not exist yet — Ray Train would silently continue it, under another
    config. ``trial``: this run is a Tune trial (its trackers group it under the search).

    While it runs, rank 0's progress and metrics reach this process (`vcl_dist.tracking`):
    progress on the console, metrics to ``run.trackers``. A failed run's error carries
    ``details``: where the failed workers' logs are and the last metrics reported.

    Raises:
        ConfigError: ``run.name`` names an existing run and ``resume`` is False (one line).
    """
    cfg, place = check_config(cfg, resume)
    joined = connect(cfg, trial)
    use_gpu = check_cluster(cfg)
    with reserved(cfg, use_gpu, shared=not joined.startswith("started a local Ray")):
        release_dead_runs_requests()  # a killed driver's run would hold its workers' resources for 3 minutes
        data = plan_data(cfg, inputs, resume, use_gpu)
        watch = start_watching(cfg, place, resume, trial)
        trainer = build_trainer(cfg, place, data, watch, callbacks, use_gpu)
        result = fit(trainer, watch, place)
        return collect_result(cfg, result, place, data, watch, use_gpu)


def check_config(cfg: Config, resume: bool) -> tuple[Config, RunPlace]:
    """Settle the config before any Ray work (a config error is one line, exit 2): a pretrained
    model's preprocessing and sizes, the model's consistency, the driver's paths made absolute,
    the run's name (new, unless resuming)."""
    cfg = adopt_pretrained_settings(cfg)  # prints what it adopted
    check_model_config(cfg.model)
    cfg = cfg.model_copy(deep=True)
    if cfg.run.trained_rows_log:  # the workers' working folders are not the driver's
        cfg.run.trained_rows_log = os.path.abspath(os.path.expanduser(cfg.run.trained_rows_log))
    storage, storage_path = filesystem_for(cfg.run.storage_path, cfg.s3)
    name = cfg.run.name or default_run_name()
    if not resume and exists(storage, f"{storage_path}/{name}"):
        raise ConfigError(f"run.name={name}: a run of that name exists in {display_uri(storage_path, storage)}; "
                          "continue it with --resume or choose another run.name")
    cfg.run.name = name  # saved with the run: an evaluation finds the run's tracker entries by it
    # While training, every request to the run's storage rides out an outage of about a minute
    # (a checkpoint upload, Ray Train's records): the checks above fail fast instead.
    patient, _ = filesystem_for(cfg.run.storage_path, cfg.s3, attempts=cfg.s3.run_attempts)
    return cfg, RunPlace(patient, storage_path, name)


def connect(cfg: Config, trial: TrialInfo | None) -> str:
    """Join or start Ray (`vcl_dist.ray_cluster.connect_ray`) and say which; returns that line."""
    import ray.data

    joined = connect_ray(cpus_for_training(cfg.train.num_workers, cfg.train.cpus_per_worker))
    say(joined)
    if joined.startswith("joined"):  # a cluster that outlives this driver: see release_dead_runs_requests
        track_runs()
    if trial is not None:
        # A trial's driver is a Ray worker: Ray Data would draw its bars there as log lines.
        ray.data.DataContext.get_current().enable_progress_bars = False
    # One progress bar per dataset, not one per operator: readable in logs of submitted jobs.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    return joined


def check_cluster(cfg: Config) -> bool:
    """Whether the workers get GPUs; stops (or waits, with an autoscaler) when the cluster can
    never hold the job's workers and its data tasks."""
    import ray

    use_gpu = bool(cfg.train.use_gpu) if cfg.train.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) >= 1
    check_cluster_fits(JobNeeds(cfg.train.min_workers or cfg.train.num_workers, cfg.train.cpus_per_worker,
                                1 if use_gpu else 0, tuple(sorted(cfg.train.resources_per_worker.items()))))
    return use_gpu


@contextmanager
def reserved(cfg: Config, use_gpu: bool, shared: bool) -> Iterator[None]:
    """On a cluster other drivers use, the job's whole share (workers and data CPUs), or a wait
    that says what it waits for (`vcl_dist.reservation`); given back on every exit."""
    reservation = reserve_for_training(cfg, use_gpu, shared=shared)
    try:
        yield
    finally:
        if reservation is not None:
            reservation.release()


def plan_data(cfg: Config, inputs: RunInputs | None, resume: bool, use_gpu: bool) -> DataPlan:
    """The run's inputs (a resumed run keeps its tokenizer), the training split as a plan that
    each worker reads its own part of (in the same seeded order in every run: data.epoch_plan),
    locked towers' features computed once where they can be, and the val split as one dataset."""
    import ray.data

    inputs = inputs or prepare_inputs(cfg, checkpoint_tokenizer(cfg) if resume else None)
    local_batch = cfg.train.batch_size // cfg.train.num_workers
    classes = label_space_size(cfg, inputs.class_names)
    train_split = build_train_split(inputs.source, inputs.train_units, cfg.data, inputs.tokenizer, seed=cfg.train.seed,
                                    num_classes=classes, sources=inputs.train_sources)
    if train_split.rows // cfg.train.num_workers // local_batch == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the training split")
    towers = feature_towers(cfg)
    if towers and train_split.mixture:
        raise ValueError("a locked tower's features are computed once per training row, not per draw of data.sources: "
                         "train with data.train_path, or let the locked tower run every step (data.augment=true)")
    if towers:
        # Over the split's own units (the built-in data's are in the object store by now).
        train_split.features = locked_features(cfg, inputs.source, train_split.units, inputs.tokenizer, use_gpu)
        train_split.feature_towers = towers
    if cfg.model.image.lock and not cfg.model.image.unlocked_groups and cfg.data.augment:
        say("the locked image tower runs every step because data.augment is on; with data.augment=false "
            "its outputs are computed once instead")
    # Every Ray Data run from here on executes on the workers: no progress bars from there.
    ray.data.DataContext.get_current().enable_progress_bars = False
    val_split = build_split(inputs.source, inputs.source.val, cfg.data, inputs.tokenizer, num_classes=classes)
    return DataPlan(inputs, train_split, val_split)


def start_watching(cfg: Config, place: RunPlace, resume: bool, trial: TrialInfo | None) -> Watch:
    """Open the trackers (one that cannot start stops the run here, in one line) and the monitor
    actor that rank 0 sends its progress and metrics to."""
    identity = RunIdentity(place.name, place.storage, place.storage_path, display_uri(place.root, place.storage),
                           resumed=resume, group=trial.experiment if trial else None,
                           searched=trial.searched if trial else {})
    trackers = open_trackers(cfg, identity)
    monitor = start_monitor()
    return Watch(monitor, RunWatcher(monitor, trackers, ProgressView(cfg.run.progress_every_s)))


def build_trainer(cfg: Config, place: RunPlace, data: DataPlan, watch: Watch, callbacks: Sequence, use_gpu: bool):
    """The ``TorchTrainer``: the loop, its inputs in the object store, the workers' resources,
    checkpoints and failure policy."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    workers = cfg.train.num_workers
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if use_gpu else {}) | cfg.train.resources_per_worker
    inputs = data.inputs
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            # The tokenizer and the splits in Ray's object store, for the workers to take from
            # there: Ray Train's controller unpickles the loop config (and the trainer's
            # datasets), and would import transformers for the tokenizer (≈ 0.6 s of every
            # run's start-up on 2 CPUs) only to pass it on. Rank 0 reads the val split whole.
            "inputs": ray.put({"tokenizer": inputs.tokenizer, "class_names": inputs.class_names,
                               "train_split": data.train_split, "val": data.val_split}),
            "monitor": watch.monitor,
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
            name=place.name,
            storage_path=place.storage_path,
            storage_filesystem=place.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # A dead worker (a preempted node, a SIGKILL) restarts the worker group, which picks
            # up the latest checkpoint through ray.train.get_checkpoint().
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
    )


def fit(trainer, watch: Watch, place: RunPlace):
    """Run the trainer while the watcher shows its progress; a failed run's error gets
    ``details``: the failed workers' logs and the last metrics reported."""
    import ray

    watch.started = time.perf_counter()
    watch.watcher.start()
    try:
        result = trainer.fit()
        raise_if_fatal(result.return_value)
    except BaseException as err:
        watch.watcher.close()
        failed_ranks = sorted(getattr(err, "worker_failures", None) or {}) or None
        # Shown under the one-line error (jobs/train.py).
        err.details = watch.watcher.failure_lines(failed_ranks) or []
        if not any(line.startswith("last") for line in err.details):
            err.details += last_checkpoint_metrics(place.storage, place.root)
        watch.watcher.finish(failed=True)
        ray.kill(watch.monitor)
        raise
    watch.wall_s = time.perf_counter() - watch.started
    watch.watcher.close()
    ray.kill(watch.monitor)
    return result


def collect_result(cfg: Config, result, place: RunPlace, data: DataPlan, watch: Watch, use_gpu: bool) -> TrainingOutcome:
    """Export the model, write the run folder's files, close the trackers."""
    outcome = write_run_files(cfg, result, place.storage, watch.watcher, data.inputs.class_names, watch.wall_s, use_gpu)
    watch.watcher.finish(failed=False)
    return outcome


def resume_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """The config to continue a run with: the run's own, from its newest checkpoint that can be
    resumed from (`vcl_dist.train.checkpoint.newest_checkpoint`), with ``overrides`` on
    top, under the same ``run.name`` and ``run.storage_path``, so that Ray Train hands the
    training function its latest checkpoint (which `.resume` falls back from when it
    cannot be read).

    The run is ``run.name`` if set, else the run under ``run.storage_path`` with the newest checkpoint.

    Raises:
        FileNotFoundError: no run, or a run without a checkpoint (one line).
    """
    import pyarrow.fs as pafs

    from ..config import load_config, load_saved_config
    from ..models.export import CONFIG_FILE
    from ..models.locate import registered_metrics
    from .checkpoint import newest_checkpoint

    storage, root = filesystem_for(cfg.run.storage_path, cfg.s3)
    if cfg.run.name:
        name, checkpoint = cfg.run.name, newest_checkpoint(storage, f"{root}/{cfg.run.name}", warn)
        if checkpoint is None:
            raise FileNotFoundError(f"run {name} under {cfg.run.storage_path} has no checkpoint to resume from")
    else:
        runs = storage.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        found = [(c.rsplit("/", 1)[-1], r.base_name, c) for r in runs if r.type == pafs.FileType.Directory
                 and (c := newest_checkpoint(storage, r.path, warn))]
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
            say(f"run {name} stopped at train.max_steps={stop}; resuming it to train.epochs={resumed.train.epochs}")
    return resumed


def default_run_name() -> str:
    """``vcl-<start time>-<random>``: sorts by start time, and two runs started in the same
    second (say, by a script) still get different folders."""
    return f"vcl-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
