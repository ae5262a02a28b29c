"""Text towers: a transformers encoder, built from a small config or loaded with ``from_pretrained``.

The tower returns one vector per caption ``[B, H]``: the attention-masked mean of the last
hidden states (default) or the first token's state.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel

from ..config import TextTowerConfig


class TextTower(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.out_features = encoder.config.hidden_size
        # Pooler layers are unused with our pooling; DDP must not wait for their gradients.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def build_text_tower(cfg: TextTowerConfig, vocab_size: int, max_length: int, pad_token_id: int = 0) -> TextTower:
    if cfg.pretrained:
        # trust_remote_code stays off: no code from a model hub runs on the cluster.
        encoder = AutoModel.from_pretrained(cfg.pretrained, trust_remote_code=False)
        return TextTower(encoder, cfg.pooling)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(max_length, 8),
        pad_token_id=pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return TextTower(BertModel(config, add_pooling_layer=False), cfg.pooling)

