"""One training step, in one process: a step whose loss or gradient is not finite never reaches
the optimizer."""

import pytest
import torch

from vcl_dist.config import LossConfig, ModelConfig
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.train.schedule import build_optimizer, build_scheduler
from vcl_dist.train.step import NonFiniteStepError, train_step


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_dual_encoder(ModelConfig(embed_dim=8, image={"width": 4}, text={"hidden_size": 16, "intermediate_size": 32,
                                                                                  "num_heads": 2, "num_layers": 1}), 50, 10)
    criterion = build_loss(LossConfig(name="triplet"))
    optimizer = build_optimizer([model, criterion], 1e-3, 0.01)
    scheduler = build_scheduler(optimizer, 0, 10, 0.1)
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(5, 50, (6, 10), generator=g), "attention_mask": torch.ones(6, 10, dtype=torch.long),
             "label": torch.arange(6), "group": torch.arange(6)}
    return model, criterion, optimizer, scheduler, batch


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_finite_step_moves_the_weights():
    model, criterion, optimizer, scheduler, batch = setup()
    before = weights(model)
    loss = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    assert loss > 0 and any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("clip", [1.0, None], ids=["clipped", "unclipped"])
def test_an_infinite_gradient_stops_the_step_before_the_optimizer(clip):
    model, criterion, optimizer, scheduler, batch = setup()
    model.text_projection.weight.register_hook(lambda grad: grad * float("inf"))
    before = weights(model)
    with pytest.raises(NonFiniteStepError, match="gradient norm inf"):
        train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, clip)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not optimizer.state and scheduler.last_epoch == 0  # no AdamW moments, no schedule step


def test_nan_embeddings_stop_the_step_before_backward():
    model, criterion, optimizer, scheduler, batch = setup()
    with torch.no_grad():
        model.image_projection.weight[0, 0] = float("nan")
    before = weights(model)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    assert all(torch.equal(before[n], p) or torch.isnan(p).any() for n, p in model.named_parameters())
    assert not optimizer.state
