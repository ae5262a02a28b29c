"""Mixed precision: one place that decides how the towers run on a device."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the device, or nothing. bf16 keeps float32's range, so unlike fp16
    it needs no loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
