"""Contrastive losses over the global batch; they know nothing of Ray, only of torch.distributed."""

from ..config import LossConfig
from .triplet import TripletLoss


def build_loss(cfg: LossConfig):
    if cfg.name == "triplet":
        return TripletLoss(margin=cfg.margin, negatives=cfg.negatives, normalize=True)
    raise ValueError(f"loss.name: unknown loss {cfg.name!r}")


__all__ = ["TripletLoss", "build_loss"]
