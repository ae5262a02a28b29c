"""A tiny model, loss, optimizer, schedule and batch: one training step's inputs in milliseconds."""

import torch

from vcl_dist.config import LossConfig, ModelConfig
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.train.schedule import build_optimizer, build_scheduler


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
