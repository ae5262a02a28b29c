"""Retrieval metrics against brute-force per-query reference computations."""

import torch

from vcl_dist.evaluate import distinct_images, retrieval_metrics


def brute_force(embeddings, k):
    image_rows = distinct_images(embeddings["group"]).tolist()
    img = torch.nn.functional.normalize(embeddings["image"][image_rows].double(), dim=-1)
    txt = torch.nn.functional.normalize(embeddings["text"].double(), dim=-1)
    groups, labels = embeddings["group"].tolist(), embeddings["label"].tolist()
    out = {"i2t": 0, "t2i": 0, "i2t_class": 0, "t2i_class": 0}
    for qi, row in enumerate(image_rows):
        order = sorted(range(len(txt)), key=lambda t: -float(img[qi] @ txt[t]))[:k]
        out["i2t"] += any(groups[t] == groups[row] for t in order)
        out["i2t_class"] += any(labels[t] == labels[row] for t in order)
    for t in range(len(txt)):
        order = sorted(range(len(image_rows)), key=lambda q: -float(img[q] @ txt[t]))[:k]
        out["t2i"] += any(groups[image_rows[q]] == groups[t] for q in order)
        out["t2i_class"] += any(labels[image_rows[q]] == labels[t] for q in order)
    n_img, n_txt = len(image_rows), len(txt)
    return {"i2t": out["i2t"] / n_img, "t2i": out["t2i"] / n_txt,
            "i2t_class": out["i2t_class"] / n_img, "t2i_class": out["t2i_class"] / n_txt}


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
    metrics = retrieval_metrics(embeddings, ks=(1, 5, 10))
    assert metrics["num_images"] == n_images and metrics["num_captions"] == n_images * captions
    for k in (1, 5, 10):
        want = brute_force(embeddings, k)
        assert metrics[f"i2t_r{k}"] == want["i2t"]
        assert metrics[f"t2i_r{k}"] == want["t2i"]
        assert metrics[f"i2t_class_r{k}"] == want["i2t_class"]
        assert metrics[f"t2i_class_r{k}"] == want["t2i_class"]
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
