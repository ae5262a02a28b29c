"""How the towers run in a worker: channels-last memory format, ``torch.compile``.

Both are set on the bare model before DDP wraps it. ``Module.compile`` compiles in place, so
the state dict keeps its keys (no ``_orig_mod.`` prefix): checkpoints and exports are the same
with and without it, and a compiled run resumes an eager one's checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig

TOWERS = ("image_tower", "text_tower")


def prepare_towers(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Apply ``train.channels_last`` and ``train.compile`` to ``model``'s towers; returns what
    was done, for the run's log."""
    done = []
    image_tower = getattr(model, "image_tower", None)
    if cfg.channels_last and isinstance(image_tower, nn.Module):
        image_tower.to(memory_format=torch.channels_last)
        done.append("channels-last image tower")
    if cfg.compile:
        mode = "default" if cfg.compile is True else cfg.compile
        compiled = [name for name in TOWERS if isinstance(getattr(model, name, None), nn.Module)]
        for name in compiled:
            getattr(model, name).compile(mode=mode)
        done.append(f"torch.compile (mode {mode}) of {', '.join(compiled)}")
    return done


def to_channels_last(images: torch.Tensor) -> torch.Tensor:
    """An ``[N, C, H, W]`` image batch in channels-last strides (a no-op for other shapes: cached features)."""
    return images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images
