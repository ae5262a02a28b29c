"""Rank 0's evaluation after each epoch: the whole val split (it is not split across workers),
embedded and scored as `vcl_dist.evaluate` defines."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..data.shard_format import drop_bad_rows
from ..evaluate import embed_batches, retrieval_metrics, zero_shot_accuracy
from .step import collate_rows


@dataclass
class ValCache:
    """The preprocessed val split (``dataset``: a Ray Dataset of model-ready rows), kept after
    the first pass: val preprocessing is deterministic (no augmentation), so later epochs skip
    the Ray Data pipeline start-up, which on a busy cluster costs more than embedding a small
    val split."""

    dataset: Any
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    bad_rows: int = 0
    by_shard: Counter = field(default_factory=Counter)
    filled: bool = False

    def fill(self, batch_size: int) -> None:
        # numpy batches collated here (a function as iter_torch_batches' collate_fn is deprecated in Ray).
        for rows in self.dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            batch, _, bad_shards = drop_bad_rows(collate_rows(rows))
            self.bad_rows += len(bad_shards)
            self.by_shard.update(bad_shards)
            if len(batch["image"]):
                self.batches.append(batch)
        self.filled = True


def evaluate_on_val(model, cfg: Config, tokenizer, class_names, device, use_amp: bool, val: ValCache) -> dict[str, float]:
    """Rank 0 embeds the whole val split (it is not split across workers) and scores it."""
    if not val.filled:
        val.fill(cfg.eval.batch_size)
    embeddings = embed_batches(model, val.batches, device, amp=use_amp)
    normalized = model.similarity == "cosine"
    metrics = {f"val_{k}": v for k, v in retrieval_metrics(embeddings, cfg.eval.recall_ks, normalized).items()}
    metrics["val_bad_rows"] = val.bad_rows
    if class_names:
        metrics["val_zero_shot_acc"] = zero_shot_accuracy(
            model, tokenizer, class_names, cfg.eval.templates, embeddings, device, cfg.data.max_text_length,
            normalized,
        )
    return metrics
