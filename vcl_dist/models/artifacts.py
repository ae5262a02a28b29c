"""A model's files, in one place: training checkpoints, the exported model, and which folder of
a run holds the newest complete one — local or in S3.

The training wing (:mod:`vcl_dist.train`) writes checkpoints and exports through this module,
and the serving wing (:mod:`vcl_dist.retrieval`) reads them through it; neither imports the other.

A **checkpoint** (one folder, loadable with ``torch.load(weights_only=True)``): ``model.pt``
(the dual encoder's state dict), ``loss.pt`` (the loss's parameters, such as a temperature or
class embeddings), ``training_state.pt`` (optimizer, scheduler, negative memory, epoch, step,
the data position and every worker's RNG state), ``history.json`` (metrics of every finished
epoch), ``config.yaml`` (the resolved config), ``tokenizer/`` and ``classes.txt``. A sharded
negative memory is saved by every worker beside them, one file each:
``memory_shard_<rank>_of_<world>.pt`` (Ray Train merges the workers' files into one folder and
registers the checkpoint once every worker has reported).

An **export** (``<run>/model/``): ``model.safetensors`` (the dual encoder's weights) with the
same ``config.yaml``, ``tokenizer/``, ``history.json`` and ``classes.txt``; assembled beside its
destination and renamed into place (in S3, where nothing renames: uploaded with the weights last,
:func:`upload_export`).

A model is named by an export folder, a checkpoint folder, or a run folder (its export, else
its newest checkpoint): :func:`find_model_folder`. A run's checkpoints are those Ray Train
registered as complete (:func:`registered_checkpoints`), newest first, less any with a missing
or cut-short file, each skipped with a warning (:func:`usable_checkpoints`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.fs as pafs
import torch

from ..config import Config, S3Config, dump_config
from ..data.shard_format import format_class_names, parse_class_names
from ..storage import display_uri, filesystem_for
from .dual_encoder import DualEncoder, build_dual_encoder
from .hub_export import CLIP_DIR, trained_logit_scale, write_hub_files

MODEL_FILE = "model.pt"
LOSS_FILE = "loss.pt"
STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
CLASSES_FILE = "classes.txt"
TOWERS_FILE = "towers.json"
MEMORY_SHARD_GLOB = "memory_shard_*_of_*.pt"


def save_checkpoint(folder: str | Path, *, model, criterion, optimizer, scheduler, epoch: int, step: int,
                    history: list[dict], config_yaml: str, tokenizer, class_names: list[str] | None = None,
                    epoch_step: int = 0, epoch_progress: list[dict] | None = None, epoch_rows: dict | None = None,
                    rng: list[dict] | None = None) -> None:
    """``epoch``: the epoch the checkpoint is in (0-based); ``epoch_step``: steps done in it, 0 when
    the checkpoint closes it; ``epoch_progress``: every worker's running sums of the epoch, and
    ``epoch_rows``: which of its rows each worker trained on (see ``train.resume``), to finish
    it after a restart; ``rng``: every worker's RNG state, in rank order."""
    folder = Path(folder)
    torch.save(model.state_dict(), folder / MODEL_FILE)
    torch.save(criterion.state_dict(), folder / LOSS_FILE)
    memory = getattr(criterion, "memory", None)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
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


def save_tower_configs(folder: Path, model) -> None:
    """The pretrained towers' own configs (:attr:`DualEncoder.tower_configs`): a model folder
    builds its structure from them, without the pretrained files it started from."""
    if model.tower_configs:
        (folder / TOWERS_FILE).write_text(json.dumps(model.tower_configs, indent=1, default=str))


def read_tower_configs(folder: Path) -> dict:
    path = folder / TOWERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_memory_shard(folder: str | Path, memory) -> None:
    """This worker's rows of a sharded negative memory, beside the checkpoint's other files."""
    torch.save(memory.state_dict(), Path(folder) / f"memory_shard_{memory.rank:05d}_of_{memory.world:05d}.pt")


def load_checkpoint(folder: str | Path, *, model, criterion=None, optimizer=None, scheduler=None) -> dict:
    """Restore what is given; returns ``epoch``, ``step``, ``epoch_step``, ``epoch_progress``,
    ``epoch_rows``, ``rng`` and ``history`` of the saved run."""
    folder = Path(folder)
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
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
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    history = json.loads((folder / HISTORY_FILE).read_text())
    return {"epoch": state["epoch"], "step": state["step"], "history": history, "epoch_step": state.get("epoch_step", 0),
            "epoch_progress": state.get("epoch_progress"), "epoch_rows": state.get("epoch_rows"), "rng": state.get("rng")}


WEIGHTS_FILE = "model.safetensors"
EXPORT_DIR = "model"  # a run's export, beside its checkpoints
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint_<timestamp> folders: the newest sorts last


class ModelNotFoundError(FileNotFoundError):
    """No export, checkpoint or run at the given path (one-line message)."""


class BrokenModelError(ValueError):
    """A model file that cannot be used: cut short, not what its name says, or weights that do
    not fit the model its config builds (one line naming the file and what is wrong)."""


def _listed(names, most: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" (+{len(names) - most} more)" if len(names) > most else "")


def load_weights(model, path: Path) -> None:
    """Load ``model.safetensors`` or a checkpoint's ``model.pt`` into ``model``, strictly.

    Raises:
        BrokenModelError: the file is truncated or corrupt, or its tensors do not match the
            model (missing or unexpected keys, shapes).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_model as load_safetensors

            # strict=False: it reports missing/unexpected keys itself, allowing for tied tensors.
            missing, unexpected = load_safetensors(model, str(path), strict=False, device="cpu")
        else:
            result = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as err:
        text = " ".join(str(err).split())
        if "size mismatch" in text:
            detail = text[text.index("size mismatch"):].split(". ")[0]
            raise BrokenModelError(f"{path}: the weights do not fit the model its config builds: {detail[:300]}") from None
        raise BrokenModelError(f"{path}: truncated or corrupt ({text[:200]})") from None
    except Exception as err:  # noqa: BLE001 - safetensors' and pickle's many error types all mean an unreadable file
        raise BrokenModelError(f"{path}: truncated or corrupt ({type(err).__name__}: "
                               f"{' '.join(str(err).split())[:200]})") from None
    if missing or unexpected:
        parts = ([f"missing keys {_listed(missing)}"] if missing else []) + \
                ([f"unexpected keys {_listed(unexpected)}"] if unexpected else [])
        raise BrokenModelError(f"{path}: the weights do not fit the model its config builds: {'; '.join(parts)}")


@dataclass
class ModelFolder:
    """What a model folder holds, loaded on the CPU."""

    model: DualEncoder
    tokenizer: object
    config: Config
    history: list[dict]
    class_names: list[str] | None


def read_model_folder(folder: Path) -> ModelFolder:
    """Load a local export or checkpoint folder. The config is untrusted input, read as data
    (:func:`~vcl_dist.config.load_saved_config`).

    Raises:
        ModelNotFoundError: no config in the folder. ConfigError: a config that cannot be loaded.
        BrokenModelError: weights cut short, corrupt, or not those of the config's model.
    """
    from transformers import AutoTokenizer

    from ..config import load_saved_config

    if not (folder / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"no {CONFIG_FILE} in the model folder {folder}")
    cfg = load_saved_config((folder / CONFIG_FILE).read_text(), f"the model's {CONFIG_FILE}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0,
                               cfg.similarity, saved_towers=read_tower_configs(folder))
    if (folder / WEIGHTS_FILE).exists():
        from safetensors import safe_open

        load_weights(model, folder / WEIGHTS_FILE)
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            model.similarity = (weights.metadata() or {}).get("similarity", model.similarity)  # as recorded at export
    else:  # a training checkpoint
        load_weights(model, folder / MODEL_FILE)
    history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).exists() else []
    classes = parse_class_names((folder / CLASSES_FILE).read_text()) if (folder / CLASSES_FILE).exists() else None
    return ModelFolder(model, tokenizer, cfg, history, classes)


def export_model(source: str | Path, out_dir: str | Path, *, history: list[dict] | None = None,
                 class_names: Sequence[str] | None = None) -> Path:
    """Write ``source`` (a checkpoint or export folder, local) as an export folder ``out_dir``.

    The folder is assembled beside its destination and renamed into place, so a crash never
    leaves a half-written export under the final name.
    """
    from safetensors.torch import save_model

    source, out_dir = Path(source), Path(out_dir)
    loaded = read_model_folder(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # save_model (not save_file) copes with tied or shared tensors.
        save_model(loaded.model, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "similarity": loaded.model.similarity})
        (staging / CONFIG_FILE).write_text(dump_config(loaded.config))
        save_tower_configs(staging, loaded.model)
        loaded.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        history = history if history is not None else loaded.history
        if history:
            (staging / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        class_names = class_names if class_names is not None else loaded.class_names
        if class_names:
            (staging / CLASSES_FILE).write_text(format_class_names(class_names))
        write_hub_files(staging, loaded, history, trained_logit_scale(source))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def upload_export(local_dir: str | Path, filesystem: pafs.FileSystem, target: str) -> None:
    """Copy an export folder to ``target`` in an object store, where nothing can be renamed:
    the old export is removed first and the weights go last, so ``target`` is an export (has
    :data:`WEIGHTS_FILE`) only once every other file is in place — readers meanwhile find no
    export and take the newest checkpoint (:func:`find_model_folder`). An object's upload is
    all-or-nothing in S3, so the weights file itself never appears half-written."""
    local_dir = Path(local_dir)
    filesystem.delete_dir_contents(target, missing_dir_ok=True)
    files = sorted((path for path in local_dir.rglob("*") if path.is_file()), key=lambda path: path.name == WEIGHTS_FILE)
    for path in files:
        destination = f"{target}/{path.relative_to(local_dir).as_posix()}"
        filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


# Ray Train's checkpoint manager state, in the run folder: the checkpoints it registered as
# complete (every worker reported, every file persisted), in report order.
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_FILES = (MODEL_FILE, LOSS_FILE, STATE_FILE, HISTORY_FILE, CONFIG_FILE)


def registered_checkpoints(filesystem: pafs.FileSystem, run_path: str) -> list[str] | None:
    """The run's checkpoint folders that Ray Train registered as complete, newest first (from
    its checkpoint manager's snapshot); None when the run has no snapshot (a run of another
    trainer, or folders copied by hand). A folder that a crash left half-written was never
    registered, whatever its name."""
    path = f"{run_path}/{CHECKPOINT_MANAGER_SNAPSHOT}"
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with filesystem.open_input_stream(path) as stream:
            snapshot = json.loads(stream.read().decode())
        results = snapshot["checkpoint_results"]
        indices = snapshot.get("checkpoint_report_indices") or list(range(len(results)))
        names = [name for _, name in sorted(zip(indices, (r["checkpoint_dir_name"] for r in results)), reverse=True)]
    except (KeyError, TypeError, ValueError) as err:
        raise OSError(f"unreadable {display_uri(path, filesystem)}: {type(err).__name__}: {err}") from None
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if latest in names:  # the latest first, whatever a score order did to the list
        names.remove(latest)
        names.insert(0, latest)
    return [f"{run_path}/{name}" for name in names]


def registered_metrics(filesystem: pafs.FileSystem, checkpoint: str) -> dict:
    """The metrics Ray Train registered with the checkpoint folder ``checkpoint`` (empty when
    its run has no readable snapshot, or the snapshot does not list it)."""
    run_path, name = checkpoint.rstrip("/").rsplit("/", 1)
    try:
        with filesystem.open_input_stream(f"{run_path}/{CHECKPOINT_MANAGER_SNAPSHOT}") as stream:
            results = json.loads(stream.read().decode())["checkpoint_results"]
        return next((r.get("metrics") or {} for r in results if r.get("checkpoint_dir_name") == name), {})
    except (OSError, KeyError, TypeError, ValueError):
        return {}


def checkpoint_problem(filesystem: pafs.FileSystem, folder: str) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from (a file missing, a torch file cut
    short, a shard of the memory missing), or None. Cheap: it reads the torch files' zip
    directories (at their ends, which a cut-short copy lacks), not their contents."""
    import zipfile

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
        try:
            with filesystem.open_input_file(f"{folder}/{name}") as file, zipfile.ZipFile(file):
                pass
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"unreadable {name} ({type(err).__name__}: {' '.join(str(err).split())[:100]})"
    return None


def usable_checkpoints(filesystem: pafs.FileSystem, run_path: str, warn=None) -> list[str]:
    """The run's checkpoints to resume or load from, newest first: those Ray Train registered
    (by name when the run has no manager snapshot), less any with a :func:`checkpoint_problem`,
    each of which is passed to ``warn(line)``."""
    try:
        registered = registered_checkpoints(filesystem, run_path)
    except OSError as err:  # a snapshot cut short or not Ray's: the folders, by name, are what is left
        if warn is not None:
            warn(f"vcl-dist: warning: {' '.join(str(err).split())[:300]}; taking the checkpoints by name")
        registered = None
    if registered is None:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
        registered = sorted((e.path for e in entries if e.type == pafs.FileType.Directory
                             and e.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    usable = []
    for folder in registered:
        problem = checkpoint_problem(filesystem, folder)
        if problem is None:
            usable.append(folder)
        elif warn is not None:
            warn(f"vcl-dist: warning: skipped the checkpoint {display_uri(folder, filesystem)}: {problem}")
    return usable


def say_on_stdout(line: str) -> None:
    """What a command-line reader tells about the model it took: one line on stdout."""
    print(line, flush=True)


def warn_on_stderr(line: str) -> None:
    """The ``warn`` of the command-line readers: a skipped checkpoint is one line on stderr."""
    print(line, file=sys.stderr, flush=True)


def newest_checkpoint(filesystem: pafs.FileSystem, run_path: str, warn=None) -> str | None:
    """The run's newest usable checkpoint folder (:func:`usable_checkpoints`), or None."""
    usable = usable_checkpoints(filesystem, run_path, warn)
    return usable[0] if usable else None


def recorded_step(filesystem: pafs.FileSystem, folder: str) -> int:
    """The training step a model folder holds: what Ray Train registered with a checkpoint, else
    the last entry of its ``history.json``; -1 when neither says."""
    step = registered_metrics(filesystem, folder).get("step")
    if isinstance(step, int):
        return step
    try:
        with filesystem.open_input_stream(f"{folder}/{HISTORY_FILE}") as stream:
            history = json.loads(stream.read().decode())
        return int(history[-1]["step"]) if history else -1
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return -1


def find_model_folder(filesystem: pafs.FileSystem, path: str, shown: str, say=None) -> str:
    """The folder that holds the weights. The rule: ``path`` itself when it holds weights; for a
    run folder, whichever of its export (``model/``) and its newest usable checkpoint holds the
    later training step (:func:`recorded_step`), the export on a tie. ``say(line)`` is told
    which was taken and why.

    Raises:
        ModelNotFoundError: none of them, or the path cannot be reached (one line).
    """
    def has(name: str, folder: str = path) -> bool:
        return filesystem.get_file_info(f"{folder}/{name}").type != pafs.FileType.NotFound

    try:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.File:
            raise ModelNotFoundError(f"{shown} is a file: pass the model's folder (an export, a checkpoint or a run)")
        if has(WEIGHTS_FILE) or has(MODEL_FILE):
            return path
        export = f"{path}/{EXPORT_DIR}" if has(f"{EXPORT_DIR}/{WEIGHTS_FILE}") else None
        checkpoint = newest_checkpoint(filesystem, path, warn_on_stderr)
        steps = {folder: recorded_step(filesystem, folder) for folder in (export, checkpoint) if folder}
    except ModelNotFoundError:
        raise
    except OSError as err:
        raise ModelNotFoundError(f"cannot reach {shown}: {' '.join(str(err).split())[:200]}") from None
    if not steps:
        raise ModelNotFoundError(f"no model at {display_uri(shown, filesystem)}: expected an export ({WEIGHTS_FILE}), "
                                 "a checkpoint (model.pt) or a run folder holding either")
    chosen = max(steps, key=lambda folder: (steps[folder], folder == export))
    if say is not None:
        other = next((f for f in steps if f != chosen), None)
        beside = f"; {'its export' if other == export else 'its newest checkpoint'} holds step {steps[other]}" if other else ""
        what = "the run's export" if chosen == export else f"the checkpoint {chosen.rsplit('/', 1)[1]}"
        say(f"vcl-dist: model: {what} of {shown}, training step {steps[chosen]}{beside}")
    return chosen


@contextmanager
def local_model_folder(path: str | Path, s3: S3Config | None = None) -> Iterator[Path]:
    """The local folder holding the model at ``path``; an ``s3://`` model is downloaded for the
    duration of the ``with`` block."""
    path = str(path)
    if path.startswith("s3://"):
        filesystem, remote = filesystem_for(path, s3)
        folder = find_model_folder(filesystem, remote, path, say=say_on_stdout)
        with tempfile.TemporaryDirectory() as local:
            pafs.copy_files(folder, local, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
            yield Path(local)
        return
    local = str(Path(path).expanduser().resolve())
    yield Path(find_model_folder(pafs.LocalFileSystem(), local, path, say=say_on_stdout))


def model_files(path: str | Path, s3: S3Config | None = None) -> dict[str, bytes]:
    """Every file of the model at ``path`` by relative name: what Ray ships to inference actors
    on other nodes, which cannot read the driver's disk. (Not an export's ``clip/`` folder: the
    same weights again, for transformers.)"""
    with local_model_folder(path, s3) as folder:
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
                if f.is_file() and f.relative_to(folder).parts[0] != CLIP_DIR}


@contextmanager
def folder_of_files(files: dict[str, bytes]) -> Iterator[Path]:
    """The inverse of :func:`model_files`: the files written to a temporary folder."""
    with tempfile.TemporaryDirectory() as local:
        for name, data in files.items():
            target = Path(local) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield Path(local)
