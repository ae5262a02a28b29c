"""Compute locked towers' outputs once, with Ray Data, before training reads them.

A tower locked whole gives the same output for a row in every epoch — for pictures, when they
are not augmented; captions never are — so running it every step is pure cost.
`locked_features` computes the outputs of every training row once — a Ray Data actor pool
over the plan's read units, one GPU per actor when the cluster has GPUs — into the feature store
(`vcl_dist.data.feature_store`), and the training split then reads them in place of
pictures or tokens: the step runs only the projections of those towers.

The folder is named by a fingerprint of the towers' weights, how their inputs are prepared and
the units, so a second run (or a Tune trial) with the same towers and data reuses it, and an
interrupted computation goes on with the units it had not written.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from ..config import Config
from ..data.feature_store import features_fingerprint, mark_complete, missing_units, write_unit_features
from ..data.images import ImageGeometry, UnusableImageError, decode_image
from ..data.shard_format import caption_text
from ..models import build_dual_encoder
from ..runtime.precision import autocast
from ..storage import filesystem_for

FEATURES_DIR = "_features"


def feature_towers(cfg: Config) -> tuple[str, ...]:
    """The towers whose outputs the run reads from the feature store (``train.cache_locked_features``
    on): the image tower when locked whole with ``data.augment`` off, the text tower when locked whole."""
    if not cfg.train.cache_locked_features:
        return ()
    image, text = cfg.model.image, cfg.model.text
    towers = ("image",) if image.lock and image.unlocked_groups == 0 and not cfg.data.augment else ()
    return towers + (("text",) if text.lock and text.unlocked_groups == 0 else ())


def features_root(cfg: Config, source) -> str:
    """Where feature folders go: ``data.features_path``, else beside the training shards (the
    built-in data: its cache folder)."""
    if cfg.data.features_path:
        return cfg.data.features_path.rstrip("/")
    if source.driver_local:
        return f"{cfg.data.cache_dir.rstrip('/')}/{FEATURES_DIR}"
    train = cfg.data.train_path.rstrip("/")
    return f"{train.rsplit('/', 1)[0] if '/' in train else '.'}/{FEATURES_DIR}"


class UnitFeatures:
    """A Ray Data actor: for each unit index of its batch, read the unit's rows, run the locked
    towers on them, write the unit's feature file; returns how many rows each had."""

    def __init__(self, model, shards, features, folder: str, units, towers: tuple[str, ...], geometry: ImageGeometry,
                 tokenizer, max_text_length: int, batch_size: int, use_amp: bool):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        # ``shards``: the filesystem the units are read from; ``features``: the one written to.
        self.shards, self.features, self.folder, self.units, self.towers = shards, features, folder, units, towers
        self.geometry, self.tokenizer, self.max_text_length = geometry, tokenizer, max_text_length
        self.batch_size, self.use_amp = batch_size, use_amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.train_stream import read_unit_rows

        rows = []
        for index in batch["unit"]:
            unit = self.units[int(index)]
            columns = read_unit_rows(self.shards, unit, np.arange(unit.rows), images="image" in self.towers)
            computed = {tower: self.tower_outputs(tower, columns) for tower in self.towers}
            write_unit_features(self.features, self.folder, int(index), columns["key"], computed)
            rows.append(unit.rows)
        return {"unit": batch["unit"], "rows": np.array(rows, dtype=np.int64)}

    def tower_outputs(self, tower: str, columns: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(valid [N], features [N, F])`` of one tower over a unit's rows."""
        count = len(columns["key"])
        valid, features = np.ones(count, np.uint8), []
        for start in range(0, count, self.batch_size):
            part = slice(start, start + self.batch_size)
            if tower == "image":
                inputs = self.pixels(columns["image"][part], valid[part])
            else:
                texts = [caption_text(c) for c in columns["caption"][part]]
                valid[part] = [text is not None for text in texts]
                inputs = self.tokenizer([t or "" for t in texts], padding="max_length", truncation=True,
                                        max_length=self.max_text_length, return_tensors="pt")
            features.append(self.run(tower, inputs))
        return valid, np.concatenate(features)

    def pixels(self, images, valid: np.ndarray) -> torch.Tensor:
        pixels = np.zeros((len(images), 3, self.geometry.size, self.geometry.size), np.uint8)
        for i, data in enumerate(images):
            try:
                pixels[i] = decode_image(data, self.geometry)
            except UnusableImageError:
                valid[i] = 0  # counted as a bad row when training reads it
        return torch.from_numpy(pixels)

    @torch.no_grad()
    def run(self, tower: str, inputs) -> np.ndarray:
        with autocast(self.device, self.use_amp):
            if tower == "image":
                images = (inputs.to(self.device).float() / 255.0 - self.model.image_mean) / self.model.image_std
                out = self.model.image_features(images)
            else:
                out = self.model.text_features(inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device))
        return out.float().cpu().numpy()


def tokenizer_identity(tokenizer, max_text_length: int) -> str:
    """The tokenizer's vocabulary and settings, as the text features depend on them."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(repr((type(tokenizer).__name__, vocab, max_text_length)).encode(), digest_size=12).hexdigest()


def locked_features(cfg: Config, source, units, tokenizer, use_gpu: bool, log=print) -> str:
    """The folder of the locked towers' (`feature_towers`) outputs for ``units``, computed
    now where missing."""
    import ray
    import ray.data

    towers = feature_towers(cfg)
    # The towers exactly as the training workers build them: same seed, same construction order.
    torch.manual_seed(cfg.train.seed)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0,
                               cfg.similarity)
    geometry = ImageGeometry.of(cfg.data)
    parts: list = [towers]
    if "image" in towers:
        parts += [model.image_tower.state_dict(), geometry]
    if "text" in towers:
        parts += [model.text_tower.state_dict(), tokenizer_identity(tokenizer, cfg.data.max_text_length)]
    filesystem, root = filesystem_for(features_root(cfg, source), cfg.s3)
    folder = f"{root}/{features_fingerprint(parts, units)}"
    what = " and ".join(f"{tower} tower's" for tower in towers)
    todo = missing_units(filesystem, folder, len(units))
    if not todo:
        log(f"vcl-dist: the locked {what} features of {len(units)} read units are in {folder}")
        return folder
    filesystem.create_dir(folder, recursive=True)
    started = time.perf_counter()
    resources = ray.cluster_resources()
    actors = int(resources.get("GPU", 0)) if use_gpu else max(1, int(resources.get("CPU", 1)) // 2)
    use_amp = cfg.train.amp is True or (cfg.train.amp == "auto" and use_gpu)
    done = ray.data.from_items([{"unit": i} for i in todo]).map_batches(
        UnitFeatures, batch_size=1, num_gpus=1 if use_gpu else 0, num_cpus=1,
        fn_constructor_kwargs={"model": model, "shards": source.filesystem, "features": filesystem, "folder": folder,
                               "units": units, "towers": towers, "geometry": geometry, "tokenizer": tokenizer,
                               "max_text_length": cfg.data.max_text_length, "batch_size": cfg.eval.batch_size,
                               "use_amp": use_amp},
        # A fixed pool: every actor loads the towers once, and the units are few and even.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
    ).take_all()
    rows = sum(int(r["rows"]) for r in done)
    mark_complete(filesystem, folder, len(units), list(towers))
    seconds = time.perf_counter() - started
    log(f"vcl-dist: computed the locked {what} features of {rows} rows once in {seconds:.1f} s "
        f"({rows / max(seconds, 1e-9):.0f} rows/s) into {folder}")
    return folder
