"""The files of an export that other tools read: a Hugging Face-style ``config.json``, a model
card (``README.md``) and, for a model fine-tuned from a ``CLIPModel``, a ``clip/`` folder that
``transformers.CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained`` load.

``model.safetensors`` beside them is the dual encoder's own state dict (vcl-dist loads it with
the ``config.yaml``); ``config.json`` describes it for readers that do not run vcl-dist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from ..config import dump_config

CLIP_DIR = "clip"
HUB_CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"


def trained_logit_scale(folder: Path) -> float | None:
    """The InfoNCE loss's trained log logit scale in a checkpoint folder, if it has one."""
    path = folder / "loss.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    value = state.get("logit_scale") if isinstance(state, dict) else None
    return float(value) if value is not None else None


def write_hub_files(folder: Path, loaded, history: list[dict] | None, logit_scale: float | None) -> None:
    """``config.json``, ``README.md`` and (CLIP) ``clip/`` into the export being assembled."""
    cfg, model = loaded.config, loaded.model
    data = cfg.data
    hub_config = {
        "model_type": "vcl_dist_dual_encoder",
        "architectures": ["DualEncoder"],
        "library_name": "vcl-dist",
        "embed_dim": model.image_projection.out_features,
        "similarity": model.similarity,
        "init": cfg.model.init,
        "image_tower": cfg.model.image.model_dump(mode="json"),
        "text_tower": cfg.model.text.model_dump(mode="json"),
        "image_preprocessing": {"size": data.image_size, "resize": data.resize, "resize_side": data.resize_side,
                                "interpolation": data.interpolation, "mean": cfg.model.image.mean, "std": cfg.model.image.std},
        "max_text_length": data.max_text_length,
        "vocab_size": len(loaded.tokenizer),
    }
    (folder / HUB_CONFIG_FILE).write_text(json.dumps(hub_config, indent=1))
    (folder / MODEL_CARD_FILE).write_text(model_card(cfg, history or [], model.similarity))
    if "clip" in model.tower_configs:
        write_clip_folder(folder / CLIP_DIR, loaded, logit_scale)


def write_clip_folder(folder: Path, loaded, logit_scale: float | None) -> None:
    """The fine-tuned towers as a ``CLIPModel`` folder, with the tokenizer and an image
    processor that prepares pictures as training did."""
    from transformers import CLIPImageProcessor

    from .clip_towers import to_clip_model

    model = loaded.model
    if logit_scale is None and hasattr(model, "logit_scale"):
        logit_scale = float(model.logit_scale)
    to_clip_model(model, model.tower_configs["clip"], logit_scale).save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    data, image = loaded.config.data, loaded.config.model.image
    side = data.resize_side or data.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": data.image_size, "width": data.image_size},
                       do_center_crop=data.resize == "shorter_side", resample=3 if data.interpolation == "bicubic" else 2,
                       image_mean=image.mean, image_std=image.std).save_pretrained(str(folder))


def model_card(cfg, history: list[dict], similarity: str) -> str:
    """A short model card: what the model is, what it was trained on and with, how it scored."""
    model, data, loss = cfg.model, cfg.data, cfg.loss
    if model.init:
        towers = f"both towers, the projections and the tokenizer from the CLIP model `{model.init}`"
    else:
        text = f"`{model.text.pretrained}`" if model.text.pretrained else f"a {model.text.num_layers}-layer BERT from scratch"
        towers = f"image tower `{model.image.arch}`" + (f" (weights `{model.image.weights}`)" if model.image.weights else "")
        towers += f", text tower {text}"
    locks = [f"{name} tower locked" + (f" but its last {tower.unlocked_groups} layer groups" if tower.unlocked_groups else "")
             for name, tower in (("image", model.image), ("text", model.text)) if tower.lock]
    dataset = "the built-in synthetic shapes data" if data.source == "shapes" else f"{data.source} shards `{data.train_path}`"
    lines = [
        "---", "library_name: vcl-dist", "tags:", "- image-text-retrieval", "- contrastive-learning", "---", "",
        "# Image–text dual encoder (vcl-dist)", "",
        f"An image tower and a text tower projected into one {model.embed_dim}-d space, ranked by {similarity} "
        f"similarity: {towers}" + (f"; {', '.join(locks)}" if locks else "") + ".", "",
        "## Training", "",
        f"- Data: {dataset}; validation `{data.val_path or 'built-in'}`; pictures {data.image_size} px ({data.resize}).",
        f"- Loss: {loss.name}" + (f", margin {loss.margin}, {loss.negatives} negatives" if loss.name != "infonce" else "")
        + (f", λ {loss.reg_lambda}" if loss.name == "vcrl" else "") + f", gathered {loss.gather}.",
        f"- {cfg.train.epochs} epochs, global batch {cfg.train.batch_size}, lr {cfg.train.lr}, seed {cfg.train.seed}.", "",
    ]
    if history:
        last = history[-1]
        metrics = {k: v for k, v in last.items() if k.startswith("val_") and isinstance(v, float) and math.isfinite(v)}
        if metrics:
            lines += [f"## Validation metrics (epoch {last.get('epoch', len(history))})", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())] + [""]
    lines += ["## Use", "", "```bash", "python jobs/evaluate.py --model <this folder>",
              "python jobs/embed.py --model <this folder> ...   # then jobs/search.py --model <this folder> --corpus …",
              "```", ""]
    if model.init:
        lines += ["`clip/` holds the fine-tuned model for `transformers.CLIPModel.from_pretrained` and "
                  "`CLIPProcessor.from_pretrained`.", ""]
    config = yaml.safe_load(dump_config(cfg))
    config.pop("tune", None)
    lines += ["## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
