"""What the gathered-loss equivalence tests share: tiny linear towers and the loss and gradients
of a few steps, taken alike on a gloo worker's slice of the batch and in one process."""

import torch
from torch import nn

from vcl_dist.losses.gather import average_gradients


class TinyDualEncoder(nn.Module):
    """Linear towers: the gradient check is about the loss, the gather and DDP, not about
    BatchNorm (whose per-worker statistics would differ from the whole batch's by design)."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5, bias=False))
        self.text = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 5, bias=False))

    def forward(self, x, y):
        return self.image(x), self.text(y)


def make_model():
    torch.manual_seed(7)
    return TinyDualEncoder().double()


def run_steps(model, criterion, batches, part=slice(None)):
    """Loss and gradients of each step; no optimizer step, so both steps see the same model."""
    out = []
    for x, y, labels, groups in batches:
        model.zero_grad()
        criterion.zero_grad()
        u, v = model(x[part], y[part])
        loss = criterion(u, v, labels[part], groups[part])
        loss.backward()
        average_gradients(criterion.parameters())
        module = model.module if hasattr(model, "module") else model
        grads = {f"model.{k}": p.grad.detach().clone() for k, p in module.named_parameters()}
        grads.update({f"loss.{k}": p.grad.detach().clone() for k, p in criterion.named_parameters()})
        out.append((loss.detach(), grads))
    return out
