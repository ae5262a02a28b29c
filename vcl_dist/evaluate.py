"""Retrieval evaluation: embed a split, then recall@K both ways, class-level recall and zero-shot.

Protocol (VSE++ / CLIP_benchmark): every distinct image (rows sharing a ``group``) is one image
query, and any of its captions is a hit; every caption is one text query, and its image is the
hit. The class-level variant counts any item of the query's label as a hit. ``rsum`` is the sum
of the six instance-level recalls (fractions, so at most 6).

Ties are scored by their expected value under a uniformly random order of the tied items
(`expected_hits_at_k`): a collapsed model (every embedding equal) scores about K/N, never
1, and identical captions (templated texts, repeated alt-texts) are not counted as failures.
Every report also carries the CLIP_benchmark-compatible recall (``*_clip_benchmark``:
``torch.topk`` of the scores, a hit when any positive is among them), for comparison with
published numbers. Non-finite embeddings or scores raise `NonFiniteEmbeddingsError`
instead of becoming a metric (``x > nan`` is false, so a NaN model would otherwise rank every
hit first).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
from torch import nn

from .runtime.precision import autocast


class NonFiniteEmbeddingsError(ValueError):
    """A model produced NaN or infinite embeddings or scores: no metric can be computed."""


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise `NonFiniteEmbeddingsError` (one line) when ``values`` holds a NaN or an inf."""
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
    squared distance otherwise. Equal items score exactly equal, so a tie stays a tie: squared
    distances come from per-pair differences, not from ``‖q‖² + ‖x‖² − 2q·x``, and cosines are
    computed once per distinct row (a matrix product may round two equal columns apart: BLAS
    kernels treat a block's edge columns differently on some CPUs)."""
    if normalized:
        distinct_queries, query_rows = torch.unique(queries, dim=0, return_inverse=True)
        distinct_items, item_rows = torch.unique(items, dim=0, return_inverse=True)
        scores = nn.functional.normalize(distinct_queries, dim=-1) @ nn.functional.normalize(distinct_items, dim=-1).T
        return scores[query_rows][:, item_rows]
    return -torch.cdist(queries, items, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


class TiedRanks(NamedTuple):
    """Where each query's best hit stands, ``[Q]`` each: ``above`` non-hits score higher than
    it, ``tied`` non-hits score the same, ``tied_hits`` hits (itself included) score the same.
    A query without any hit has ``above = N`` and no ties."""

    above: torch.Tensor
    tied: torch.Tensor
    tied_hits: torch.Tensor

    def hit_at_k(self, k: int) -> torch.Tensor:
        """``[Q]`` float64: the probability that a hit is among the first ``k`` when the tied
        items are put in a uniformly random order. ``j = k − above`` places are left for the
        tied block; all of them go to non-hits with probability ``C(tied, j) / C(tied + tied_hits, j)``
        (one hit: ``clip(j / (tied + 1), 0, 1)``)."""
        above, tied, hits = self.above.double(), self.tied.double(), self.tied_hits.double()
        places = (k - above).clamp(min=0)
        within = places.clamp(max=tied)  # past the tied non-hits the block's first hit is certainly in
        log_all_miss = (torch.lgamma(tied + 1) - torch.lgamma(tied - within + 1)
                        - torch.lgamma(tied + hits + 1) + torch.lgamma(tied + hits - within + 1))
        p = 1 - torch.exp(log_all_miss)
        p = torch.where(places > tied, torch.ones_like(p), p)
        return torch.where(hits > 0, p, torch.zeros_like(p))

    def expected_rank(self) -> torch.Tensor:
        """``[Q]`` float64, 0-based: the expected rank of the first hit (``above`` plus the
        expected number of tied non-hits before it, ``tied / (tied_hits + 1)``)."""
        return self.above.double() + self.tied.double() / (self.tied_hits.double() + 1)


def tied_ranks(scores: torch.Tensor, hits: torch.Tensor) -> TiedRanks:
    """``[Q, N]`` scores and hit mask -> `TiedRanks` of every query's best-scored hit.

    Raises:
        NonFiniteEmbeddingsError: a score is NaN or infinite.
    """
    check_finite("similarity scores", scores)
    best_hit = scores.masked_fill(~hits, float("-inf")).max(dim=1).values.unsqueeze(1)
    above = ((scores > best_hit) & ~hits).sum(dim=1)
    tied = ((scores == best_hit) & ~hits).sum(dim=1)
    tied_hits = ((scores == best_hit) & hits).sum(dim=1)
    has_hit = hits.any(dim=1)
    zero = torch.zeros_like(above)
    return TiedRanks(torch.where(has_hit, above, torch.full_like(above, scores.shape[1])),
                     torch.where(has_hit, tied, zero), torch.where(has_hit, tied_hits, zero))


def clip_benchmark_hits_at_k(scores: torch.Tensor, hits: torch.Tensor, k: int) -> torch.Tensor:
    """``[Q]`` bool: CLIP_benchmark's rule (``metrics/zeroshot_retrieval.py``): a query is a hit
    when any of its positives is among ``torch.topk(scores, k)``; ties fall as ``topk`` orders
    them, so this can flatter a collapsed model. Reported beside ours, never instead of it."""
    check_finite("similarity scores", scores)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1).indices
    return hits.gather(1, top).any(dim=1)


def distinct_images(groups: torch.Tensor) -> torch.Tensor:
    """Index of the first row of every image group, in order of appearance."""
    _, inverse = torch.unique(groups, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(groups), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(groups)), reduce="amin")
    return first.sort().values


def retrieval_metric_names(ks: Sequence[int] = (1, 5, 10)) -> list[str]:
    """Every key `retrieval_metrics` can return (the class-level ones when labels exist)."""
    names = ["num_images", "num_captions"]
    names += [f"{d}_r{k}" for k in ks for d in ("i2t", "t2i")] + ["rsum"]
    names += [f"{d}_r{k}_clip_benchmark" for k in ks for d in ("i2t", "t2i")] + ["rsum_clip_benchmark"]
    names += [f"{d}_{kind}_rank" for d in ("i2t", "t2i") for kind in ("median", "mean")]
    return names + [f"{d}_class_r{k}" for k in ks for d in ("i2t", "t2i")]


def retrieval_metrics(embeddings: dict[str, torch.Tensor], ks: Sequence[int] = (1, 5, 10), normalized: bool = True) -> dict[str, float]:
    """Recall@K both ways at instance and class level, rsum, ranks, and CLIP_benchmark's recall beside ours.

    Every distinct image (``group``) is one image query, every caption one text query; ties count
    at their expected value (`tied_ranks`), computed in float64.

    Args:
        embeddings: ``image`` ``[N, D]``, ``text`` ``[N, D]``, ``group`` ``[N]`` (rows sharing it show
            one image) and ``label`` ``[N]`` (negative: unlabelled), as `embed_batches` returns them.
        ks: the K of recall@K.
        normalized: score by cosine (True) or by minus the squared distance (VCRL models).

    Returns:
        ``i2t_r{k}``, ``t2i_r{k}``, ``rsum``, their ``*_clip_benchmark`` twins, ``{i2t,t2i}_{median,mean}_rank``,
        ``{i2t,t2i}_class_r{k}`` when rows are labelled, and the query counts.

    Raises:
        NonFiniteEmbeddingsError: NaN or infinite embeddings.
    """
    check_finite("image embeddings", embeddings["image"])
    check_finite("text embeddings", embeddings["text"])
    image_rows = distinct_images(embeddings["group"])
    images = embeddings["image"][image_rows]
    image_groups, image_labels = embeddings["group"][image_rows], embeddings["label"][image_rows]
    texts, text_groups, text_labels = embeddings["text"], embeddings["group"], embeddings["label"]
    scores = similarity(images.double(), texts.double(), normalized)  # [I, T]

    metrics: dict[str, float] = {"num_images": float(len(image_rows)), "num_captions": float(len(texts))}
    same_image = image_groups.unsqueeze(1) == text_groups.unsqueeze(0)
    i2t, t2i = tied_ranks(scores, same_image), tied_ranks(scores.T, same_image.T)
    for k in ks:
        metrics[f"i2t_r{k}"] = i2t.hit_at_k(k).mean().item()
        metrics[f"t2i_r{k}"] = t2i.hit_at_k(k).mean().item()
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    for k in ks:
        metrics[f"i2t_r{k}_clip_benchmark"] = clip_benchmark_hits_at_k(scores, same_image, k).double().mean().item()
        metrics[f"t2i_r{k}_clip_benchmark"] = clip_benchmark_hits_at_k(scores.T, same_image.T, k).double().mean().item()
    metrics["rsum_clip_benchmark"] = sum(metrics[f"{d}_r{k}_clip_benchmark"] for d in ("i2t", "t2i") for k in ks)
    # Ranks are 1-based, as papers report them; median rank is the usual companion of rsum.
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        expected = ranks.expected_rank()
        metrics[f"{direction}_median_rank"] = float(expected.median().item() + 1)
        metrics[f"{direction}_mean_rank"] = float(expected.mean().item() + 1)

    labelled_images, labelled_texts = image_labels >= 0, text_labels >= 0
    if labelled_images.any() and labelled_texts.any():
        same_label = (image_labels.unsqueeze(1) == text_labels.unsqueeze(0)) & labelled_images.unsqueeze(1)
        class_scores = scores[labelled_images][:, labelled_texts]
        class_hits = same_label[labelled_images][:, labelled_texts]
        i2t_class = tied_ranks(class_scores, class_hits)
        t2i_class = tied_ranks(class_scores.T, class_hits.T)
        for k in ks:
            metrics[f"i2t_class_r{k}"] = i2t_class.hit_at_k(k).mean().item()
            metrics[f"t2i_class_r{k}"] = t2i_class.hit_at_k(k).mean().item()
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
    `class_prompt_embeddings`, over one template or several); the accuracy.

    A tie with other classes counts at its expected value: an image whose class ties with ``t``
    others scores ``1 / (t + 1)`` (a collapsed model scores 1/K, never 1).

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
    return tied_ranks(scores, own_class).hit_at_k(1).mean().item()
