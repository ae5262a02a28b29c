"""How a worker holds the dual encoder (``train.strategy``): replicated under DDP, or sharded
over the workers with FSDP2 (``torch.distributed.fsdp.fully_shard``).

DDP keeps both towers, their gradients and AdamW's state whole on every worker. FSDP2 shards
each repeated block of both towers (`vcl_dist.models.blocks`), then the whole model (the
stems, embeddings and projections), so that each worker holds 1/W of every parameter, gradient
and optimizer state: a block's parameters are gathered just before it runs and freed after, and
its gradients are reduce-scattered as soon as they are complete. The module tree and its
parameter names stay those of the bare model (``fully_shard`` changes the class in place, wraps
nothing), so checkpoints and exports have the same keys under both.

The losses' own parameters (a temperature, a bias, class embeddings) are small and stay whole on
every worker under both strategies; their gradients are averaged by hand
(`vcl_dist.losses.gather.average_gradients`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..models.blocks import tower_blocks

# The model's methods that run its towers outside ``forward`` (evaluation, zero-shot prompts):
# under FSDP they must gather the parameters as ``forward`` does.
ENCODE_METHODS = ("encode_image", "encode_text", "image_features", "text_features")


def shard_model(model: nn.Module, strategy: str, device: torch.device, world: int, use_amp: bool) -> nn.Module:
    """``model`` on ``device``, ready for training under ``strategy`` in the default process group
    of ``world`` workers: DDP-wrapped (when ``world`` > 1, as Ray Train's ``prepare_model``
    would), or sharded in place with FSDP2 (also on one worker, so that a run behaves alike at
    every world size). ``use_amp`` under FSDP: parameters gathered in bf16, gradients reduced in
    float32 (bf16 sums over many workers lose too much)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model.to(device)
    if strategy == "ddp":
        if world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_amp else MixedPrecisionPolicy()
    for block in tower_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in ENCODE_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def bare_model(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (an FSDP2 model is its own bare model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over the workers (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(bare_model(model), FSDPModule)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Backward passes inside it reduce gradients over the workers only when ``enabled``, under
    DDP (its ``no_sync``: the micro-batches before the last accumulate whole gradients locally).
    FSDP reduce-scatters every micro-batch's gradients into the sharded ones regardless: holding
    whole unsharded gradients until the last would undo what sharding saves."""
    if not enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
