"""One training step, and the collation that feeds it; free of Ray so it runs anywhere.

A step: batch to the device (non-blocking from pinned memory on GPU) → both towers under bf16
autocast on GPU → the loss in float32 over the global pool → backward (through the gather;
DDP averages the model's gradients, the loss's own parameters are averaged here) → clip →
optimizer and learning-rate step. With ``train.micro_batch_size``, the towers' forward and
backward run in micro-batches around the loss (`.grad_cache`).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from ..data.shard_format import TENSOR_COLUMNS
from ..losses.gather import average_gradients
from ..losses.hooks import StepHooks
from ..runtime.precision import autocast, full_precision
from ..runtime.step_phases import phase
from ..runtime.step_verdict import NonFiniteStepError, PendingVerdict, check_finite, checks_on_device, judge
from .grad_cache import cached_gradient_backward
from .grad_norm import clip_gradients
from .tower_options import to_channels_last

# What a step lends the loss: its phases timed by the step's clock, the gathered embeddings'
# finiteness judged at once or, inside checks_on_device, on the device.
STEP_HOOKS = StepHooks(phase=phase, check_finite=check_finite)

__all__ = ["NonFiniteStepError", "PendingVerdict", "collate_rows", "pinned_collate_rows", "train_step"]


def collate_rows(batch: dict[str, np.ndarray], pin_memory: bool = False) -> dict:
    """numpy columns -> CPU tensors, plus ``bad_shards``: the shard of every bad row (a list).

    Ray hands out read-only zero-copy views; torch needs writable memory, hence the copy.
    Pinned (page-locked) memory lets the copy to the GPU overlap with compute.
    """
    tensors = {name: torch.from_numpy(np.array(batch[name], copy=True)) for name in TENSOR_COLUMNS}
    if pin_memory:
        tensors = {name: t.pin_memory() for name, t in tensors.items()}
    tensors["bad_shards"] = [str(shard) for shard, ok in zip(batch["shard"], batch["valid"]) if not ok]
    return tensors


def pinned_collate_rows(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return collate_rows(batch, pin_memory=True)


def train_step(model, criterion, optimizer, scheduler, batch: dict[str, torch.Tensor], device: torch.device,
               use_amp: bool, grad_clip_norm: float | None, micro_batch_size: int | None = None,
               verdict_on_device: bool = False, channels_last: bool = False,
               cached_always: bool = False) -> float | PendingVerdict:
    """One optimisation step on a collated batch; returns this worker's loss value.

    ``micro_batch_size``: compute the batch's gradient in micro-batches of that many rows, with
    cached embedding gradients (`.grad_cache`); ``cached_always``: that way even when the
    batch fits one micro-batch. Every worker must take the same way: DDP's first forward with
    gradient after its first step rebuilds its buckets (a collective), and the cached way reaches
    it after the loss, the plain way before.

    ``verdict_on_device`` (needs a fused AdamW): the step never waits for the device; it
    returns a `PendingVerdict` instead of the loss, and a step that fails it is skipped
    by the optimizer on the device (`vcl_dist.runtime.step_verdict`). ``channels_last``: the image
    batch goes to the device in channels-last strides (``train.channels_last``).

    Raises:
        NonFiniteStepError: (unless ``verdict_on_device``) the gathered embeddings (from the
            loss), the loss or the gradient norm are not finite; before ``optimizer.step``, so
            the weights stay as they were. The gradient norm is taken after DDP's all-reduce,
            so every worker reaches the same verdict.
    """
    with phase("h2d"):
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        if channels_last:
            batch["image"] = to_channels_last(batch["image"])
    optimizer.zero_grad(set_to_none=True)
    with checks_on_device() if verdict_on_device else nullcontext([]) as checks:
        if micro_batch_size and (cached_always or micro_batch_size < batch["image"].shape[0]):
            loss = cached_gradient_backward(model, criterion, batch, device, use_amp, micro_batch_size, STEP_HOOKS)
        else:
            with phase("forward"), autocast(device, use_amp):
                image_emb, text_emb = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            with phase("loss"):
                loss = criterion(full_precision(image_emb), full_precision(text_emb), batch["label"], batch["group"],
                                 STEP_HOOKS)
            with phase("backward"):  # through the gather, and DDP's gradient all-reduce
                loss.backward()
    with phase("optimizer"):
        average_gradients(criterion.parameters())
        grad_norm = clip_gradients([p for g in optimizer.param_groups for p in g["params"]], grad_clip_norm)
        values = torch.stack([loss.detach().float(), grad_norm.float(), *[ok.float() for _, ok in checks]])
        if verdict_on_device:
            finite = torch.isfinite(values[:2]).all() & values[2:].bool().all()
            optimizer.found_inf = (~finite).float()  # fused AdamW skips the update (and its step count) when 1
            outcome = PendingVerdict(values, tuple(name for name, _ in checks))
        else:
            optimizer.__dict__.pop("found_inf", None)  # a skip flag left by a step judged on the device
            outcome = judge(values.tolist())  # one host sync
        optimizer.step()
        scheduler.step()
    return outcome
