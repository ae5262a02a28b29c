"""The per-worker training function that Ray Train runs on every worker.

One step, start to end: a batch of preprocessed rows from this worker's shard → both towers
(under bf16 autocast on GPU) → the loss of this worker's anchors against the embeddings
gathered from every worker → backward (gradients flow back through the gather, DDP averages
them) → clip → AdamW step → learning-rate step. After each epoch rank 0 evaluates on the whole
val split, and every worker calls ``ray.train.report`` (a barrier) with rank 0 attaching the
checkpoint.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..config import Config, dump_config
from ..cpu_memory import keep_freed_memory_for_reuse
from ..evaluate import embed_batches, retrieval_metrics, zero_shot_accuracy
from ..losses import build_loss, normalizes_embeddings
from ..losses.gather import distributed_world
from ..models import build_dual_encoder
from .checkpoint import load_checkpoint, save_checkpoint
from .data_quality import BadDataError, BadRowCounter, worst_shards
from .fatal import CheckpointLoadError, ModelBuildError, NonFiniteLossError, end_run_on_fatal_error
from .schedule import build_optimizer, build_scheduler
from .step import collate_rows, drop_bad_rows, pinned_collate_rows, train_step

# A step needs at least this many usable rows on every worker (an anchor and a negative).
MIN_ROWS_PER_STEP = 2


def lockstep(batches: Iterator, device: torch.device, waits: list[float]) -> Iterator:
    """Yield batches while *every* worker still has one.

    Collectives (the gather in the loss, DDP's all-reduce) hang if one worker takes a step
    that another does not; one tiny all-reduce per step makes all workers stop together,
    whatever their shards hold. The same all-reduce says whether every worker's batch has
    ``MIN_ROWS_PER_STEP`` usable rows, so a batch of bad rows stops all workers at once with
    :class:`BadDataError` (which is not retried) rather than one of them. The time spent
    waiting for the data iterator alone (not for the other workers) is appended to ``waits``.
    """
    _, world = distributed_world()
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        waits.append(time.perf_counter() - started)
        usable_rows = int(batch["valid"].sum()) if batch is not None else 0
        flags = [0 if batch is None else 1, 1 if usable_rows >= MIN_ROWS_PER_STEP else 0]
        if world > 1:
            reduced = torch.tensor(flags, device=device)
            dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
            flags = reduced.tolist()
        if flags[0] == 0:
            return
        if flags[1] == 0:
            raise BadDataError(f"a training batch had fewer than {MIN_ROWS_PER_STEP} usable rows on some worker "
                               f"(this worker: {usable_rows} of {len(batch['valid'])}): the shards are mostly corrupt")
        yield batch


def fetch_first_ahead(batches: Iterator) -> Iterator:
    """``batches``, whose first item is fetched from now on in a background thread."""
    fetched: list = []
    done = threading.Event()

    def fetch() -> None:
        try:
            fetched.append(next(batches, None))
        except BaseException as err:  # handed to the consumer, raised in its thread
            fetched.append(err)
        done.set()

    # A daemon thread: a run that stops early (an error, train.max_steps) must not wait on it.
    threading.Thread(target=fetch, name="vcl-dist-epoch-prefetch", daemon=True).start()

    def chained() -> Iterator:
        done.wait()
        first = fetched[0]
        if isinstance(first, BaseException):
            raise first
        if first is not None:
            yield first
            yield from batches

    return chained()


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a worker's local shuffle buffer: reproducible, new every epoch, distinct
    per worker (the file order is reseeded per epoch by the reader, see data.datasets)."""
    return seed * 1_000_003 + epoch * 1009 + rank


def _mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    _, world = distributed_world()
    if world > 1:
        dist.all_reduce(tensor)
        tensor /= world
    return tensor.tolist()


@end_run_on_fatal_error
def train_loop_per_worker(loop_config: dict) -> dict | None:
    cfg = Config.model_validate(loop_config["config"])
    tokenizer = loop_config["tokenizer"]
    class_names: list[str] | None = loop_config["class_names"]

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Each worker keeps the batch it has at full size, so the global pool and (linear scaling
    # rule) the learning rate follow the world size when an elastic run shrinks or grows.
    local_batch = cfg.train.batch_size // cfg.train.num_workers
    steps_per_epoch = loop_config["train_rows"] // world // local_batch
    lr = cfg.train.lr * world / cfg.train.num_workers
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # One intra-op thread per reserved CPU: more only fights the other workers.
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        keep_freed_memory_for_reuse()
    use_amp = cfg.train.amp is True or (cfg.train.amp == "auto" and on_gpu)

    torch.manual_seed(cfg.train.seed)
    try:
        model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0)
        criterion = build_loss(cfg.loss, num_classes=len(class_names) if class_names else None, embed_dim=cfg.model.embed_dim)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ModelBuildError(f"the config builds no model: {' '.join(str(err).split())[:300]}") from None
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    criterion.to(device)
    optimizer = build_optimizer([raw_model, criterion], lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, steps_per_epoch * cfg.train.epochs, cfg.train.min_lr_ratio)

    # Where this worker group starts: the beginning, an epoch boundary, or inside an epoch.
    start_epoch, step, history, resumed_from_step, skip_steps, carried = 0, 0, [], 0, 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(folder, model=raw_model, criterion=criterion, optimizer=optimizer, scheduler=scheduler)
        except Exception as err:  # torch, pickle, zip, JSON and shape errors alike: it fails the same way next time
            raise CheckpointLoadError(f"cannot resume from the checkpoint {checkpoint.path}: {type(err).__name__}: "
                                      f"{' '.join(str(err).split())[:300]}") from None
        step, history, resumed_from_step = state["step"], state["history"], state["step"]
        saved_world = len(state["rng"] or []) or world
        if state["epoch_step"]:  # saved inside an epoch: finish that epoch
            start_epoch, skip_steps, saved = state["epoch"], state["epoch_step"], state["epoch_progress"]
            if saved_world == world:
                carried = saved[rank]  # this rank's running sums
            else:
                # Another world size: as many rows into the epoch, at this size's steps, with
                # the saved ranks' mean loss so far.
                skip_steps = skip_steps * saved_world // world
                mean_loss = sum(p["loss_sum"] for p in saved) / max(1, sum(p["steps"] for p in saved))
                carried = {"loss_sum": mean_loss * skip_steps, "steps": skip_steps}
        else:
            start_epoch = state["epoch"] + 1
        if saved_world != world:
            rescale_learning_rate(optimizer, scheduler, lr)
        restore_rng_state(state["rng"], rank, world, device)
        if rank == 0:
            where = f"step {skip_steps} of epoch {start_epoch + 1}" if skip_steps else f"the end of epoch {start_epoch}"
            print(f"vcl-dist: resumed from the checkpoint at {where} (global step {step})", flush=True)

    worker_nodes = count_worker_nodes()
    if rank == 0:
        print(f"vcl-dist: {world} workers on {worker_nodes} nodes: global pool {local_batch * world} rows per step, lr {lr:.3g}, "
              f"{steps_per_epoch} steps per epoch", flush=True)
    config_yaml = dump_config(cfg)
    collate = pinned_collate_rows if on_gpu else collate_rows
    train_shard = ray.train.get_dataset_shard("train")
    val_cache = ValCache()
    every = cfg.train.checkpoint_every_steps

    def reached_max_steps() -> bool:
        return cfg.train.max_steps is not None and step >= cfg.train.max_steps

    def report_with_checkpoint(metrics: dict, epoch: int, epoch_step: int, progress: dict | None) -> None:
        """Every worker reports (a barrier); rank 0 attaches a checkpoint with every worker's RNG
        state and, inside an epoch, every worker's running sums."""
        workers = gather_worker_states(device, progress)
        rng = [w["rng"] for w in workers]
        progress = [w["progress"] for w in workers] if progress is not None else None
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, model=raw_model, criterion=criterion, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                            step=step, history=history, config_yaml=config_yaml, tokenizer=tokenizer, class_names=class_names,
                            epoch_step=epoch_step, epoch_progress=progress, rng=rng)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def epoch_batches(epoch: int) -> Iterator:
        return iter(
            train_shard.iter_torch_batches(
                batch_size=local_batch, drop_last=True, collate_fn=collate, prefetch_batches=cfg.data.prefetch_batches,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=local_shuffle_seed(cfg.train.seed, epoch, rank),
            )
        )

    upcoming = None  # the next epoch's batches, started during this epoch's evaluation
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        batches = upcoming or epoch_batches(epoch)
        upcoming = None
        resuming = epoch == start_epoch and skip_steps > 0
        # A resumed epoch replays its data position by count: Ray Data cannot seek inside an
        # epoch, so every worker passes over the batches it had trained on before the checkpoint.
        to_skip = skip_steps if resuming else 0
        loss_sum, steps = (carried["loss_sum"], carried["steps"]) if resuming else (0.0, 0)
        trained, waits = 0, []
        bad_rows = BadRowCounter(cfg.data.max_bad_fraction)
        epoch_start = time.perf_counter()
        for batch in lockstep(batches, device, waits):
            if to_skip:
                to_skip -= 1
                continue
            batch, rows, bad_shards = drop_bad_rows(batch)
            bad_rows.add(rows, bad_shards)
            try:
                loss = train_step(model, criterion, optimizer, scheduler, batch, device, use_amp, cfg.train.grad_clip_norm)
            except FloatingPointError as err:
                raise NonFiniteLossError(
                    f"step {step + 1} (epoch {epoch + 1}): {' '.join(str(err).split())}; the optimizer step was not taken. "
                    f"Last good checkpoint: {latest_checkpoint_path() or 'none yet'}"
                ) from None
            loss_sum += loss
            steps += 1
            trained += 1
            step += 1
            if steps % cfg.train.log_every_steps == 0:
                bad_rows.check(device)  # a collective: every worker, same steps
            if rank == 0 and steps % cfg.train.log_every_steps == 0:
                elapsed = time.perf_counter() - epoch_start
                print(
                    f"epoch {epoch + 1}/{cfg.train.epochs} step {steps}/{steps_per_epoch} "
                    f"loss {loss_sum / steps:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                    f"{trained * local_batch * world / elapsed:.0f} samples/s",
                    flush=True,
                )
            stopping = reached_max_steps()
            if steps < steps_per_epoch and ((every and step % every == 0) or stopping):
                # A checkpoint inside the epoch: what a restart needs to finish it.
                report_with_checkpoint({"epoch": epoch, "step": step, "epoch_step": steps, "train_loss": loss_sum / steps},
                                       epoch, steps, {"loss_sum": loss_sum, "steps": steps})
            if stopping:
                if rank == 0:
                    print(f"vcl-dist: stopped at train.max_steps={cfg.train.max_steps}", flush=True)
                return {"history": history, "stopped_at_step": step} if rank == 0 else None
        epoch_time = time.perf_counter() - epoch_start
        if steps == 0:
            raise RuntimeError(
                f"epoch {epoch + 1} had no full batch of {local_batch} rows on some worker: "
                "the training split is smaller than train.batch_size"
            )
        # The first batch's wait is the pipeline's start-up (Ray Data re-executes it every
        # epoch); the rest is the steady state, where preprocessing falls behind the steps.
        mean_loss, wait_fraction, first_wait = _mean_over_workers([loss_sum / steps, sum(waits) / epoch_time, waits[0]], device)
        _, epoch_bad_rows = bad_rows.check(device, final=True)
        epoch_bad_shards = worst_shards(bad_rows.global_by_shard()) if epoch_bad_rows else []
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": mean_loss,
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": trained * local_batch * world / epoch_time,
            "samples_per_s_per_worker": trained * local_batch / epoch_time,
            "data_wait_fraction": wait_fraction,
            "data_wait_first_batch_s": first_wait,
            "bad_rows": epoch_bad_rows,
            "epoch_time_s": epoch_time,
            "world_size": world,
            "worker_nodes": worker_nodes,
            "global_batch": local_batch * world,
            "base_lr": lr,
            # The step this worker group started from: > 0 after a restart or --resume.
            "resumed_from_step": resumed_from_step,
        }
        if epoch + 1 < cfg.train.epochs and not reached_max_steps():
            # Ray Data starts each epoch's pipeline anew, and a worker's first batch waits for
            # its shuffle buffer to fill: started now, that overlaps rank 0's evaluation and
            # the checkpoint instead of the next epoch's first step.
            upcoming = fetch_first_ahead(epoch_batches(epoch + 1))
        if rank == 0:
            metrics.update(evaluate_on_val(raw_model, cfg, tokenizer, class_names, device, use_amp, val_cache))
            # Kept in the history (checkpoints, metrics.jsonl, result.json), not in the metrics
            # reported to Ray: a list of shards is no metric to plot or to tune on.
            history.append({**metrics, "bad_shards": epoch_bad_shards, "val_bad_shards": worst_shards(val_cache.by_shard)})
            print("vcl-dist: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        report_with_checkpoint(metrics, epoch, 0, None)
        if reached_max_steps():
            return {"history": history, "stopped_at_step": step} if rank == 0 else None
    return {"history": history} if rank == 0 else None


def latest_checkpoint_path() -> str | None:
    """Where the run's newest checkpoint is (Ray Train's view from this worker), for messages."""
    checkpoint = ray.train.get_checkpoint()
    return checkpoint.path if checkpoint is not None else None


def gather_worker_states(device: torch.device, progress: dict | None) -> list[dict]:
    """Every worker's torch RNG state (dropout draws from it) and epoch progress, in rank order."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    state = {"rng": rng, "progress": progress}
    _, world = distributed_world()
    if world == 1:
        return [state]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


def count_worker_nodes() -> int:
    """How many Ray nodes this worker group spans."""
    node = ray.get_runtime_context().get_node_id()
    _, world = distributed_world()
    if world == 1:
        return 1
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def rescale_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make ``lr`` the base of the schedule (a restored optimizer carries the old world size's)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)


def restore_rng_state(states: list[dict] | None, rank: int, world: int, device: torch.device) -> None:
    """Put back this rank's RNG state; a checkpoint of another world size has no state for it."""
    if not states or len(states) != world:
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


@dataclass
class ValCache:
    """The preprocessed val split, kept after the first pass: val preprocessing is
    deterministic (no augmentation), so later epochs skip the Ray Data pipeline start-up,
    which on a busy cluster costs more than embedding a small val split."""

    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    bad_rows: int = 0
    by_shard: Counter = field(default_factory=Counter)
    filled: bool = False

    def fill(self, batch_size: int) -> None:
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=batch_size, collate_fn=collate_rows):
            batch, _, bad_shards = drop_bad_rows(batch)
            self.bad_rows += len(bad_shards)
            self.by_shard.update(bad_shards)
            if len(batch["image"]):
                self.batches.append(batch)
        self.filled = True


def evaluate_on_val(model, cfg: Config, tokenizer, class_names, device, use_amp: bool, val: ValCache) -> dict[str, float]:
    """Rank 0 embeds the whole val split (it is not split across workers) and scores it."""
    if not val.filled:
        val.fill(cfg.eval.batch_size)
    embeddings = embed_batches(model, val.batches, device, amp=use_amp)
    normalized = normalizes_embeddings(cfg.loss.name)
    metrics = {f"val_{k}": v for k, v in retrieval_metrics(embeddings, cfg.eval.recall_ks, normalized).items()}
    metrics["val_bad_rows"] = val.bad_rows
    if class_names:
        metrics["val_zero_shot_acc"] = zero_shot_accuracy(
            model, tokenizer, class_names, cfg.eval.prompt_template, embeddings, device, cfg.data.max_text_length,
            normalized,
        )
    return metrics
