"""Mixed precision: one place that decides how the towers run on a device."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the device, or nothing. bf16 keeps float32's range, so unlike fp16
    it needs no loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def full_precision(embeddings: torch.Tensor) -> torch.Tensor:
    """Embeddings as the loss takes them: autocast's bf16 as float32 (distances and softmaxes
    over the pool lose too much in bf16); float32 and float64 as they are."""
    return embeddings if embeddings.dtype in (torch.float32, torch.float64) else embeddings.float()
