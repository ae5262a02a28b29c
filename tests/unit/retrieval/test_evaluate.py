"""Retrieval metrics against brute-force per-query reference computations; ties count at their
expected value (never flattering, never punishing), non-finite values are errors."""

import math

import pytest
import torch

from vcl_dist.config import ModelConfig
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.evaluate import NonFiniteEmbeddingsError, distinct_images, embed_batches, retrieval_metrics, similarity, zero_shot_accuracy
from vcl_dist.models import build_dual_encoder


def brute_force(embeddings, k, normalized=True):
    """Per-query loops in float64. A query with ``b`` non-hits above its best hit, and ``t``
    non-hits and ``h`` hits tied with it, is a hit at k unless all ``k − b`` places left go to
    tied non-hits: a hypergeometric draw, ``1 − C(t, k−b) / C(t+h, k−b)``."""
    image_rows = distinct_images(embeddings["group"]).tolist()
    img = embeddings["image"][image_rows].double()
    txt = embeddings["text"].double()
    if normalized:
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)

    def score(a, b):
        return float(a @ b) if normalized else -sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))

    def hit_at_k(scores, hits):
        if not any(hits):
            return 0.0
        best = max(s for s, h in zip(scores, hits) if h)
        above = sum(1 for s, h in zip(scores, hits) if not h and s > best)
        tied = sum(1 for s, h in zip(scores, hits) if not h and s == best)
        tied_hits = sum(1 for s, h in zip(scores, hits) if h and s == best)
        places = k - above
        if places <= 0:
            return 0.0
        if places > tied:
            return 1.0
        return 1.0 - math.comb(tied, places) / math.comb(tied + tied_hits, places)

    groups, labels = embeddings["group"].tolist(), embeddings["label"].tolist()
    out = {"i2t": 0, "t2i": 0, "i2t_class": 0, "t2i_class": 0}
    for qi, row in enumerate(image_rows):
        scores = [score(img[qi], txt[t]) for t in range(len(txt))]
        out["i2t"] += hit_at_k(scores, [groups[t] == groups[row] for t in range(len(txt))])
        out["i2t_class"] += hit_at_k(scores, [labels[t] == labels[row] for t in range(len(txt))])
    for t in range(len(txt)):
        scores = [score(img[q], txt[t]) for q in range(len(image_rows))]
        out["t2i"] += hit_at_k(scores, [groups[r] == groups[t] for r in image_rows])
        out["t2i_class"] += hit_at_k(scores, [labels[r] == labels[t] for r in image_rows])
    n_img, n_txt = len(image_rows), len(txt)
    return {"i2t": out["i2t"] / n_img, "t2i": out["t2i"] / n_txt,
            "i2t_class": out["i2t_class"] / n_img, "t2i_class": out["t2i_class"] / n_txt}


def assert_matches_brute_force(embeddings, normalized):
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10), normalized=normalized)
    for k in (1, 5, 10):
        want = brute_force(embeddings, k, normalized)
        for name in ("i2t", "t2i", "i2t_class", "t2i_class"):
            assert metrics[f"{name}_r{k}"] == pytest.approx(want[name], abs=1e-12), (name, k)
    return metrics


def test_recalls_match_brute_force_with_multi_caption_images():
    g = torch.Generator().manual_seed(3)
    n_images, captions = 15, 2
    groups = torch.arange(n_images).repeat_interleave(captions) * 1000 + 17
    labels = torch.randint(0, 4, (n_images,), generator=g).repeat_interleave(captions)
    base = torch.randn(n_images, 8, generator=g).repeat_interleave(captions, dim=0)
    embeddings = {
        "image": base,  # rows of one image carry the same image embedding
        "text": base + 0.9 * torch.randn(n_images * captions, 8, generator=g),
        "group": groups,
        "label": labels,
    }
    metrics = assert_matches_brute_force(embeddings, normalized=True)
    assert metrics["num_images"] == n_images and metrics["num_captions"] == n_images * captions
    assert 0 < metrics["i2t_r1"] < 1  # the noise makes the test discriminating
    assert metrics["rsum"] == sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


def test_distinct_images_keeps_first_row_of_each_group_in_order():
    groups = torch.tensor([9, 9, 4, 7, 4, 7, 1])
    assert distinct_images(groups).tolist() == [0, 2, 3, 6]


def test_unlabeled_data_has_no_class_metrics():
    g = torch.Generator().manual_seed(0)
    embeddings = {"image": torch.randn(6, 4, generator=g), "text": torch.randn(6, 4, generator=g),
                  "group": torch.arange(6), "label": torch.full((6,), -1)}
    metrics = retrieval_metrics(embeddings, ks=(1,))
    assert "i2t_class_r1" not in metrics and "i2t_r1" in metrics


def planted_ties(seed: int) -> dict[str, torch.Tensor]:
    """Random embeddings where some images of different groups are exact copies of each other
    (as pixel-identical images of the built-in data are) and some captions are too."""
    g = torch.Generator().manual_seed(seed)
    n_images, captions = 24, 2
    groups = torch.arange(n_images).repeat_interleave(captions) * 7 + 3
    labels = torch.randint(0, 5, (n_images,), generator=g).repeat_interleave(captions)
    base = torch.randn(n_images, 6, generator=g)
    base[5] = base[2]  # three images of other groups with the same pixels
    base[9] = base[2]
    base[13] = base[20]
    image = base.repeat_interleave(captions, dim=0)
    text = image + 0.7 * torch.randn(n_images * captions, 6, generator=g)
    text[11] = text[4]  # captions of different images, word for word the same
    text[30] = text[4]
    text[17] = image[17]  # a caption exactly on an image
    return {"image": image, "text": text, "group": groups, "label": labels}


@pytest.mark.parametrize("normalized", [True, False], ids=["cosine", "squared_distance"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_ties_count_their_expected_value_as_in_a_float64_brute_force(normalized, seed):
    embeddings = planted_ties(seed)
    metrics = assert_matches_brute_force(embeddings, normalized)
    assert 0 < metrics["i2t_r1"] < 1 and 0 < metrics["t2i_r1"] < 1


def test_squared_distance_similarity_scores_equal_items_exactly_equal():
    g = torch.Generator().manual_seed(4)
    queries = torch.randn(40, 16, generator=g, dtype=torch.float64)
    items = torch.randn(50, 16, generator=g, dtype=torch.float64)
    items[30:] = items[7]  # many copies: the matmul form of the distance rounds them apart
    scores = similarity(queries, items, normalized=False)
    reference = -((queries[:, None, :] - items[None, :, :]) ** 2).sum(-1)
    assert torch.allclose(scores, reference, rtol=0, atol=1e-12)
    assert (scores[:, 30:] == scores[:, 7:8]).all()


def tiny_model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(embed_dim=8, image={"width": 4}, text={"hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                                              "num_layers": 1})
    class_names = ["red circle", "blue square", "green star"]
    tokenizer = train_wordpiece([f"a photo of a {c}" for c in class_names] * 5, vocab_size=60)
    model = build_dual_encoder(cfg, len(tokenizer), 12, tokenizer.pad_token_id)
    tokens = tokenizer([f"a {c}" for c in class_names] * 4, padding="max_length", max_length=12, return_tensors="pt")
    batches = [{
        "image": torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8),
        "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
        "label": torch.arange(12) % 3, "group": torch.arange(12),
    }]
    return model, tokenizer, class_names, batches


@pytest.mark.parametrize("normalized", [True, False], ids=["cosine", "squared_distance"])
def test_a_collapsed_model_scores_k_over_n_never_one(normalized):
    model, tokenizer, class_names, batches = tiny_model_and_batches()
    with torch.no_grad():  # every embedding the same point: the origin
        model.image_projection.weight.zero_()
        model.text_projection.weight.zero_()
    embeddings = embed_batches(model, batches, torch.device("cpu"))
    assert (embeddings["image"] == 0).all() and (embeddings["text"] == 0).all()
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10), normalized=normalized)
    for k in (1, 5, 10):  # 12 images, one caption each: the hit is anywhere among 12 equal scores
        assert metrics[f"i2t_r{k}"] == pytest.approx(k / 12) and metrics[f"t2i_r{k}"] == pytest.approx(k / 12)
    # Four items of each of the three classes: the first of the four falls in the top 1 with
    # probability 4/12, and in the top 5 unless all 5 places go to the 8 others.
    assert metrics["i2t_class_r1"] == pytest.approx(4 / 12)
    assert metrics["i2t_class_r5"] == pytest.approx(1 - math.comb(8, 5) / math.comb(12, 5))
    assert metrics["rsum"] == pytest.approx(2 * 16 / 12) and metrics["i2t_median_rank"] == 6.5
    accuracy = zero_shot_accuracy(model, tokenizer, class_names, "a photo of a {}", embeddings, torch.device("cpu"), 12,
                                  normalized)
    assert accuracy == pytest.approx(1 / 3)


def test_zero_shot_tie_between_prompts_counts_its_expected_value():
    model, tokenizer, class_names, batches = tiny_model_and_batches(1)
    with torch.no_grad():
        model.text_projection.weight.zero_()  # every prompt the same point; images differ
    embeddings = embed_batches(model, batches, torch.device("cpu"))
    assert zero_shot_accuracy(model, tokenizer, class_names, "a photo of a {}", embeddings, torch.device("cpu"), 12,
                              normalized=False) == pytest.approx(1 / 3)


def templated_captions(seed: int, n_images: int = 30, n_classes: int = 5) -> dict[str, torch.Tensor]:
    """A good model on data whose captions repeat word for word: each image's one caption is its
    class's template, so every caption of a class embeds to the same point."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_images) % n_classes
    class_points = torch.randn(n_classes, 8, generator=g, dtype=torch.float64)
    return {"image": class_points[labels] + 0.05 * torch.randn(n_images, 8, generator=g, dtype=torch.float64),
            "text": class_points[labels].clone(), "group": torch.arange(n_images), "label": labels}


def test_identical_captions_are_not_failures():
    embeddings = templated_captions(0)
    metrics = assert_matches_brute_force(embeddings, normalized=True)
    # Six images per class, one identical caption each: the own caption is first among its six
    # copies with probability 1/6; the class-level recall sees a perfect model.
    assert metrics["i2t_r1"] == pytest.approx(1 / 6) and metrics["i2t_r5"] == pytest.approx(5 / 6)
    assert metrics["i2t_r10"] == 1.0 and metrics["i2t_class_r1"] == 1.0
    assert 0 < metrics["t2i_r1"] < 1


def random_order_hits(scores, hits, k, orders, seed=0):
    """Mean over random tie orders of "a hit among the first k": each order breaks the ties of
    ``scores`` by a fresh random key."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(scores.shape[0], dtype=torch.float64)
    for _ in range(orders):
        order = torch.argsort(scores + 1e-9 * torch.rand(scores.shape, generator=g, dtype=torch.float64), dim=1, descending=True)
        total += hits.gather(1, order[:, :k]).any(dim=1).double()
    return total / orders


def test_expected_value_agrees_with_random_orders_of_the_ties():
    from vcl_dist.evaluate import tied_ranks

    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 4, (40, 12), generator=g).double()  # few distinct values: ties everywhere
    hits = torch.rand(40, 12, generator=g) < 0.25
    hits[0] = False  # a query without any hit scores 0
    ranks = tied_ranks(scores, hits)
    for k in (1, 3, 5):
        want = random_order_hits(scores, hits, k, orders=4000)
        assert torch.allclose(ranks.hit_at_k(k), want, atol=0.04), k
        assert abs(ranks.hit_at_k(k).mean() - want.mean()) < 5e-3
    assert ranks.hit_at_k(5)[0] == 0


def clip_benchmark_reference(scores, positive_pairs, k):
    """CLIP_benchmark 1.6's ``recall_at_k`` followed by its ``> 0``, as written there."""
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    onehot = torch.nn.functional.one_hot(topk_indices, num_classes=scores.shape[1])
    nb_true_positive = (onehot * positive_pairs.view(scores.shape[0], 1, scores.shape[1])).sum(dim=(1, 2))
    return ((nb_true_positive / nb_positive) > 0).float().mean().item()


@pytest.mark.parametrize("make", [planted_ties, templated_captions], ids=["planted_ties", "templated_captions"])
def test_clip_benchmark_compatible_recall_follows_its_rule(make):
    embeddings = make(1)
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10), normalized=True)
    rows = distinct_images(embeddings["group"])
    scores = similarity(embeddings["image"][rows].double(), embeddings["text"].double(), True)
    positives = (embeddings["group"][rows].unsqueeze(1) == embeddings["group"].unsqueeze(0)).long()
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}_clip_benchmark"] == pytest.approx(clip_benchmark_reference(scores, positives, k))
        assert metrics[f"t2i_r{k}_clip_benchmark"] == pytest.approx(clip_benchmark_reference(scores.T, positives.T, k))


def test_without_ties_every_rule_agrees():
    embeddings = planted_ties(2)
    embeddings["image"] += 1e-3 * torch.randn(embeddings["image"].shape, generator=torch.Generator().manual_seed(1))
    embeddings["text"] += 1e-3 * torch.randn(embeddings["text"].shape, generator=torch.Generator().manual_seed(2))
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10), normalized=True)
    for k in (1, 5, 10):
        for d in ("i2t", "t2i"):
            assert metrics[f"{d}_r{k}"] == metrics[f"{d}_r{k}_clip_benchmark"], (d, k)
    assert 0 < metrics["i2t_r1"] < 1


@pytest.mark.parametrize("where", ["image", "text", "inf"])
def test_non_finite_embeddings_raise_instead_of_scoring(where):
    embeddings = planted_ties(0)
    if where == "inf":
        embeddings["image"][3, 1] = float("inf")
    else:
        embeddings[where][5, 0] = float("nan")
    with pytest.raises(NonFiniteEmbeddingsError, match="NaN or infinite") as err:
        retrieval_metrics(embeddings)
    assert "\n" not in str(err.value)


def test_a_nan_model_is_an_error_in_zero_shot_too():
    model, tokenizer, class_names, batches = tiny_model_and_batches()
    embeddings = embed_batches(model, batches, torch.device("cpu"))
    with torch.no_grad():
        model.text_projection.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteEmbeddingsError, match="prompt embeddings"):
        zero_shot_accuracy(model, tokenizer, class_names, "a photo of a {}", embeddings, torch.device("cpu"), 12)
