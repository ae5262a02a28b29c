"""Retrieval metrics against brute-force per-query reference computations; ties and non-finite
values never flatter a model."""

import pytest
import torch

from vcl_dist.config import ModelConfig
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.evaluate import NonFiniteEmbeddingsError, distinct_images, embed_batches, retrieval_metrics, similarity, zero_shot_accuracy
from vcl_dist.models import build_dual_encoder


def brute_force(embeddings, k, normalized=True):
    """Per-query loops in float64; a query's rank counts every non-hit scoring >= its best hit."""
    image_rows = distinct_images(embeddings["group"]).tolist()
    img = embeddings["image"][image_rows].double()
    txt = embeddings["text"].double()
    if normalized:
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)

    def score(a, b):
        return float(a @ b) if normalized else -sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))

    def hit_at_k(scores, hits):
        if not any(hits):
            return False
        best = max(s for s, h in zip(scores, hits) if h)
        return sum(1 for s, h in zip(scores, hits) if not h and s >= best) < k

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
        assert metrics[f"i2t_r{k}"] == want["i2t"]
        assert metrics[f"t2i_r{k}"] == want["t2i"]
        assert metrics[f"i2t_class_r{k}"] == want["i2t_class"]
        assert metrics[f"t2i_class_r{k}"] == want["t2i_class"]
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
def test_planted_ties_count_against_the_query_as_in_a_float64_brute_force(normalized, seed):
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
def test_a_collapsed_model_scores_zero_not_one(normalized):
    model, tokenizer, class_names, batches = tiny_model_and_batches()
    with torch.no_grad():  # every embedding the same point: the origin
        model.image_projection.weight.zero_()
        model.text_projection.weight.zero_()
    embeddings = embed_batches(model, batches, torch.device("cpu"))
    assert (embeddings["image"] == 0).all() and (embeddings["text"] == 0).all()
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10), normalized=normalized)
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10", "i2t_class_r1", "t2i_class_r1"):
        assert metrics[key] == 0.0, key
    assert metrics["rsum"] == 0.0 and metrics["i2t_median_rank"] == 12  # behind all 11 other captions
    accuracy = zero_shot_accuracy(model, tokenizer, class_names, "a photo of a {}", embeddings, torch.device("cpu"), 12,
                                  normalized)
    assert accuracy == 0.0


def test_zero_shot_tie_between_prompts_is_a_miss():
    model, tokenizer, class_names, batches = tiny_model_and_batches(1)
    with torch.no_grad():
        model.text_projection.weight.zero_()  # every prompt the same point; images differ
    embeddings = embed_batches(model, batches, torch.device("cpu"))
    assert zero_shot_accuracy(model, tokenizer, class_names, "a photo of a {}", embeddings, torch.device("cpu"), 12,
                              normalized=False) == 0.0


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
