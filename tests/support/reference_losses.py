"""Plain, loop-by-loop reference implementations that the vectorised losses are checked against.

``memory``: ``(image [M, D], text [M, D], labels [M], groups [M])`` of past rows, appended to the
pool as negatives only (never anchors), as the losses' negative memory does."""

from __future__ import annotations

import torch


def pool_of(image_emb, text_emb, labels, groups, memory):
    """The batch, then the memory's rows (detached)."""
    if memory is None:
        return image_emb, text_emb, labels, groups
    m_image, m_text, m_labels, m_groups = memory
    return (torch.cat([image_emb, m_image.detach()]), torch.cat([text_emb, m_text.detach()]),
            torch.cat([labels, m_labels]), torch.cat([groups, m_groups]))


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum()


def reference_triplet(image_emb, text_emb, labels, groups, margin: float, negatives: str, normalize: bool = True,
                      memory=None):
    """ARCHITECTURE.md's triplet loss, one anchor and one negative at a time."""
    image_pool, text_pool, pool_labels, pool_groups = pool_of(image_emb, text_emb, labels, groups, memory)
    normalized = torch.nn.functional.normalize
    if normalize:
        image_emb, text_emb = normalized(image_emb, dim=-1), normalized(text_emb, dim=-1)
        image_pool, text_pool = normalized(image_pool, dim=-1), normalized(text_pool, dim=-1)
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for anchors, pool in ((image_emb, text_pool), (text_emb, image_pool)):
        for i in range(n):
            d_ap = squared_distance(anchors[i], pool[i])
            d_negs = [squared_distance(anchors[i], pool[j]) for j in range(len(pool))
                      if is_negative(labels[i], groups[i], pool_labels[j], pool_groups[j])]
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


def is_negative(anchor_label, anchor_group, label, group):
    """Whether a pool item (``label``, ``group``) may be pushed from the anchor."""
    return group != anchor_group and not (anchor_label >= 0 and label == anchor_label)


def reference_vcrl(image_emb, text_emb, labels, groups, margin, reg_lambda, negatives,
                   class_embeddings=None, label_weight=1.0, memory=None):
    """VCRL as ARCHITECTURE.md writes it: hinge on raw squared distances + λ(‖U‖²+‖V‖²)/N
    (+ label-tower terms), one anchor at a time."""
    n = image_emb.shape[0]
    # The hinge part is the triplet loss on raw (not normalised) embeddings.
    total = reference_triplet(image_emb, text_emb, labels, groups, margin, negatives, normalize=False, memory=memory)
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


def reference_infonce(image_emb, text_emb, labels, groups, scale, memory=None):
    """Label-aware symmetric InfoNCE, one anchor at a time."""
    image_pool, text_pool, pool_labels, pool_groups = pool_of(image_emb, text_emb, labels, groups, memory)
    normalized = torch.nn.functional.normalize
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for anchors, pool in ((image_emb, text_pool), (text_emb, image_pool)):
        anchors, pool = normalized(anchors, dim=-1), normalized(pool, dim=-1)
        for i in range(n):
            candidates = [i] + [j for j in range(len(pool)) if is_negative(labels[i], groups[i], pool_labels[j], pool_groups[j])]
            logits = torch.stack([scale * (anchors[i] @ pool[j]) for j in candidates])
            total = total - torch.log_softmax(logits, dim=0)[0] / (2 * n)
    return total


def reference_sigmoid(image_emb, text_emb, labels, groups, scale, bias, memory=None):
    """SigLIP's pairwise loss, one (image, caption) pair at a time: the own caption a positive,
    never-negatives left out, the sum over each image's pairs, the mean over images."""
    _, text_pool, pool_labels, pool_groups = pool_of(image_emb, text_emb, labels, groups, memory)
    image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
    text_pool = torch.nn.functional.normalize(text_pool, dim=-1)
    n = image_emb.shape[0]
    total = image_emb.new_zeros(())
    for i in range(n):
        for j in range(len(text_pool)):
            if i != j and not is_negative(labels[i], groups[i], pool_labels[j], pool_groups[j]):
                continue
            z = 1.0 if i == j else -1.0
            total = total - torch.nn.functional.logsigmoid(z * (scale * (image_emb[i] @ text_pool[j]) + bias))
    return total / n
