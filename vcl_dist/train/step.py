"""One training step, and the collation that feeds it; free of Ray so it runs anywhere.

A step: batch to the device (non-blocking from pinned memory on GPU) → both towers under bf16
autocast on GPU → the loss in float32 over the global pool → backward (through the gather;
DDP averages the model's gradients, the loss's own parameters are averaged here) → clip →
optimizer and learning-rate step. With ``train.micro_batch_size``, the towers' forward and
backward run in micro-batches around the loss (:mod:`.grad_cache`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_, get_total_norm

from ..data.shard_format import TENSOR_COLUMNS
from ..losses.gather import average_gradients
from ..precision import autocast
from ..step_phases import phase
from .grad_cache import cached_gradient_backward


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


class NonFiniteStepError(FloatingPointError):
    """The step's loss or gradient norm is NaN or infinite; the optimizer step was not taken."""


def train_step(model, criterion, optimizer, scheduler, batch: dict[str, torch.Tensor], device: torch.device,
               use_amp: bool, grad_clip_norm: float | None, micro_batch_size: int | None = None) -> float:
    """One optimisation step on a collated batch; returns this worker's loss value.

    ``micro_batch_size``: compute the batch's gradient in micro-batches of that many rows, with
    cached embedding gradients (:mod:`.grad_cache`); every worker must have as many micro-batches.

    Raises:
        FloatingPointError: the gathered embeddings are not finite (from the loss), or
            :class:`NonFiniteStepError`: the loss or the gradient norm is not; in both cases
            before ``optimizer.step``, so the weights stay as they were. The gradient norm is
            taken after DDP's all-reduce, so every worker reaches the same verdict.
    """
    with phase("h2d"):
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    if micro_batch_size and micro_batch_size < batch["image"].shape[0]:
        loss = cached_gradient_backward(model, criterion, batch, device, use_amp, micro_batch_size)
    else:
        with phase("forward"), autocast(device, use_amp):
            image_emb, text_emb = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        with phase("loss"):
            # The loss runs in float32: distances and softmaxes over the pool lose too much in bf16.
            loss = criterion(image_emb.float(), text_emb.float(), batch["label"], batch["group"])
        with phase("backward"):  # through the gather, and DDP's gradient all-reduce
            loss.backward()
    with phase("optimizer"):
        average_gradients(criterion.parameters())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if grad_clip_norm:
            grad_norm = clip_grad_norm_(params, grad_clip_norm)
        else:
            grad_norm = get_total_norm([p.grad for p in params if p.grad is not None])
        loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one host sync
        if not (np.isfinite(loss_value) and np.isfinite(norm_value)):
            raise NonFiniteStepError(f"loss {loss_value:.4g}, gradient norm {norm_value:.4g}")
        optimizer.step()
        scheduler.step()
    return loss_value
