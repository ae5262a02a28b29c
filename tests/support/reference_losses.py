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
            d_negs = [squared_distance(anchors[i], pool[j]) for j in range(n) if is_negative(labels, groups, i, j)]
            total = total + _hinge_for_anchor(d_ap, d_negs, margin, negatives)
    return total / (2 * n)


def _hinge_for_anchor(d_ap, d_negs, margin, negatives):
    if not d_negs:
        return d_ap.new_zeros(())
    if negatives == "all":
        return sum(torch.relu(d_ap - d + margin) for d in d_negs) / len(d_negs)
    if negatives == "hardest":
        chosen = min(d_negs, key=lambda d: d.item())
    elif negatives == "semi_hard":
        farther = [d for d in d_negs if d > d_ap]
        chosen = min(farther or d_negs, key=lambda d: d.item())
    else:
        raise ValueError(negatives)
    return torch.relu(d_ap - chosen + margin)


def is_negative(labels, groups, i, j):
    return groups[j] != groups[i] and not (labels[i] >= 0 and labels[j] == labels[i])


def reference_vcrl(image_emb, text_emb, labels, groups, margin, reg_lambda, negatives,
                   class_embeddings=None, label_weight=1.0):
    """VCRL as ARCHITECTURE.md writes it: hinge on raw squared distances + λ(‖U‖²+‖V‖²)/N
    (+ label-tower terms), one anchor at a time."""
    n = image_emb.shape[0]
    # The hinge part is the triplet loss on raw (not normalised) embeddings.
    total = reference_triplet(image_emb, text_emb, labels, groups, margin, negatives, normalize=False)
    total = total + reg_lambda * (image_emb.pow(2).sum() + text_emb.pow(2).sum()) / n
    if class_embeddings is not None:
        for anchors in (image_emb, text_emb):
            for i in range(n):
                if labels[i] < 0:
                    continue
                d_ap = squared_distance(anchors[i], class_embeddings[labels[i]])
                d_negs = [squared_distance(anchors[i], class_embeddings[k]) for k in range(len(class_embeddings)) if k != labels[i]]
                total = total + label_weight * _hinge_for_anchor(d_ap, d_negs, margin, negatives) / (2 * n)
    return total


def reference_infonce(image_emb, text_emb, labels, groups, scale):
    """Label-aware symmetric InfoNCE, one anchor at a time."""
    image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for anchors, pool in ((image_emb, text_emb), (text_emb, image_emb)):
        for i in range(n):
            candidates = [i] + [j for j in range(n) if is_negative(labels, groups, i, j)]
            logits = torch.stack([scale * (anchors[i] @ pool[j]) for j in candidates])
            total = total - torch.log_softmax(logits, dim=0)[0] / (2 * n)
    return total


def reference_sigmoid(image_emb, text_emb, labels, groups, scale, bias):
    """SigLIP's pairwise loss, one (image, caption) pair at a time: the own caption a positive,
    never-negatives left out, the sum over each image's pairs, the mean over images."""
    image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i != j and not is_negative(labels, groups, i, j):
                continue
            z = 1.0 if i == j else -1.0
            total = total - torch.nn.functional.logsigmoid(z * (scale * (image_emb[i] @ text_emb[j]) + bias))
    return total / n
