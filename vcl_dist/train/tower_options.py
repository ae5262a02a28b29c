"""How the towers run in a worker: channels-last memory format, ``torch.compile``, activation
checkpointing.

All are set on the bare model before DDP wraps it or FSDP shards it. ``Module.compile``
compiles in place, so the state dict keeps its keys (no ``_orig_mod.`` prefix): checkpoints
and exports are the same with and without it, and a compiled run resumes an eager one's
checkpoint. Activation checkpointing replaces each block's ``forward`` on the instance (no
wrapper module), for the same reason.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TrainConfig
from ..models.blocks import TOWERS, tower_blocks


def prepare_towers(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Apply ``train.channels_last`` and ``train.compile`` to ``model``'s towers; returns what
    was done, for the run's log."""
    done = []
    image_tower = getattr(model, "image_tower", None)
    if cfg.channels_last and isinstance(image_tower, nn.Module):
        image_tower.to(memory_format=torch.channels_last)
        done.append("channels-last image tower")
    if cfg.activation_checkpointing:
        count = checkpoint_blocks(model)
        done.append(f"activations of {count} blocks recomputed in the backward pass")
    if cfg.compile:
        mode = "default" if cfg.compile is True else cfg.compile
        compiled = [name for name in TOWERS if isinstance(getattr(model, name, None), nn.Module)]
        for name in compiled:
            getattr(model, name).compile(mode=mode)
        done.append(f"torch.compile (mode {mode}) of {', '.join(compiled)}")
    return done


def checkpoint_blocks(model: nn.Module) -> int:
    """Keep only each tower block's inputs for the backward pass and recompute the rest there
    (``train.activation_checkpointing``): activation memory of one block instead of all, for
    about one more forward pass of compute. Returns how many blocks."""
    blocks = tower_blocks(model)
    for block in blocks:
        block.forward = functools.partial(_recomputed, block, block.forward)
    return len(blocks)


def _recomputed(block: nn.Module, forward, *args, **kwargs):
    """``forward``, its activations recomputed in backward (non-reentrant: keyword arguments
    and outputs that need no gradient are fine; the random state is replayed, so dropout
    draws the same masks). Without autograd (evaluation, a locked tower), a plain call."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _statistics_kept(block)),
                      **kwargs)


@contextmanager
def _statistics_kept(block: nn.Module):
    """The recomputation leaves BatchNorm's running statistics as the forward pass left them
    (without this they would take the batch in twice)."""
    saved = [(buffer, buffer.clone()) for module in block.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
             for buffer in module.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """An ``[N, C, H, W]`` image batch in channels-last strides (a no-op for other shapes: cached features)."""
    return images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images
