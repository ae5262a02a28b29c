"""Cached-gradient micro-batches (``train.micro_batch_size``) give the step of one whole batch:
after a step with micro-batches of 1, 3 and the full local batch, every parameter equals the
one-batch step's, float64 to 1e-10, on 2 gloo workers with DDP and losses with parameters of
their own (VCRL's label tower, InfoNCE's temperature).

With dropout, "the one-batch step" is one forward and backward through the whole graph with the
same dropout masks: the towers run micro-batch by micro-batch with gradient (``MicroForward``),
drawing the random numbers in the order the cached-gradient step draws them in its first pass —
so its second pass must replay them exactly. Without dropout, the reference is the plain step.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vcl_dist.losses import InfoNCELoss, TripletLoss, VCRLLoss
from vcl_dist.train.grad_cache import micro_batches
from vcl_dist.train.schedule import build_optimizer, build_scheduler
from vcl_dist.train.step import train_step

LOCAL_BATCH, WORLD = 6, 2
MICRO_BATCHES = (1, 3, LOCAL_BATCH)


class DropoutDualEncoder(nn.Module):
    """Both towers with dropout, the signature of vcl_dist's DualEncoder."""

    def __init__(self, norm: bool = False, dropout: float = 0.3):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16) if norm else nn.Identity(),
                                   nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 5))
        self.embed = nn.Embedding(20, 8)
        self.text = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 5))

    def forward(self, image, input_ids, attention_mask):
        tokens = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.image(image.double()), self.text(tokens.sum(1) / attention_mask.sum(1, keepdim=True))


class MicroForward(nn.Module):
    """The whole-graph reference: the model run micro-batch by micro-batch, with gradient."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, image, input_ids, attention_mask):
        parts = [self.model(image[p], input_ids[p], attention_mask[p]) for p in micro_batches(image.shape[0], self.size)]
        return torch.cat([i for i, _ in parts]), torch.cat([t for _, t in parts])


def make_loss(name):
    torch.manual_seed(5)
    if name == "triplet":
        return TripletLoss(0.5, "all").double()
    if name == "vcrl":
        return VCRLLoss(2.0, 0.05, "semi_hard", num_classes=3, embed_dim=5, label_weight=0.5).double()
    return InfoNCELoss(init_temperature=0.2).double()


def global_batch():
    g = torch.Generator().manual_seed(9)
    n = LOCAL_BATCH * WORLD
    return {"image": torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64), "input_ids": torch.randint(0, 20, (n, 7), generator=g),
            "attention_mask": (torch.rand(n, 7, generator=g) > 0.2).long().clamp_min_(0).index_fill_(1, torch.tensor([0]), 1),
            "label": torch.randint(-1, 3, (n,), generator=g), "group": torch.arange(n)}


def step_once(rank: int, loss_name: str, clip, dropout: float, micro_batch_size=None, reference_micro=None):
    """One train_step on this worker's slice: cached-gradient with ``micro_batch_size``, or the
    whole-graph reference that runs the towers in micro-batches of ``reference_micro``."""
    torch.manual_seed(1)
    net = DropoutDualEncoder(dropout=dropout).double()
    model = DistributedDataParallel(MicroForward(net, reference_micro) if reference_micro else net)
    criterion = make_loss(loss_name)
    optimizer = build_optimizer([net, criterion], 0.05, 0.01)
    scheduler = build_scheduler(optimizer, 0, 10, 0.1)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    batch = {name: t[part] for name, t in global_batch().items()}
    torch.manual_seed(100 + rank)  # the dropout masks: each worker its own
    loss = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, clip, micro_batch_size)
    params = {f"model.{k}": p.detach().clone() for k, p in net.named_parameters()}
    params |= {f"loss.{k}": p.detach().clone() for k, p in criterion.named_parameters()}
    return loss, params, torch.get_rng_state()


def _worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for loss_name in ("triplet", "vcrl", "infonce"):
        for clip in (None, 1.0):
            results[loss_name, clip, "plain", 0.0] = step_once(rank, loss_name, clip, 0.0)
            for micro in MICRO_BATCHES:
                for dropout in (0.0, 0.3):
                    results[loss_name, clip, micro, dropout] = step_once(rank, loss_name, clip, dropout, micro)
                results[loss_name, clip, f"reference {micro}", 0.3] = step_once(rank, loss_name, clip, 0.3,
                                                                                reference_micro=micro)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def assert_same_step(got, want, where):
    (loss, params, rng), (want_loss, want_params, want_rng) = got, want
    assert loss == pytest.approx(want_loss, rel=1e-10), where
    for name, value in want_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-10, atol=1e-12, msg=f"{where} {name}")
    assert torch.equal(rng, want_rng), where  # the random stream goes on from where the reference leaves it


def test_micro_batches_give_the_one_batch_step_on_two_workers(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    torch.manual_seed(1)
    initial = {f"model.{k}": p.detach() for k, p in DropoutDualEncoder().double().named_parameters()}
    for results in per_rank:
        for loss_name in ("triplet", "vcrl", "infonce"):
            for clip in (None, 1.0):
                plain = results[loss_name, clip, "plain", 0.0]
                assert any(not torch.equal(plain[1][k], v) for k, v in initial.items())  # the step moved the weights
                for micro in MICRO_BATCHES:
                    where = f"{loss_name} clip={clip} micro={micro}"
                    assert_same_step(results[loss_name, clip, micro, 0.0], plain, f"{where} without dropout")
                    assert_same_step(results[loss_name, clip, micro, 0.3], results[loss_name, clip, f"reference {micro}", 0.3],
                                     f"{where} with dropout")
    # DDP kept the workers' weights equal.
    for key, (_, params, _) in per_rank[0].items():
        for name, value in params.items():
            torch.testing.assert_close(per_rank[1][key][1][name], value, rtol=0, atol=0)


def test_batch_norm_statistics_are_updated_once_per_micro_batch():
    torch.manual_seed(1)
    model = DropoutDualEncoder(norm=True).double()
    criterion = make_loss("triplet")
    optimizer = build_optimizer([model, criterion], 0.05, 0.01)
    scheduler = build_scheduler(optimizer, 0, 10, 0.1)
    batch = {name: t[:LOCAL_BATCH] for name, t in global_batch().items()}
    norm = model.image[2]
    expected_mean = norm.running_mean.clone()
    for part in micro_batches(LOCAL_BATCH, 4):  # what the second pass alone does to the statistics
        hidden = model.image[1](model.image[0](batch["image"][part].double()))
        expected_mean = 0.9 * expected_mean + 0.1 * hidden.detach().mean(0)
    train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, None, 4)
    assert norm.num_batches_tracked.item() == 2
    torch.testing.assert_close(norm.running_mean, expected_mean)
