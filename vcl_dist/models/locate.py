"""Which folder holds a model: an export, a checkpoint, or a run folder (its export or its newest
usable checkpoint, whichever holds the later training step: `find_model_folder`).

A run's checkpoints are those Ray Train registered as complete (its checkpoint manager's
snapshot: `registered_checkpoints`), newest first, less any that fail a check, each
skipped with a warning (`usable_checkpoints`). A model user checks what it loads (the
weights and the config: `model_files_problem`); the trainer checks the whole training
state (`vcl_dist.train.checkpoint.checkpoint_problem`).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from ..config import S3Config
from ..runtime.console import one_line, say, warn
from ..storage import display_uri, filesystem_for
from .export import CONFIG_FILE, EXPORT_DIR, HISTORY_FILE, MODEL_FILE, WEIGHTS_FILE, ModelNotFoundError
from .hub_export import CLIP_DIR

CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint_<timestamp> folders: the newest sorts last
# Ray Train's checkpoint manager state, in the run folder: the checkpoints it registered as
# complete (every worker reported, every file persisted), in report order.
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"


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


def torch_file_problem(filesystem: pafs.FileSystem, folder: str, name: str) -> str | None:
    """Why the torch file ``name`` of ``folder`` is unreadable, or None. Cheap: it reads the
    file's zip directory (at its end, which a cut-short copy lacks), not its contents."""
    try:
        with filesystem.open_input_file(f"{folder}/{name}") as file, zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"unreadable {name} ({type(err).__name__}: {one_line(err, 100)})"


def model_files_problem(filesystem: pafs.FileSystem, folder: str) -> str | None:
    """Why the checkpoint ``folder`` holds no loadable model (its config or weights missing, the
    weights cut short), or None."""
    names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))}
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if name not in names]
    if missing:
        return f"missing {', '.join(missing)}"
    return torch_file_problem(filesystem, folder, MODEL_FILE)


Problem = Callable[[pafs.FileSystem, str], "str | None"]


def usable_checkpoints(filesystem: pafs.FileSystem, run_path: str, warn=None,
                       problem: Problem = model_files_problem) -> list[str]:
    """The run's checkpoints to resume or load from, newest first: those Ray Train registered
    (by name when the run has no manager snapshot), less any with a ``problem`` (by default
    `model_files_problem`), each of which is passed to ``warn(line)``."""
    try:
        registered = registered_checkpoints(filesystem, run_path)
    except OSError as err:  # a snapshot cut short or not Ray's: the folders, by name, are what is left
        if warn is not None:
            warn(f"vcl-dist: warning: {one_line(err, 300)}; taking the checkpoints by name")
        registered = None
    if registered is None:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
        registered = sorted((e.path for e in entries if e.type == pafs.FileType.Directory
                             and e.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    usable = []
    for folder in registered:
        found = problem(filesystem, folder)
        if found is None:
            usable.append(folder)
        elif warn is not None:
            warn(f"vcl-dist: warning: skipped the checkpoint {display_uri(folder, filesystem)}: {found}")
    return usable


def newest_checkpoint(filesystem: pafs.FileSystem, run_path: str, warn=None,
                      problem: Problem = model_files_problem) -> str | None:
    """The run's newest usable checkpoint folder (`usable_checkpoints`), or None."""
    usable = usable_checkpoints(filesystem, run_path, warn, problem)
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
    later training step (`recorded_step`), the export on a tie. ``say(line)`` is told
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
        checkpoint = newest_checkpoint(filesystem, path, warn)
        steps = {folder: recorded_step(filesystem, folder) for folder in (export, checkpoint) if folder}
    except ModelNotFoundError:
        raise
    except OSError as err:
        raise ModelNotFoundError(f"cannot reach {shown}: {one_line(err, 200)}") from None
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
        folder = find_model_folder(filesystem, remote, path, say=say)
        with tempfile.TemporaryDirectory() as local:
            pafs.copy_files(folder, local, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
            yield Path(local)
        return
    local = str(Path(path).expanduser().resolve())
    yield Path(find_model_folder(pafs.LocalFileSystem(), local, path, say=say))


def model_files(path: str | Path, s3: S3Config | None = None) -> dict[str, bytes]:
    """Every file of the model at ``path`` by relative name: what Ray ships to inference actors
    on other nodes, which cannot read the driver's disk. (Not an export's ``clip/`` folder: the
    same weights again, for transformers.)"""
    with local_model_folder(path, s3) as folder:
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
                if f.is_file() and f.relative_to(folder).parts[0] != CLIP_DIR}


@contextmanager
def folder_of_files(files: dict[str, bytes]) -> Iterator[Path]:
    """The inverse of `model_files`: the files written to a temporary folder."""
    with tempfile.TemporaryDirectory() as local:
        for name, data in files.items():
            target = Path(local) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield Path(local)
