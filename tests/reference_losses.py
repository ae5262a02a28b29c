"""Plain, loop-by-loop reference implementations that the vectorised losses are checked against."""

from __future__ import annotations

import torch


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum()


def reference_triplet(image_emb, text_emb, labels, groups, margin: float, negatives: str, normalize: bool = True):
    """ARCHITECTURE.md's triplet loss, one anchor and one negative at a time."""
    if normalize:
        image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for anchors, pool in ((image_emb, text_emb), (text_emb, image_emb)):
        for i in range(n):
            d_ap = squared_distance(anchors[i], pool[i])
            d_negs = [
                squared_distance(anchors[i], pool[j])
                for j in range(n)
                if groups[j] != groups[i] and not (labels[i] >= 0 and labels[j] == labels[i])
            ]
            if not d_negs:
                continue
            if negatives == "all":
                total = total + sum(torch.relu(d_ap - d + margin) for d in d_negs) / len(d_negs)
                continue
            if negatives == "hardest":
                chosen = min(d_negs, key=lambda d: d.item())
            elif negatives == "semi_hard":
                farther = [d for d in d_negs if d > d_ap]
                chosen = min(farther or d_negs, key=lambda d: d.item())
            else:
                raise ValueError(negatives)
            total = total + torch.relu(d_ap - chosen + margin)
    return total / (2 * n)
