"""Compute a wholly locked image tower's outputs once, with Ray Data, before training reads them.

A locked tower (LiT) whose pictures are not augmented gives the same output for a row in every
epoch; running it every step is pure cost. :func:`locked_image_features` computes the outputs of
every training row once — a Ray Data actor pool over the plan's read units, one GPU per actor
when the cluster has GPUs — into the feature store (:mod:`vcl_dist.data.feature_store`), and the
training split then reads them in place of pictures: the step runs only the projection.

The folder is named by a fingerprint of the tower's weights, the picture geometry and the
units, so a second run (or a Tune trial) with the same tower and data reuses it, and an
interrupted computation goes on with the units it had not written.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import Config
from ..data.feature_store import features_fingerprint, mark_complete, missing_units, write_unit_features
from ..data.images import ImageGeometry, UnusableImageError, decode_image
from ..models import build_dual_encoder
from ..precision import autocast
from ..storage import filesystem_for

FEATURES_DIR = "_features"


def uses_locked_features(cfg: Config) -> bool:
    """Whether the run reads its image tower's outputs from the feature store: a tower locked
    whole, pictures not augmented, and ``train.cache_locked_features`` on."""
    image = cfg.model.image
    return image.lock and image.unlocked_groups == 0 and not cfg.data.augment and cfg.train.cache_locked_features


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
    """A Ray Data actor: for each unit index of its batch, decode the unit's pictures, run the
    tower, write the unit's feature file; returns how many rows each had."""

    def __init__(self, model, shards, features, folder: str, units, geometry: ImageGeometry, batch_size: int, use_amp: bool):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        # ``shards``: the filesystem the units are read from; ``features``: the one written to.
        self.shards, self.features, self.folder, self.units = shards, features, folder, units
        self.geometry, self.batch_size, self.use_amp = geometry, batch_size, use_amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.train_stream import read_unit_rows

        rows = []
        for index in batch["unit"]:
            unit = self.units[int(index)]
            columns = read_unit_rows(self.shards, unit, np.arange(unit.rows))
            keys, valid, features = [str(k) for k in columns["key"]], np.ones(unit.rows, np.uint8), []
            for start in range(0, unit.rows, self.batch_size):
                pixels = np.zeros((len(keys[start:start + self.batch_size]), 3, self.geometry.size, self.geometry.size), np.uint8)
                for i, data in enumerate(columns["image"][start:start + self.batch_size]):
                    try:
                        pixels[i] = decode_image(data, self.geometry)
                    except UnusableImageError:
                        valid[start + i] = 0  # counted as a bad row when training reads it
                features.append(self.tower_outputs(torch.from_numpy(pixels)))
            write_unit_features(self.features, self.folder, int(index), keys, valid, np.concatenate(features))
            rows.append(unit.rows)
        return {"unit": batch["unit"], "rows": np.array(rows, dtype=np.int64)}

    @torch.no_grad()
    def tower_outputs(self, pixels: torch.Tensor) -> np.ndarray:
        images = (pixels.to(self.device).float() / 255.0 - self.model.image_mean) / self.model.image_std
        with autocast(self.device, self.use_amp):
            return self.model.image_tower(images).float().cpu().numpy()


def locked_image_features(cfg: Config, source, units, tokenizer, use_gpu: bool, log=print) -> str:
    """The folder of the locked image tower's outputs for ``units`` (computed now where missing)."""
    import ray
    import ray.data

    # The tower exactly as the training workers build it: same seed, same construction order.
    torch.manual_seed(cfg.train.seed)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0,
                               cfg.similarity)
    geometry = ImageGeometry.of(cfg.data)
    filesystem, root = filesystem_for(features_root(cfg, source), cfg.s3)
    folder = f"{root}/{features_fingerprint(model.image_tower.state_dict(), geometry, units)}"
    todo = missing_units(filesystem, folder, len(units))
    if not todo:
        log(f"vcl-dist: the locked image tower's features of {len(units)} read units are in {folder}")
        return folder
    filesystem.create_dir(folder, recursive=True)
    started = time.perf_counter()
    actors = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)
    use_amp = cfg.train.amp is True or (cfg.train.amp == "auto" and use_gpu)
    done = ray.data.from_items([{"unit": i} for i in todo]).map_batches(
        UnitFeatures, batch_size=1, num_gpus=1 if use_gpu else 0, num_cpus=1,
        fn_constructor_kwargs={"model": model, "shards": source.filesystem, "features": filesystem, "folder": folder,
                               "units": units, "geometry": geometry, "batch_size": cfg.eval.batch_size, "use_amp": use_amp},
        # A fixed pool: every actor loads the tower once, and the units are few and even.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(todo)))),
    ).take_all()
    rows = sum(int(r["rows"]) for r in done)
    mark_complete(filesystem, folder, len(units), model.image_tower.out_features)
    seconds = time.perf_counter() - started
    log(f"vcl-dist: computed the locked image tower's features of {rows} rows once in {seconds:.1f} s "
        f"({rows / max(seconds, 1e-9):.0f} rows/s) into {folder}")
    return folder
