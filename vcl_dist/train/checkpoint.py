"""The trainer's checkpoint: its format (save, load), whether one can be resumed from (verify),
and the newest such of a run (locate).

A **checkpoint** (one folder, loadable with ``torch.load(weights_only=True)``) is a model folder
(`vcl_dist.models.export`: ``model.pt``, ``config.yaml``, ``tokenizer/``, ``history.json``,
``classes.txt``, ``towers.json``) plus the training state: ``loss.pt`` (the loss's parameters,
such as a temperature or class embeddings) and ``training_state.pt`` (optimizer, scheduler,
negative memory, epoch, step, the data position and every worker's RNG state). Model and
optimizer are whole and keyed by parameter name, whichever strategy trained them
(`.state_dicts`): a checkpoint resumes under DDP or FSDP, at any worker count. A sharded
negative memory is saved by every worker beside them, one file each:
``memory_shard_<rank>_of_<world>.pt`` (Ray Train merges the workers' files into one folder and
registers the checkpoint once every worker has reported).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import torch

from ..class_names import CLASSES_FILE, format_class_names
from ..config import Config
from ..models.export import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, TOKENIZER_DIR, save_tower_configs
from ..models.locate import torch_file_problem, usable_checkpoints
from ..storage import filesystem_for
from .state_dicts import WholeState, load_model_state, load_optimizer_state, whole_state

LOSS_FILE = "loss.pt"
STATE_FILE = "training_state.pt"
MEMORY_SHARD_GLOB = "memory_shard_*_of_*.pt"
CHECKPOINT_FILES = (MODEL_FILE, LOSS_FILE, STATE_FILE, HISTORY_FILE, CONFIG_FILE)


def save_checkpoint(folder: str | Path, *, model, criterion, optimizer, scheduler, epoch: int, step: int,
                    history: list[dict], config_yaml: str, tokenizer, class_names: list[str] | None = None,
                    epoch_step: int = 0, epoch_progress: list[dict] | None = None, epoch_rows: dict | None = None,
                    rng: list[dict] | None = None, state: WholeState | None = None) -> None:
    """``epoch``: the epoch the checkpoint is in (0-based); ``epoch_step``: steps done in it, 0 when
    the checkpoint closes it; ``epoch_progress``: every worker's running sums of the epoch, and
    ``epoch_rows``: which of its rows each worker trained on (see ``train.resume``), to finish
    it after a restart; ``rng``: every worker's RNG state, in rank order. ``state``: the model's,
    loss's and optimizer's state, gathered beforehand by every worker (FSDP: see
    `.state_dicts`); default: taken here, from a model that is not sharded."""
    folder = Path(folder)
    state = state or whole_state(model, criterion, optimizer)
    torch.save(state.model, folder / MODEL_FILE)
    torch.save(state.loss, folder / LOSS_FILE)
    memory = getattr(criterion, "memory", None)
    torch.save(
        {"optimizer": state.optimizer, "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
         "epoch_step": epoch_step, "epoch_progress": epoch_progress, "epoch_rows": epoch_rows, "rng": rng,
         # A sharded memory is in the workers' memory_shard files (save_memory_shard).
         "memory": memory.state_dict() if memory is not None and not memory.sharded else None},
        folder / STATE_FILE,
    )
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    (folder / CONFIG_FILE).write_text(config_yaml)
    save_tower_configs(folder, model)
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    if class_names:
        (folder / CLASSES_FILE).write_text(format_class_names(class_names))


def save_memory_shard(folder: str | Path, memory) -> None:
    """This worker's rows of a sharded negative memory, beside the checkpoint's other files."""
    torch.save(memory.state_dict(), Path(folder) / f"memory_shard_{memory.rank:05d}_of_{memory.world:05d}.pt")


def load_checkpoint(folder: str | Path, *, model, criterion=None, optimizer=None, scheduler=None) -> dict:
    """Restore what is given (``model`` as trained: bare, DDP-wrapped or sharded; ``optimizer``
    needs ``criterion``); returns ``epoch``, ``step``, ``epoch_step``, ``epoch_progress``,
    ``epoch_rows``, ``rng`` and ``history`` of the saved run."""
    folder = Path(folder)
    load_model_state(model, torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if criterion is not None:
        criterion.load_state_dict(torch.load(folder / LOSS_FILE, map_location="cpu", weights_only=True))
        memory = getattr(criterion, "memory", None)
        shard_files = sorted(folder.glob(MEMORY_SHARD_GLOB))
        if memory is not None and state.get("memory") is not None:
            memory.load_state_dict(state["memory"])
        elif memory is not None and shard_files:
            # One file at a time: a worker never holds more than its own rows and one saved shard.
            memory.load_state_dicts(torch.load(path, map_location="cpu", weights_only=True) for path in shard_files)
    if optimizer is not None:
        load_optimizer_state(model, criterion, optimizer, state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    history = json.loads((folder / HISTORY_FILE).read_text())
    return {"epoch": state["epoch"], "step": state["step"], "history": history, "epoch_step": state.get("epoch_step", 0),
            "epoch_progress": state.get("epoch_progress"), "epoch_rows": state.get("epoch_rows"), "rng": state.get("rng")}


def checkpoint_problem(filesystem: pafs.FileSystem, folder: str) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from (a file missing, a torch file cut
    short, a shard of the memory missing), or None. Cheap: it reads the torch files' zip
    directories (at their ends, which a cut-short copy lacks), not their contents."""
    entries = {info.base_name: info for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))}
    missing = [name for name in CHECKPOINT_FILES if name not in entries]
    if missing:
        return f"missing {', '.join(missing)}"
    shards = [name for name in entries if name.startswith("memory_shard_") and name.endswith(".pt")]
    if shards:
        worlds = set()
        for name in sorted(shards):
            try:
                worlds.add(int(name.removesuffix(".pt").rsplit("_of_", 1)[1]))
            except (IndexError, ValueError):
                return f"an unrecognised memory shard file {name}"
        world = max(worlds)
        expected = {f"memory_shard_{rank:05d}_of_{world:05d}.pt" for rank in range(world)}
        if set(shards) != expected:
            return f"memory shards {sorted(expected ^ set(shards))} missing or extra"
    for name in (MODEL_FILE, LOSS_FILE, STATE_FILE, *shards):
        found = torch_file_problem(filesystem, folder, name)
        if found:
            return found
    return None


def newest_checkpoint(filesystem: pafs.FileSystem, run_path: str, warn=None) -> str | None:
    """The run's newest checkpoint that can be resumed from (every file of the training state
    readable), or None; each one skipped on the way is passed to ``warn(line)``."""
    usable = usable_checkpoints(filesystem, run_path, warn, checkpoint_problem)
    return usable[0] if usable else None


def checkpoint_tokenizer(cfg: Config):
    """The tokenizer of the newest checkpoint of run ``cfg.run.name`` that can be resumed from: a
    resumed run's token ids must be the ones its embeddings were trained with. (Checkpoints
    skipped on the way were named by `vcl_dist.train.runner.resume_config`, which found
    the same one.)"""
    import tempfile

    from transformers import AutoTokenizer

    storage, root = filesystem_for(cfg.run.storage_path, cfg.s3)
    checkpoint = newest_checkpoint(storage, f"{root}/{cfg.run.name}")
    if checkpoint is None:
        raise FileNotFoundError(f"run {cfg.run.name} under {cfg.run.storage_path} has no checkpoint to resume from")
    with tempfile.TemporaryDirectory() as folder:
        pafs.copy_files(f"{checkpoint}/{TOKENIZER_DIR}", folder, source_filesystem=storage,
                        destination_filesystem=pafs.LocalFileSystem())
        return AutoTokenizer.from_pretrained(folder)
