"""Training checkpoints: one folder with plain tensors and JSON, loadable with weights_only=True.

Layout: ``model.pt`` (the dual encoder's state dict), ``loss.pt`` (the loss's parameters,
such as a temperature or class embeddings), ``training_state.pt`` (optimizer, scheduler,
negative memory, epoch, step), ``history.json`` (metrics of every finished epoch), ``config.yaml``
(the resolved config), ``tokenizer/`` and ``classes.txt`` (when the data has class names).
Enough to resume a run or to serve the model (see :mod:`vcl_dist.retrieval.model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MODEL_FILE = "model.pt"
LOSS_FILE = "loss.pt"
STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
CLASSES_FILE = "classes.txt"


def save_checkpoint(folder: str | Path, *, model, criterion, optimizer, scheduler, epoch: int, step: int,
                    history: list[dict], config_yaml: str, tokenizer, class_names: list[str] | None = None,
                    epoch_step: int = 0, epoch_progress: dict | None = None, rng: list[dict] | None = None) -> None:
    """``epoch``: the epoch the checkpoint is in (0-based); ``epoch_step``: steps done in it, 0 when
    the checkpoint closes it; ``epoch_progress``: the epoch's running sums, to finish it after a
    restart; ``rng``: every worker's RNG state, in rank order."""
    folder = Path(folder)
    torch.save(model.state_dict(), folder / MODEL_FILE)
    torch.save(criterion.state_dict(), folder / LOSS_FILE)
    memory = getattr(criterion, "memory", None)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
         "epoch_step": epoch_step, "epoch_progress": epoch_progress, "rng": rng,
         "memory": memory.state_dict() if memory is not None else None},
        folder / STATE_FILE,
    )
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    (folder / CONFIG_FILE).write_text(config_yaml)
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    if class_names:
        (folder / CLASSES_FILE).write_text("".join(f"{name}\n" for name in class_names))


def load_checkpoint(folder: str | Path, *, model, criterion=None, optimizer=None, scheduler=None) -> dict:
    """Restore what is given; returns ``epoch``, ``step``, ``epoch_step``, ``epoch_progress``,
    ``rng`` and ``history`` of the saved run."""
    folder = Path(folder)
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if criterion is not None:
        criterion.load_state_dict(torch.load(folder / LOSS_FILE, map_location="cpu", weights_only=True))
        memory = getattr(criterion, "memory", None)
        if memory is not None and state.get("memory") is not None:
            memory.load_state_dict(state["memory"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    history = json.loads((folder / HISTORY_FILE).read_text())
    return {"epoch": state["epoch"], "step": state["step"], "history": history, "epoch_step": state.get("epoch_step", 0),
            "epoch_progress": state.get("epoch_progress"), "rng": state.get("rng")}
