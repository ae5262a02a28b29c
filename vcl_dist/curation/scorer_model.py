"""The model a filter scores with: a trained vcl-dist model (export, checkpoint or run folder), or
a pretrained CLIP as ``model.init`` names it (a Hugging Face ``CLIPModel`` or ``open_clip:<name>``),
untrained by vcl-dist — DataComp's CLIP-score filtering uses OpenAI's CLIP so."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import Config, dump_config, load_config
from ..models.export import CONFIG_FILE, MODEL_FILE, TOKENIZER_DIR, save_tower_configs
from ..models.locate import model_files
from ..retrieval.model import RetrievalModel, load_model_files
from ..retrieval.pipeline import load_model_and_config


@dataclass
class ScorerModel:
    model: RetrievalModel
    files: dict[str, bytes]  # what the model actors load (see models.locate.model_files)
    fingerprint: str  # SHA-256 of the files: a resumed filter must score with the same model
    described: str  # how the user named it
    config: Config


def _fingerprint(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def trained_scorer(path: str, overrides: Sequence[str] = ()) -> ScorerModel:
    """A trained model's folder (local or ``s3://``).

    Raises:
        ModelNotFoundError: nothing loadable at ``path``. ConfigError: a bad override.
    """
    model, cfg = load_model_and_config(path, overrides)
    files = model_files(path, cfg.s3)
    return ScorerModel(model, files, _fingerprint(files), path, cfg)


def pretrained_scorer(init: str, init_weights: str | None = None, overrides: Sequence[str] = (), log=print) -> ScorerModel:
    """A pretrained CLIP, built as fine-tuning would start from it (``model.init``), with the
    similarity CLIP was trained with (cosine).

    Raises:
        ConfigError: ``init`` is no CLIP model or cannot be read (one line).
    """
    from ..data.tokenizer import load_pretrained_tokenizer
    from ..models.dual_encoder import build_dual_encoder
    from ..models.open_clip_towers import is_open_clip, open_clip_tokenizer
    from ..models.pretrained import adopt_pretrained_settings

    settings = [f"model.init={init}", "loss.name=infonce", *([f"model.init_weights={init_weights}"] if init_weights else [])]
    cfg = adopt_pretrained_settings(load_config(None, [*settings, *overrides]), log=log)
    tokenizer = open_clip_tokenizer(init) if is_open_clip(init) else load_pretrained_tokenizer(init)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id or 0,
                               cfg.similarity)
    with tempfile.TemporaryDirectory() as folder:
        # The folder a checkpoint would be: the actors build the model from it as from any other.
        torch.save(model.state_dict(), Path(folder) / MODEL_FILE)
        (Path(folder) / CONFIG_FILE).write_text(dump_config(cfg))
        save_tower_configs(Path(folder), model)
        tokenizer.save_pretrained(str(Path(folder) / TOKENIZER_DIR))
        files = model_files(folder)
    return ScorerModel(load_model_files(files), files, _fingerprint(files), init, cfg)
