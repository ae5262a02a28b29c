"""The Karpathy split files of COCO and Flickr30K (``dataset_coco.json``, ``dataset_flickr30k.json``,
``dataset_flickr8k.json``): the splits every image–text retrieval paper reports on.

A file holds ``{"dataset": …, "images": [{"filename", "filepath"?, "split", "sentences":
[{"raw"}, …], "cocoid"? | "imgid"}, …]}``: about five captions per image; ``split`` is
``train``, ``restval`` (trained on, by convention), ``val`` or ``test``. The importer turns it
into rows of the shard format (all captions of an image share its ``image_id``) with the split
given, not drawn, and writes the test split's 1K folds beside it: COCO's "1K test" protocol is
the mean over five folds of 1,000 test images, in file order; "5K" is the whole test split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.console import one_line

# The Karpathy split -> vcl-dist's split folder.
SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
FOLD_IMAGES = 1000
FOLDS_FILE = "folds.json"


class KarpathyFormatError(ValueError):
    """The file is no Karpathy split file (one line naming what is wrong)."""


@dataclass
class KarpathyDataset:
    name: str  # "coco", "flickr30k", …
    rows: list[dict]  # image (relative path), caption, image_id, split
    test_image_ids: list[str]  # in file order

    def test_folds(self) -> list[list[str]]:
        """The 1K folds of the test split (COCO: five), or none when it has fewer than two folds' images."""
        ids = self.test_image_ids
        if len(ids) < 2 * FOLD_IMAGES:
            return []
        return [ids[i:i + FOLD_IMAGES] for i in range(0, len(ids) - len(ids) % FOLD_IMAGES, FOLD_IMAGES)]


def read_karpathy(path: str | Path) -> KarpathyDataset:
    """Read a Karpathy split file.

    Raises:
        FileNotFoundError: no such file. KarpathyFormatError: not a Karpathy split file (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--karpathy: no file at {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise KarpathyFormatError(f"{path}: not JSON ({one_line(err, 120)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise KarpathyFormatError(f"{path}: no 'images' list: not a Karpathy split file")
    name = str(data.get("dataset", path.stem.removeprefix("dataset_")))
    rows, test_ids = [], []
    for index, image in enumerate(data["images"]):
        where = f"{path.name}: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise KarpathyFormatError(f"{where} has no 'filename'")
        split = SPLITS.get(image.get("split"))
        if split is None:
            raise KarpathyFormatError(f"{where} has split {image.get('split')!r}, not one of {sorted(SPLITS)}")
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise KarpathyFormatError(f"{where} has no 'sentences' list")
        relative = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        image_id = str(image.get("cocoid", image.get("imgid", relative)))
        if split == "test":
            test_ids.append(image_id)
        for sentence in sentences:
            # A caption that is not text stays a row: the importer counts it as bad, with the others.
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            rows.append({"image": relative, "caption": raw, "image_id": image_id, "split": split})
    return KarpathyDataset(name, rows, test_ids)


def write_rows_jsonl(rows: list[dict], path: str | Path) -> None:
    with open(path, "w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def read_folds(text: str) -> list[list[str]]:
    """The folds of a ``folds.json``: image ids per fold.

    Raises:
        ValueError: not a folds file (one line).
    """
    try:
        folds = json.loads(text)["folds"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{FOLDS_FILE}: no 'folds' list") from None
    if not isinstance(folds, list) or not all(isinstance(f, list) and f for f in folds):
        raise ValueError(f"{FOLDS_FILE}: 'folds' must be non-empty lists of image ids")
    return [[str(i) for i in fold] for fold in folds]
