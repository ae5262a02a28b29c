"""The built-in "shapes" dataset: coloured shapes drawn with PIL, captioned from templates.

Deterministic from a seed, written in the shard format of ARCHITECTURE.md (Parquet with
``key, image, caption, label, image_id``) plus a ``classes.txt``. A class is a (colour, shape)
pair; captions also mention size and position and use synonyms, so the text tower has to
learn that "crimson disc" and "red circle" name the same class.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ..class_names import CLASSES_FILE, format_class_names
from ..runtime.console import say
from .shard_format import SHARD_SCHEMA

SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "three-sided shape"],
    "star": ["star", "five-pointed star", "starburst"],
    "cross": ["cross", "plus sign", "plus"],
}
COLOURS = {
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 170, 40), ["green", "emerald", "grass-green"]),
    "blue": ((30, 60, 220), ["blue", "azure", "navy"]),
    "yellow": ((235, 205, 20), ["yellow", "golden", "lemon"]),
    "purple": ((140, 40, 180), ["purple", "violet", "lilac"]),
    "orange": ((245, 130, 20), ["orange", "amber", "tangerine"]),
}
SIZES = {
    "small": ((0.14, 0.2), ["small", "tiny", "little"]),
    "medium": ((0.22, 0.28), ["medium", "mid-sized", "medium-sized"]),
    "large": ((0.3, 0.38), ["large", "big", "huge"]),
}
# 3x3 grid cells: (column, row) -> phrases.
POSITIONS = {
    (0, 0): ["in the top left", "at the upper left"],
    (1, 0): ["at the top", "near the top edge"],
    (2, 0): ["in the top right", "at the upper right"],
    (0, 1): ["on the left", "at the left side"],
    (1, 1): ["in the center", "in the middle"],
    (2, 1): ["on the right", "at the right side"],
    (0, 2): ["in the bottom left", "at the lower left"],
    (1, 2): ["at the bottom", "near the bottom edge"],
    (2, 2): ["in the bottom right", "at the lower right"],
}
TEMPLATES = [
    "a {size} {colour} {shape} {position}",
    "a photo of a {colour} {shape}",
    "a photo of a {size} {colour} {shape} {position}",
    "{position} there is a {colour} {shape}",
    "an image showing a {size} {colour} {shape}",
    "a {colour} {shape} drawn {position}",
    "{colour} {shape}",
]
SHAPE_NAMES = list(SHAPES)
COLOUR_NAMES = list(COLOURS)
CLASS_NAMES = [f"{colour} {shape}" for shape in SHAPE_NAMES for colour in COLOUR_NAMES]
GENERATOR_VERSION = 1
ROWS_PER_SHARD = 2000


def class_id(shape: str, colour: str) -> int:
    return SHAPE_NAMES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = r * 0.33
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, colour: str, size: str, cell: tuple[int, int], image_size: int, rng: np.random.Generator) -> bytes:
    """One PNG: a shape of the given kind, colour, size and grid cell on a noisy grey ground."""
    grey = int(rng.integers(150, 245))
    ground = np.clip(rng.normal(grey, 6, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(ground)
    draw = ImageDraw.Draw(image)
    low, high = SIZES[size][0]
    r = float(rng.uniform(low, high)) * image_size
    # The centre lies in its 3x3 cell, jittered, with the shape kept inside the image.
    cell_size = image_size / 3
    cx = (cell[0] + 0.5 + rng.uniform(-0.2, 0.2)) * cell_size
    cy = (cell[1] + 0.5 + rng.uniform(-0.2, 0.2)) * cell_size
    cx, cy = (min(max(c, r + 1), image_size - r - 1) for c in (cx, cy))
    rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour][0])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=rgb)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def caption(shape: str, colour: str, size: str, cell: tuple[int, int], rng: np.random.Generator) -> str:
    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    template = pick(TEMPLATES)
    text = template.format(
        size=pick(SIZES[size][1]),
        colour=pick(COLOURS[colour][1]),
        shape=pick(SHAPES[shape]),
        position=pick(POSITIONS[cell]),
    )
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def generate_split(out_dir: Path, split: str, num_images: int, captions_per_image: int, image_size: int, seed: int) -> int:
    """Write ``num_images`` images (``captions_per_image`` rows each) as Parquet shards; returns rows."""
    # A distinct, stable stream per split so train and val never share draws.
    rng = np.random.default_rng([seed, int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"key": [], "image": [], "caption": [], "label": [], "image_id": []}
    shard, total = 0, 0

    def flush() -> None:
        nonlocal shard, rows
        if not rows["key"]:
            return
        pq.write_table(pa.table(rows, schema=SHARD_SCHEMA), out_dir / f"{split}-{shard:05d}.parquet")
        shard += 1
        rows = {name: [] for name in rows}

    for index in range(num_images):
        shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        cell = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        png = render(shape, colour, size, cell, image_size, rng)
        image_id = f"{split}-{index:07d}"
        for c in range(captions_per_image):
            rows["key"].append(f"{image_id}-{c}")
            rows["image"].append(png)
            rows["caption"].append(caption(shape, colour, size, cell, rng))
            rows["label"].append(class_id(shape, colour))
            rows["image_id"].append(image_id)
            total += 1
        if len(rows["key"]) >= ROWS_PER_SHARD:
            flush()
    flush()
    return total


def ensure_shapes_dataset(cache_dir: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                          val_captions_per_image: int, seed: int) -> Path:
    """Generate the dataset into ``cache_dir`` unless an identical one is already there.

    The folder name carries a hash of every parameter, and ``_SUCCESS`` is written last, so
    an interrupted generation is redone rather than half-used.

    Returns the dataset folder, holding ``train/``, ``val/`` and ``classes.txt``.
    """
    params = {
        "version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
        "val_captions_per_image": val_captions_per_image, "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(str(cache_dir))) / f"shapes-{digest}"
    if (root / "_SUCCESS").exists():
        return root
    staging = root.with_name(root.name + f".tmp-{os.getpid()}")
    say(f"generating the shapes dataset ({num_train} train / {num_val} val images) into {root}")
    generate_split(staging / "train", "train", num_train, 1, image_size, seed)
    generate_split(staging / "val", "val", num_val, val_captions_per_image, image_size, seed)
    (staging / CLASSES_FILE).write_text(format_class_names(CLASS_NAMES))
    (staging / "params.json").write_text(json.dumps(params, indent=2))
    (staging / "_SUCCESS").write_text("")
    try:
        staging.rename(root)
    except OSError:
        # Another process finished first; its copy is identical.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return root
