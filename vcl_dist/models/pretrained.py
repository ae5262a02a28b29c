"""The settings a pretrained model fixes, taken from it on the driver before a run starts.

A CLIP model (``model.init``) was trained on pictures resized, cropped and normalised one way
and projects into a space of its own size: fine-tuning it on pictures prepared another way, or
evaluating it so, would not be the model it claims to be. So its image processor's resize,
crop, interpolation, mean and std and its projection size replace the config's (each change
printed), and the resolved config — saved with every checkpoint and export — prepares pictures
the same way wherever the model is used later, without the pretrained files. A pretrained text
encoder's pooling (``auto``) is read from its sentence-transformers folder the same way.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..runtime.console import one_line
from .open_clip_towers import is_open_clip
from .text_tower import sentence_transformers_pooling

# PIL's resampling filters by number (what image processors save), as data.interpolation names them.
RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


def adopt_pretrained_settings(cfg: Config, log=print) -> Config:
    """``cfg`` with the settings of its pretrained parts (a copy; ``cfg`` when there are none).

    Raises:
        ConfigError: ``model.init`` is no CLIP model, cannot be read, or its processor asks for
            something vcl-dist does not do (one line).
    """
    if not cfg.model.init and not (cfg.model.text.pretrained and cfg.model.text.pooling == "auto"):
        return cfg
    cfg = cfg.model_copy(deep=True)
    if cfg.model.text.pretrained and cfg.model.text.pooling == "auto":
        cfg.model.text.pooling = sentence_transformers_pooling(cfg.model.text.pretrained) or "mean"
    if cfg.model.init:
        changes = adopt_open_clip_settings(cfg) if is_open_clip(cfg.model.init) else adopt_clip_settings(cfg)
        if changes:
            log(f"vcl-dist: model.init {cfg.model.init} sets " + ", ".join(f"{key}={value}" for key, value in changes.items()))
    return cfg


def adopt_clip_settings(cfg: Config) -> dict:
    """Set ``cfg``'s preprocessing and embedding size from the CLIP model ``model.init``; the
    keys that changed, with their new values."""
    from transformers import AutoConfig, AutoImageProcessor

    name = cfg.model.init
    def load(loader):
        try:
            return loader.from_pretrained(name, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.init: cannot load {name}: {one_line(err, 200)}") from None

    config = load(AutoConfig)
    if config.model_type != "clip":
        raise ConfigError(f"model.init: {name} is a {config.model_type!r} model, not a CLIPModel")
    processor = load(AutoImageProcessor)
    resample = int(getattr(processor, "resample", 3))
    if resample not in RESAMPLE_NAMES:
        raise ConfigError(f"model.init: {name}'s image processor resamples with PIL filter {resample}; "
                          f"vcl-dist does {', '.join(RESAMPLE_NAMES.values())}")
    size, crop = processor.size, processor.crop_size
    side = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    if side is None:
        raise ConfigError(f"model.init: {name}'s image processor resizes to {size}, not by its shorter side")
    crop_side = (crop["height"] if processor.do_center_crop else side) if crop else side
    wanted = {
        "data.image_size": int(crop_side), "data.resize": "shorter_side", "data.resize_side": int(side),
        "data.interpolation": RESAMPLE_NAMES[resample],
        "model.image.mean": [float(v) for v in processor.image_mean], "model.image.std": [float(v) for v in processor.image_std],
        "model.embed_dim": int(config.projection_dim),
    }
    changes = set_values(cfg, wanted)
    check_text_length(cfg, config.text_config.max_position_embeddings)
    return changes


def adopt_open_clip_settings(cfg: Config) -> dict:
    """Set ``cfg``'s preprocessing and embedding size from the OpenCLIP model ``model.init``."""
    from .open_clip_towers import open_clip_parts

    try:
        parts = open_clip_parts(cfg.model.init, cfg.model.init_weights, load_weights=False)
    except (ValueError, OSError) as err:
        raise ConfigError(one_line(err, 300)) from None
    preprocess = parts.preprocess
    if preprocess.get("resize_mode", "shortest") != "shortest" or preprocess.get("interpolation", "bicubic") not in ("bicubic",
                                                                                                                    "bilinear"):
        raise ConfigError(f"model.init: {cfg.model.init} resizes {preprocess.get('resize_mode')} with "
                          f"{preprocess.get('interpolation')}; vcl-dist does shortest-side resizes, bicubic or bilinear")
    size = int(preprocess["size"])
    wanted = {
        "data.image_size": size, "data.resize": "shorter_side", "data.resize_side": size,
        "data.interpolation": preprocess.get("interpolation", "bicubic"), "data.crop_offset": "round",
        "model.image.mean": [float(v) for v in preprocess["mean"]], "model.image.std": [float(v) for v in preprocess["std"]],
        "model.embed_dim": parts.visual_projection.out_features,
    }
    changes = set_values(cfg, wanted)
    check_text_length(cfg, parts.text_tower.positional_embedding.shape[0])
    return changes


def set_values(cfg: Config, wanted: dict) -> dict:
    """Set dotted keys of ``cfg``; the ones whose value changed."""
    changes = {}
    for key, value in wanted.items():
        section, leaf = key.rsplit(".", 1)
        owner = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        if getattr(owner, leaf) != value:
            setattr(owner, leaf, value)
            changes[key] = value
    return changes


def check_text_length(cfg: Config, positions: int) -> None:
    """ConfigError when ``data.max_text_length`` is longer than the pretrained text tower's ``positions``."""
    if cfg.data.max_text_length > positions:
        raise ConfigError(f"data.max_text_length ({cfg.data.max_text_length}) is longer than model.init's text tower "
                          f"reads ({positions} tokens)")
