"""The training state as whole tensors keyed by parameter name, whichever strategy holds it.

A checkpoint written under DDP resumes under FSDP and the reverse, at any worker count: the
model, the loss and AdamW's state are saved whole (``torch.distributed.checkpoint``'s
``get_state_dict`` with ``full_state_dict``: FSDP's shards gathered, onto the CPU of rank 0),
and AdamW's state is keyed by parameter name (``model.<name>``, ``loss.<name>``), not by its
position in the optimizer, so it means the same under both. Loading hands every worker the
whole state; FSDP keeps each worker's shard of it (``set_state_dict``).

Under FSDP the gathering is a collective: every worker calls `whole_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .sharding import bare_model, is_sharded

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
WHOLE = StateDictOptions(full_state_dict=True)


class _ModelAndLoss(nn.Module):
    """One tree over the model and the loss, so that every parameter AdamW steps has a name."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.loss = model, criterion


@dataclass
class WholeState:
    model: dict
    loss: dict
    optimizer: dict | None


def whole_state(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer | None) -> WholeState:
    """The model's, the loss's and (given) the optimizer's state, whole; under FSDP complete on
    rank 0 only (the others get empty dicts)."""
    bare = bare_model(model)
    model_state = get_model_state_dict(bare, options=GATHERED) if is_sharded(bare) else bare.state_dict()
    optimizer_state = None
    if optimizer is not None:
        optimizer_state = get_optimizer_state_dict(_ModelAndLoss(bare, criterion), optimizer, options=GATHERED)
    return WholeState(model_state, criterion.state_dict(), optimizer_state)


def load_model_state(model: nn.Module, state: dict) -> None:
    """``state``: the whole model state (every worker passes all of it)."""
    bare = bare_model(model)
    if is_sharded(bare):
        set_model_state_dict(bare, state, options=WHOLE)
    else:
        bare.load_state_dict(state)


def load_optimizer_state(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``state``: AdamW's whole state keyed by parameter name, or, from a checkpoint written before
    states were named, by position (the same model and loss under DDP only)."""
    positional = all(isinstance(key, int) for group in state["param_groups"] for key in group["params"])
    if positional and is_sharded(model):
        raise ValueError("the checkpoint's optimizer state is kept by position, not by parameter name: resume it "
                         "with train.strategy=ddp")
    if positional:
        optimizer.load_state_dict(state)
    else:
        set_optimizer_state_dict(_ModelAndLoss(bare_model(model), criterion), optimizer, state, options=WHOLE)
