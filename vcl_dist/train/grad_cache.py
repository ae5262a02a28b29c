"""Cached-gradient micro-batches (``train.micro_batch_size``): the gradient of a whole local
batch while holding the activations of one micro-batch at a time (GradCache, Gao et al. 2021).

1. Embed the local batch micro-batch by micro-batch without a graph; remember the random state
   before each (dropout, and augmentation done on the device, must replay identically).
2. Compute the loss on the concatenated embeddings — gathered across workers as always — and
   its gradient with respect to the embeddings (and the loss's own parameters).
3. Re-run each micro-batch with its remembered random state, this time with a graph, and
   back-propagate its slice of the cached embedding gradient. DDP's gradient all-reduce runs
   once, on the last micro-batch (the others run under ``no_sync``); FSDP reduce-scatters
   each micro-batch's share (`vcl_dist.train.sharding.gradient_sync`).

By the chain rule the accumulated parameter gradients are those of one pass over the whole
batch (tested against it with dropout, on 2 gloo workers). What differs is what no method can
keep: a BatchNorm layer normalises each micro-batch by its own statistics. Its running
statistics are updated once per micro-batch, in the second pass only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses.hooks import PLAIN, StepHooks
from ..runtime.precision import autocast, full_precision
from ..runtime.step_phases import phase
from .sharding import gradient_sync


def micro_batches(rows: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _random_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _norm_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, saved copy)`` of every BatchNorm running statistic, to undo the first pass's updates."""
    return [(buffer, buffer.clone()) for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buffer in module.buffers()]


def cached_gradient_backward(model, criterion, batch: dict, device: torch.device, use_amp: bool,
                             micro_batch_size: int, hooks: StepHooks = PLAIN) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``criterion`` over the whole batch; returns the
    loss (detached). ``batch``: on ``device``, as `vcl_dist.train.step.train_step` has it;
    ``hooks``: lent to the loss (the step's timer and finiteness check)."""
    parts = micro_batches(batch["image"].shape[0], micro_batch_size)
    states, images, texts = [], [], []
    statistics = _norm_statistics(model)
    with torch.no_grad(), phase("forward"):
        for part in parts:
            states.append(_random_state(device))
            with autocast(device, use_amp):
                image_emb, text_emb = model(batch["image"][part], batch["input_ids"][part], batch["attention_mask"][part])
            images.append(full_precision(image_emb))
            texts.append(full_precision(text_emb))
        for buffer, saved in statistics:
            buffer.copy_(saved)
    after_first_pass = _random_state(device)
    image_emb, text_emb = torch.cat(images).requires_grad_(), torch.cat(texts).requires_grad_()
    del images, texts
    with phase("loss"):
        loss = criterion(image_emb, text_emb, batch["label"], batch["group"], hooks)
    with phase("backward"):
        loss.backward()  # the embeddings' gradient: every worker's terms, through the gather
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        _set_random_state(states[index], device)
        with gradient_sync(model, enabled=last):
            with phase("forward"), autocast(device, use_amp):  # again, with a graph this time
                image_part, text_part = model(batch["image"][part], batch["input_ids"][part], batch["attention_mask"][part])
            with phase("backward"):
                torch.autograd.backward([full_precision(image_part), full_precision(text_part)],
                                        [image_emb.grad[part], text_emb.grad[part]])
    _set_random_state(after_first_pass, device)
    return loss.detach()
