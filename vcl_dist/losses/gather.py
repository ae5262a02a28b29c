"""A differentiable all-gather of per-worker embeddings into the global batch.

``gather_with_grad`` returns the concatenation of every worker's rows, in rank order, and its
backward sends each worker the gradient of the rows it owns, summed over every worker's loss
(an all-reduce, then the own slice). Combined with a loss that each worker computes for its
own anchor rows only ("local loss"), the sum of the workers' losses is the loss of the whole
global batch and the gradients are exact: neither gather without gradient (misses the other
workers' terms) nor a full loss on every worker (counts each term W times) gives that; see
open_clip issues 616 and 894.

Local batch sizes may differ (the short last batch of an epoch): rows are padded to the
largest size for the collective and the padding is cut away again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_HOST_GROUPS: dict[int, dist.ProcessGroup] = {}


def host_group() -> dist.ProcessGroup | None:
    """The group for small collectives whose result the host needs at once (batch sizes, the
    lock-step flags): a gloo group over every rank when the default group is not gloo (nccl),
    else ``None`` (the default group).

    Why: an nccl collective runs on the GPU's stream, so reading its result makes the host wait
    for every kernel queued before it — the host could not queue this step's work while the
    previous one still runs. A gloo collective on CPU tensors waits for the other workers only.
    Made once per default group, by every rank at the same collective (as ``new_group`` needs).
    """
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def gather_sizes(local_size: int) -> list[int]:
    """Every worker's local batch size, in rank order (one tiny collective on the host)."""
    rank, world = distributed_world()
    if world == 1:
        return [local_size]
    size = torch.tensor([local_size], dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=host_group())
    return [int(s) for s in sizes]


def _all_gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    largest = max(sizes)
    padded = tensor
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, _ = distributed_world()
        ctx.offset = sum(sizes[:rank])
        ctx.size = sizes[rank]
        return _all_gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        # Each worker's loss has a gradient for every global row; the owner needs their sum.
        grad_global = grad_global.contiguous()
        dist.all_reduce(grad_global, op=dist.ReduceOp.SUM)
        return grad_global[ctx.offset : ctx.offset + ctx.size], None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``[n_local, ...] -> [sum(sizes), ...]``, differentiable; identity on a single process."""
    if len(sizes) == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, sizes)


def gather_no_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The same gather for tensors that need no gradient (labels, ids, evaluation outputs)."""
    if len(sizes) == 1:
        return tensor
    with torch.no_grad():
        return _all_gather_padded(tensor, sizes)


def average_gradients(parameters) -> None:
    """Average over workers the gradients of parameters that live outside the DDP model
    (the loss's temperature, VCRL's class embeddings): DDP does this only for its own."""
    _, world = distributed_world()
    if world == 1:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world
