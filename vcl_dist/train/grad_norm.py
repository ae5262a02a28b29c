"""The gradient norm of a step, and clipping by it, over whole and sharded gradients alike.

Under FSDP the towers' gradients are DTensors (each worker holds a shard) while the loss's own
parameters' are plain tensors; torch's ``clip_grad_norm_`` takes one kind at a time. The norm
of each kind is taken apart (a sharded norm is all-reduced into the whole one, the same on
every worker), then combined, and each kind is scaled by the one coefficient.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm of ``params`` (before clipping); with ``max_norm``, their gradients
    scaled so that it is at most that. A plain 0-d tensor, the same on every worker."""
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    if not sharded:  # DDP or one process: torch's own, unchanged
        if max_norm:
            return clip_grad_norm_(with_grad, max_norm)
        return get_total_norm([p.grad for p in with_grad])
    whole = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    sharded_norm = get_total_norm([p.grad for p in sharded])
    norms = [sharded_norm.full_tensor() if isinstance(sharded_norm, DTensor) else sharded_norm]
    if whole:
        norms.append(get_total_norm([p.grad for p in whole]).to(norms[0]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm:
        with implicit_replication():  # the coefficient, a plain tensor, multiplies the shards
            clip_grads_with_norm_(sharded, max_norm, total)
        if whole:
            clip_grads_with_norm_(whole, max_norm, total.to(whole[0].grad.device))
    return total
