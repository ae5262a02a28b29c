"""The central equivalence: the gathered loss on W gloo workers is the single-process loss.

Each worker holds its slice of one global batch; the towers are wrapped in DDP. The mean of
the workers' loss values must equal the loss of one process on the whole batch, and every
DDP-averaged parameter gradient must equal the single-process gradient (float64, 1e-6).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vcl_dist.losses import TripletLoss
from vcl_dist.losses.negatives import NEGATIVE_SELECTION

MODES = sorted(NEGATIVE_SELECTION)


class TinyDualEncoder(nn.Module):
    """Linear towers: the gradient check is about the loss, the gather and DDP, not about
    BatchNorm (whose per-worker statistics would differ from the whole batch's by design)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5, bias=False))
        self.text = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 5, bias=False))

    def forward(self, x, y):
        return self.image(x), self.text(y)


def make_batch(n):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 7, generator=g, dtype=torch.float64)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[::5] = -1
    groups = torch.arange(n)
    groups[3] = groups[2]
    return x, y, labels, groups


def make_model():
    torch.manual_seed(7)
    return TinyDualEncoder().double()


def loss_and_grads(model, x, y, labels, groups, negatives):
    model.zero_grad()
    u, v = model(x, y)
    loss = TripletLoss(margin=1.0, negatives=negatives)(u, v, labels, groups)
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    return loss.detach(), {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def _worker(rank, world, sizes, out_dir):
    # A file rendezvous: no TCP port that another process could take in between.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y, labels, groups = make_batch(sum(sizes))
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    model = DistributedDataParallel(make_model())
    results = {}
    for negatives in MODES:
        loss, grads = loss_and_grads(model, x[part], y[part], labels[part], groups[part], negatives)
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        results[negatives] = (mean_loss / world, grads)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(6, 6), (5, 4, 3)], ids=["world2-equal", "world3-unequal"])
def test_gathered_loss_and_ddp_gradients_equal_single_process(sizes, tmp_path):
    mp.spawn(_worker, args=(len(sizes), list(sizes), str(tmp_path)), nprocs=len(sizes), join=True)
    x, y, labels, groups = make_batch(sum(sizes))
    model = make_model()
    for negatives in MODES:
        want_loss, want_grads = loss_and_grads(model, x, y, labels, groups, negatives)
        assert want_loss.item() > 0
        for rank in range(len(sizes)):
            got_loss, got_grads = torch.load(tmp_path / f"rank{rank}.pt")[negatives]
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-9, msg=f"{negatives} loss, rank {rank}")
            assert got_grads.keys() == want_grads.keys()
            for name, want in want_grads.items():
                assert want.abs().sum() > 0, name
                torch.testing.assert_close(got_grads[name], want, rtol=1e-6, atol=1e-9, msg=f"{negatives} {name} rank {rank}")
