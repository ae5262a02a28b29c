"""Retrieval evaluation: embed a split, then recall@K both ways, class-level recall and zero-shot.

Protocol (VSE++ / CLIP_benchmark): every distinct image (rows sharing a ``group``) is one image
query, and any of its captions is a hit; every caption is one text query, and its image is the
hit. The class-level variant counts any item of the query's label as a hit. ``rsum`` is the sum
of the six instance-level recalls (fractions, so at most 6).

Ties count against the query: a query's rank is the number of non-hit items that score **at
least** as high as its best hit. A collapsed model (every embedding equal) therefore has
recall 0, not 1, and a tie between zero-shot prompts is a miss. Non-finite embeddings or
scores raise :class:`NonFiniteEmbeddingsError` instead of becoming a metric (``x > nan`` is
false, so a NaN model would otherwise rank every hit first).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .precision import autocast


class NonFiniteEmbeddingsError(ValueError):
    """A model produced NaN or infinite embeddings or scores: no metric can be computed."""


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise :class:`NonFiniteEmbeddingsError` (one line) when ``values`` holds a NaN or an inf."""
    bad = ~torch.isfinite(values)
    if bad.any():
        raise NonFiniteEmbeddingsError(f"{int(bad.sum())} of {values.numel()} values of the {name} are NaN or infinite: "
                                       "the model diverged or its input is broken; no metric is computed")


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable[dict], device: torch.device, amp: bool = False) -> dict[str, torch.Tensor]:
    """Run both towers over batches of preprocessed rows; returns float32 CPU tensors
    ``image [N, D]``, ``text [N, D]``, ``label [N]``, ``group [N]``."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "label": [], "group": []}
    for batch in batches:
        with autocast(device, amp):
            u, v = model(batch["image"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out["image"].append(u.float().cpu())
        out["text"].append(v.float().cpu())
        out["label"].append(batch["label"].cpu())
        out["group"].append(batch["group"].cpu())
    model.train(was_training)
    if not out["image"]:
        raise ValueError("the evaluation split is empty")
    return {name: torch.cat(parts) for name, parts in out.items()}


def similarity(queries: torch.Tensor, items: torch.Tensor, normalized: bool) -> torch.Tensor:
    """``[Q, D] x [N, D] -> [Q, N]``, higher is closer: cosine for normalised spaces, minus
    squared distance otherwise. Squared distances come from per-pair differences, not from
    ``‖q‖² + ‖x‖² − 2q·x``: equal items then score exactly equal, so a tie stays a tie."""
    if normalized:
        return nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(items, dim=-1).T
    return -torch.cdist(queries, items, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def rank_of_first_hit(scores: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """``[Q, N]`` scores and hit mask -> ``[Q]`` 0-based rank of the best-scored hit: the number
    of non-hit items scoring at least as high as it (ties count against the query). ``N`` when
    a query has no hit.

    Raises:
        NonFiniteEmbeddingsError: a score is NaN or infinite.
    """
    check_finite("similarity scores", scores)
    best_hit = scores.masked_fill(~hits, float("-inf")).max(dim=1).values
    ranks = ((scores >= best_hit.unsqueeze(1)) & ~hits).sum(dim=1)
    return torch.where(hits.any(dim=1), ranks, torch.full_like(ranks, scores.shape[1]))


def distinct_images(groups: torch.Tensor) -> torch.Tensor:
    """Index of the first row of every image group, in order of appearance."""
    _, inverse = torch.unique(groups, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(groups), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(groups)), reduce="amin")
    return first.sort().values


def retrieval_metric_names(ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """Every key :func:`retrieval_metrics` can return (the class-level ones when labels exist)."""
    names = ["num_images", "num_captions"]
    names += [f"{d}_r{k}" for k in ks for d in ("i2t", "t2i")] + ["rsum"]
    names += [f"{d}_{kind}_rank" for d in ("i2t", "t2i") for kind in ("median", "mean")]
    return names + [f"{d}_class_r{k}" for k in ks for d in ("i2t", "t2i")]


def retrieval_metrics(embeddings: dict[str, torch.Tensor], ks: Sequence[int] = (1, 5, 10), normalized: bool = True) -> dict[str, float]:
    check_finite("image embeddings", embeddings["image"])
    check_finite("text embeddings", embeddings["text"])
    image_rows = distinct_images(embeddings["group"])
    images = embeddings["image"][image_rows]
    image_groups, image_labels = embeddings["group"][image_rows], embeddings["label"][image_rows]
    texts, text_groups, text_labels = embeddings["text"], embeddings["group"], embeddings["label"]
    scores = similarity(images.double(), texts.double(), normalized)  # [I, T]

    metrics: dict[str, float] = {"num_images": float(len(image_rows)), "num_captions": float(len(texts))}
    same_image = image_groups.unsqueeze(1) == text_groups.unsqueeze(0)
    i2t_rank = rank_of_first_hit(scores, same_image)
    t2i_rank = rank_of_first_hit(scores.T, same_image.T)
    for k in ks:
        metrics[f"i2t_r{k}"] = (i2t_rank < k).double().mean().item()
        metrics[f"t2i_r{k}"] = (t2i_rank < k).double().mean().item()
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    # Ranks are 1-based, as papers report them; median rank is the usual companion of rsum.
    for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        metrics[f"{direction}_median_rank"] = float(rank.double().median().item() + 1)
        metrics[f"{direction}_mean_rank"] = float(rank.double().mean().item() + 1)

    labelled_images, labelled_texts = image_labels >= 0, text_labels >= 0
    if labelled_images.any() and labelled_texts.any():
        same_label = (image_labels.unsqueeze(1) == text_labels.unsqueeze(0)) & labelled_images.unsqueeze(1)
        class_scores = scores[labelled_images][:, labelled_texts]
        class_hits = same_label[labelled_images][:, labelled_texts]
        i2t_class = rank_of_first_hit(class_scores, class_hits)
        t2i_class = rank_of_first_hit(class_scores.T, class_hits.T)
        for k in ks:
            metrics[f"i2t_class_r{k}"] = (i2t_class < k).double().mean().item()
            metrics[f"t2i_class_r{k}"] = (t2i_class < k).double().mean().item()
    return metrics


@torch.no_grad()
def class_prompt_embeddings(model: nn.Module, tokenizer, class_names: Sequence[str], templates: str | Sequence[str],
                            device: torch.device, max_length: int, normalized: bool = True) -> torch.Tensor:
    """``[K, D]``: each class's prompts, one per template, embedded and averaged — CLIP's prompt
    ensembling: unit vectors averaged (and the mean made a unit vector again) when the model
    ranks by cosine, raw embeddings averaged when it ranks by distance.

    Raises:
        NonFiniteEmbeddingsError: a prompt embedding is NaN or infinite.
    """
    templates = [templates] if isinstance(templates, str) else list(templates)
    was_training = model.training
    model.eval()
    total = None
    for template in templates:
        prompts = [template.format(name) for name in class_names]
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).double().cpu()
        check_finite("prompt embeddings", emb)
        emb = nn.functional.normalize(emb, dim=-1) if normalized else emb
        total = emb if total is None else total + emb
    model.train(was_training)
    mean = total / len(templates)
    return nn.functional.normalize(mean, dim=-1) if normalized else mean


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, tokenizer, class_names: Sequence[str], templates: str | Sequence[str],
                       embeddings: dict[str, torch.Tensor], device: torch.device, max_length: int,
                       normalized: bool = True) -> float:
    """Classify every distinct labelled image by its nearest class (its prompts' ensemble,
    :func:`class_prompt_embeddings`, over one template or several); the accuracy.

    An image counts as right only when its own class scores strictly higher than every other
    class: a tie is a miss (a collapsed model scores 0, not 1/K or 1).

    Raises:
        NonFiniteEmbeddingsError: an image or prompt embedding, or a score, is NaN or infinite.
    """
    rows = distinct_images(embeddings["group"])
    labels = embeddings["label"][rows]
    keep = (labels >= 0) & (labels < len(class_names))
    if not keep.any():
        return float("nan")
    prompt_emb = class_prompt_embeddings(model, tokenizer, class_names, templates, device, max_length, normalized)
    check_finite("image embeddings", embeddings["image"])
    scores = similarity(embeddings["image"][rows][keep].double(), prompt_emb, normalized)  # [I, K]
    own_class = nn.functional.one_hot(labels[keep], len(class_names)).bool()
    return (rank_of_first_hit(scores, own_class) == 0).double().mean().item()
