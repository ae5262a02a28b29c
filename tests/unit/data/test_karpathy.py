"""Karpathy split files (COCO, Flickr30K) and the 1K-fold test protocol."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from vcl_dist.data.karpathy import KarpathyFormatError, read_folds, read_karpathy
from vcl_dist.data.preprocess import stable_id
from vcl_dist.evaluate import retrieval_metrics
from vcl_dist.retrieval.html_report import evaluate_folds


def coco_image(i: int, split: str) -> dict:
    """One image entry exactly as dataset_coco.json writes it."""
    return {"filepath": "val2014" if split != "train" else "train2014",
            "sentids": [5 * i + c for c in range(5)],
            "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i, "split": split,
            "sentences": [{"tokens": ["a", "picture", str(i)], "raw": f"A picture {i}, caption {c}.", "imgid": i,
                           "sentid": 5 * i + c} for c in range(5)],
            "cocoid": 100000 + i}


def test_a_coco_file_keeps_its_splits_groups_and_1k_folds(tmp_path):
    splits = ["train"] * 10 + ["restval"] * 5 + ["val"] * 5 + ["test"] * 2500
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [coco_image(i, s) for i, s in enumerate(splits)], "dataset": "coco"}))
    data = read_karpathy(path)
    assert data.name == "coco" and len(data.rows) == 5 * len(splits)
    by_split = {s: sum(r["split"] == s for r in data.rows) for s in ("train", "val", "test")}
    assert by_split == {"train": 75, "val": 25, "test": 12500}  # restval is trained on
    first = data.rows[0]
    assert first == {"image": "train2014/COCO_val2014_000000000000.jpg", "caption": "A picture 0, caption 0.",
                     "image_id": "100000", "split": "train"}
    folds = data.test_folds()  # 1,000 test images each, in file order; the last 500 fill no fold
    assert [len(f) for f in folds] == [1000, 1000] and folds[0][0] == "100020" and folds[1][-1] == str(100000 + 20 + 1999)


def test_a_flickr30k_file_names_images_by_filename_and_imgid(tmp_path):
    images = [{"sentids": [0, 1], "imgid": 7, "split": "test", "filename": "1000092795.jpg",
               "sentences": [{"tokens": ["two", "men"], "raw": "Two young guys.", "imgid": 7, "sentid": 0},
                             {"tokens": ["men"], "raw": "Two men outside.", "imgid": 7, "sentid": 1}]}]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    data = read_karpathy(path)
    assert [r["image"] for r in data.rows] == ["1000092795.jpg"] * 2 and {r["image_id"] for r in data.rows} == {"7"}
    assert data.test_folds() == []  # fewer than two folds' images: the whole split is the protocol


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ('{"dataset": "coco"}', "no 'images' list"),
    ('{"images": [{"split": "test", "sentences": []}]}', r"images\[0\] has no 'filename'"),
    ('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}', r"split 'dev', not one of"),
    ('{"images": [{"filename": "a.jpg", "split": "test"}]}', "no 'sentences' list"),
])
def test_a_malformed_karpathy_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "dataset_coco.json"
    path.write_text(content)
    with pytest.raises(KarpathyFormatError, match=message) as caught:
        read_karpathy(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="--karpathy: no file"):
        read_karpathy(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no 'folds' list"):
        read_folds("{}")


def test_fold_metrics_are_the_mean_of_each_folds_metrics():
    rng = np.random.default_rng(0)
    image_ids = [f"img{i}" for i in range(40)]
    rows = [(i, c) for i in range(40) for c in range(2)]  # two captions per image
    image_emb = rng.standard_normal((40, 8)).astype(np.float32)
    text = np.stack([image_emb[i] + 0.9 * rng.standard_normal(8).astype(np.float32) for i, _ in rows])
    table = pa.table({
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.stack([image_emb[i] for i, _ in rows]).ravel()), 8),
        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), 8),
        "label": pa.array([-1] * len(rows), pa.int64()),
        "image_group": pa.array([stable_id(image_ids[i]) for i, _ in rows], pa.int64()),
    })
    folds = [image_ids[:20], image_ids[20:]]
    metrics = evaluate_folds(SimpleNamespace(normalized=True), table, folds, None)
    expected = []
    for fold in (range(0, 40), range(40, 80)):
        embeddings = {"image": torch.from_numpy(np.stack([image_emb[rows[r][0]] for r in fold])),
                      "text": torch.from_numpy(text[list(fold)]), "label": torch.full((40,), -1),
                      "group": torch.tensor([stable_id(image_ids[rows[r][0]]) for r in fold])}
        expected.append(retrieval_metrics(embeddings, (1, 5, 10), True))
    assert metrics["folds"] == 2 and metrics["num_images"] == 20
    for key in ("i2t_r1", "t2i_r1", "t2i_r5", "rsum", "t2i_mean_rank"):
        assert metrics[key] == pytest.approx((expected[0][key] + expected[1][key]) / 2), key
    assert 0 < metrics["i2t_r1"] < 1
    with pytest.raises(ValueError, match="fold 2 of 2: none of its 1 images is in the split"):
        evaluate_folds(SimpleNamespace(normalized=True), table, [image_ids[:3], ["elsewhere"]], None)
