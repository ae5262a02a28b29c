"""Contrastive losses over the global pool; they know nothing of Ray, only of torch.distributed.

Start with `.definitions`: each loss as defined, in a few lines of dense masked
score-matrix code — the specification the fast classes here are tested against. Those compose
like pytorch-metric-learning's parts: `.pool` (gather + memory + masks), `.distances`,
`.negatives` (negative selection), `.fused` (dense terms with hand-written backward),
`.tiled` (the same terms a tile of the pool at a time, for pools of any size),
`.memory` and `.sharded_memory` (past batches as negatives, replicated or sharded over
workers), and the losses on top; the sigmoid loss adds `.sigmoid_terms` (its tiles with a
hand-written backward) and `.ring` (caption blocks passed round the workers).
"""

from __future__ import annotations

from ..config import LossConfig
from .infonce import InfoNCELoss
from .memory import NegativeMemory
from .sigmoid import SigmoidLoss
from .triplet import TripletLoss
from .vcrl import VCRLLoss


def build_loss(cfg: LossConfig, num_classes: int | None = None, embed_dim: int | None = None):
    """The loss module of a config; ``num_classes`` and ``embed_dim`` feed VCRL's label tower."""
    memory = NegativeMemory(cfg.memory_size, cfg.memory_warmup_steps, shard=cfg.memory_shard) if cfg.memory_size else None
    if cfg.name == "triplet":
        return TripletLoss(cfg.margin, cfg.negatives, normalize=True, gather=cfg.gather, memory=memory, chunk_size=cfg.chunk_size)
    if cfg.name == "vcrl":
        classes = (cfg.num_classes or num_classes) if cfg.label_tower else None
        if cfg.label_tower and not classes:
            raise ValueError("loss.label_tower needs loss.num_classes or a classes.txt beside the val shards")
        return VCRLLoss(cfg.margin, cfg.reg_lambda, cfg.negatives, cfg.gather, memory,
                        num_classes=classes, embed_dim=embed_dim, label_weight=cfg.label_weight, chunk_size=cfg.chunk_size)
    if cfg.name == "infonce":
        return InfoNCELoss(cfg.init_temperature, cfg.max_logit_scale, cfg.gather, memory, chunk_size=cfg.chunk_size)
    if cfg.name == "sigmoid":
        return SigmoidLoss(cfg.init_scale, cfg.init_bias, cfg.max_logit_scale, cfg.gather, memory, chunk_size=cfg.chunk_size)
    raise ValueError(f"loss.name: unknown loss {cfg.name!r}")


__all__ = ["InfoNCELoss", "NegativeMemory", "SigmoidLoss", "TripletLoss", "VCRLLoss", "build_loss"]
