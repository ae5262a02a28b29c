"""A model's folder, as a model user meets it: what it holds, how it loads, how a run exports it.

A **model folder** is an export or a training checkpoint; both hold ``config.yaml`` (the
resolved config), ``tokenizer/``, ``history.json`` (metrics of every finished epoch),
``classes.txt`` (`vcl_dist.class_names`) and ``towers.json`` (pretrained towers' own
configs), and the dual encoder's weights: ``model.safetensors`` in an export, ``model.pt`` in a
checkpoint (whose training state is the trainer's: `vcl_dist.train.checkpoint`).

An **export** (``<run>/model/``) is assembled beside its destination and renamed into place (in
S3, where nothing renames: uploaded with the weights last, `upload_export`). Which folder
of a run to take is `.locate`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.fs as pafs
import torch

from ..class_names import CLASSES_FILE, format_class_names, parse_class_names
from ..config import Config, dump_config
from ..runtime.console import one_line
from .dual_encoder import DualEncoder, build_dual_encoder
from .hub_export import trained_logit_scale, write_hub_files

MODEL_FILE = "model.pt"  # a checkpoint's weights (torch.load(weights_only=True))
WEIGHTS_FILE = "model.safetensors"  # an export's weights
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
TOWERS_FILE = "towers.json"
EXPORT_DIR = "model"  # a run's export, beside its checkpoints


class ModelNotFoundError(FileNotFoundError):
    """No export, checkpoint or run at the given path (one-line message)."""


class BrokenModelError(ValueError):
    """A model file that cannot be used: cut short, not what its name says, or weights that do
    not fit the model its config builds (one line naming the file and what is wrong)."""


def save_tower_configs(folder: Path, model) -> None:
    """The pretrained towers' own configs (`DualEncoder.tower_configs`): a model folder
    builds its structure from them, without the pretrained files it started from."""
    if model.tower_configs:
        (folder / TOWERS_FILE).write_text(json.dumps(model.tower_configs, indent=1, default=str))


def read_tower_configs(folder: Path) -> dict:
    """The pretrained towers' own configs saved beside an export (``towers.json``), or ``{}``."""
    path = folder / TOWERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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
        text = one_line(err)
        if "size mismatch" in text:
            detail = text[text.index("size mismatch"):].split(". ")[0]
            raise BrokenModelError(f"{path}: the weights do not fit the model its config builds: {detail[:300]}") from None
        raise BrokenModelError(f"{path}: truncated or corrupt ({text[:200]})") from None
    except Exception as err:  # noqa: BLE001 - safetensors' and pickle's many error types all mean an unreadable file
        raise BrokenModelError(f"{path}: truncated or corrupt ({type(err).__name__}: "
                               f"{one_line(err, 200)})") from None
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
    (`vcl_dist.config.load_saved_config`).

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
    `WEIGHTS_FILE`) only once every other file is in place — readers meanwhile find no
    export and take the newest checkpoint (`vcl_dist.models.locate.find_model_folder`). An object's upload is
    all-or-nothing in S3, so the weights file itself never appears half-written."""
    local_dir = Path(local_dir)
    filesystem.delete_dir_contents(target, missing_dir_ok=True)
    files = sorted((path for path in local_dir.rglob("*") if path.is_file()), key=lambda path: path.name == WEIGHTS_FILE)
    for path in files:
        destination = f"{target}/{path.relative_to(local_dir).as_posix()}"
        filesystem.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
