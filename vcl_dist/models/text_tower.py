"""Text towers: a transformers encoder, built from a small config or loaded with ``from_pretrained``.

The tower returns one vector per caption ``[B, H]``: the attention-masked mean of the last
hidden states or the first token's state — as a sentence-transformers folder's pooling config
says (``auto``), or as ``model.text.pooling`` sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, BertConfig, BertModel

from ..config import TextTowerConfig


class TextTower(nn.Module):
    """A transformers encoder pooled into one vector per caption (``mean`` over the tokens, or the ``cls`` token)."""
    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.out_features = encoder.config.hidden_size
        # Pooler layers are unused with our pooling; DDP must not wait for their gradients.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids and attention mask -> ``[B, hidden]`` the pooled caption features."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def sentence_transformers_pooling(folder: str) -> str | None:
    """The pooling a sentence-transformers model folder declares (``1_Pooling/config.json``):
    ``mean`` or ``cls``, or None (no such file, or another pooling)."""
    path = Path(folder) / "1_Pooling" / "config.json"
    try:
        pooling = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if pooling.get("pooling_mode_cls_token") else None


def text_pooling(cfg: TextTowerConfig) -> str:
    """``model.text.pooling``, with ``auto`` resolved: what the pretrained folder says, else mean."""
    if cfg.pooling != "auto":
        return cfg.pooling
    return (sentence_transformers_pooling(cfg.pretrained) if cfg.pretrained else None) or "mean"


def build_text_tower(cfg: TextTowerConfig, vocab_size: int, max_length: int, pad_token_id: int = 0,
                     saved_config: dict | None = None) -> TextTower:
    """``saved_config``: the encoder's config saved with a model (its structure; the weights come
    from the model's file), instead of loading ``cfg.pretrained``'s weights."""
    from transformers import AutoConfig

    if saved_config is not None:
        return TextTower(AutoModel.from_config(AutoConfig.for_model(**saved_config)), text_pooling(cfg))
    if cfg.pretrained:
        # trust_remote_code stays off: no code from a model hub runs on the cluster.
        encoder = AutoModel.from_pretrained(cfg.pretrained, trust_remote_code=False)
        return TextTower(encoder, text_pooling(cfg))
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
    return TextTower(BertModel(config, add_pooling_layer=False), text_pooling(cfg))

