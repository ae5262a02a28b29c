"""An OpenCLIP model as vcl-dist's two towers (``model.init=open_clip:<name>``; optional extra
``open_clip_torch``).

``<name>`` is what ``open_clip.create_model_and_transforms`` takes: an architecture with its
weights in ``model.init_weights`` (a local file), or ``local-dir:/path`` (a folder with
``open_clip_config.json`` and the weights, as OpenCLIP's hub repositories hold them). The visual
tower's projection and the text projection become the dual encoder's projections (bias-free
linear maps, the same arithmetic), its logit scale the InfoNCE loss's starting temperature, its
``preprocess_cfg`` the run's picture geometry, and its BPE tokenizer an equivalent Hugging Face
``CLIPTokenizer`` (same vocabulary and merges: saved with every checkpoint like any tokenizer).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..runtime.console import one_line

PREFIX = "open_clip:"


def is_open_clip(init: str | None) -> bool:
    """Whether ``model.init`` names an OpenCLIP model (``open_clip:<name>``)."""
    return bool(init) and init.startswith(PREFIX)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ValueError("model.init: OpenCLIP models need open_clip_torch (pip install 'vcl-dist[open_clip]')") from None
    return open_clip


class OpenCLIPImageTower(nn.Module):
    """OpenCLIP's visual tower without its final projection: pictures -> pooled ``[B, width]``."""

    def __init__(self, visual: nn.Module, width: int):
        super().__init__()
        self.visual = visual
        self.out_features = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, width]`` OpenCLIP's visual trunk output, before its
        projection.
        """
        return self.visual(images)


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP's text transformer (of a ``CLIP`` model) without its projection: tokens -> the
    pooled ``[B, width]``. Tokens are padded back to the model's context length (its position
    embeddings are that long); with the causal mask, padding after the end token changes nothing."""

    def __init__(self, clip: nn.Module, pad_token_id: int):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_token_id = getattr(clip, "text_eos_id", None)
        self.pad_token_id = pad_token_id
        self.out_features = clip.ln_final.normalized_shape[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids (padded to the context length here) -> ``[B, width]`` the pooled text features,
        before the projection.
        """
        from open_clip.transformer import text_global_pool

        context = self.positional_embedding.shape[0]
        if input_ids.shape[1] < context:
            input_ids = nn.functional.pad(input_ids, (0, context - input_ids.shape[1]), value=self.pad_token_id)
        x = self.token_embedding(input_ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_token_id)


@dataclass
class OpenCLIPParts:
    """The pieces of an OpenCLIP model that a dual encoder is built from."""
    image_tower: OpenCLIPImageTower
    text_tower: OpenCLIPTextTower
    visual_projection: nn.Linear
    text_projection: nn.Linear
    logit_scale: float
    preprocess: dict  # OpenCLIP's preprocess_cfg: size, mean, std, interpolation, resize_mode


def _as_linear(projection) -> nn.Linear:
    """OpenCLIP keeps projections as ``x @ P`` parameters (or a Linear): the same map as a bias-free Linear."""
    if isinstance(projection, nn.Linear):
        return projection
    linear = nn.Linear(projection.shape[0], projection.shape[1], bias=False)
    linear.weight.data.copy_(projection.detach().T)
    return linear


def open_clip_config(init: str) -> dict:
    """``{"model_cfg", "preprocess_cfg"}`` of ``init``: what builds its structure again, saved with
    a model (``towers.json``) so that the model folder needs no OpenCLIP files."""
    open_clip = _open_clip()
    name = init.removeprefix(PREFIX)
    if name.startswith("local-dir:"):
        return json.loads((Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"model.init: OpenCLIP knows no architecture {name!r}")
    return {"model_cfg": model_cfg, "preprocess_cfg": {}}


def saved_open_clip_parts(config: dict) -> OpenCLIPParts:
    """The structure of a saved model's OpenCLIP towers, from its ``towers.json`` entry."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(config))
        return open_clip_parts(f"{PREFIX}local-dir:{folder}", None, load_weights=False)


def open_clip_parts(init: str, weights: str | None, load_weights: bool = True) -> OpenCLIPParts:
    """The parts of the OpenCLIP model ``init`` (``open_clip:<name>``); ``load_weights=False``:
    its structure only (a saved model's weights come next)."""
    open_clip = _open_clip()
    name = init.removeprefix(PREFIX)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights if load_weights and not name.startswith("local-dir:") else None,
            load_weights=load_weights)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        raise ValueError(f"model.init: cannot build {init}: {one_line(err, 200)}") from None
    if not hasattr(model, "token_embedding"):
        raise ValueError(f"model.init: {init} is an OpenCLIP {type(model).__name__}; vcl-dist takes OpenCLIP CLIP models")
    visual = model.visual
    projection = getattr(visual, "proj", None)
    if projection is None:
        raise ValueError(f"model.init: {init}'s visual tower has no final projection vcl-dist can take apart")
    visual.proj = None  # the tower ends at the pooled features; the projection is the dual encoder's
    cfg = preprocess_cfg(model)
    tokenizer = open_clip_tokenizer(init)
    return OpenCLIPParts(OpenCLIPImageTower(visual, projection.shape[0]), OpenCLIPTextTower(model, tokenizer.pad_token_id),
                         _as_linear(projection), _as_linear(model.text_projection),
                         float(model.logit_scale.detach()), cfg)


def preprocess_cfg(model) -> dict:
    """OpenCLIP's image preprocessing of a model (size, mean, std, interpolation, resize mode), the size as one int."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", model.visual.image_size)
    cfg["size"] = size[0] if isinstance(size, (tuple, list)) else size
    return cfg


def open_clip_tokenizer(init: str):
    """OpenCLIP's BPE tokenizer as a Hugging Face ``CLIPTokenizer`` (the same vocabulary, merges
    and special tokens), so that it tokenises in the data pipeline and saves with checkpoints
    like every other tokenizer."""
    from transformers import CLIPTokenizer

    open_clip = _open_clip()
    simple = open_clip.get_tokenizer(init.removeprefix(PREFIX))
    if not hasattr(simple, "bpe_ranks"):
        raise ValueError(f"model.init: {init} uses a {type(simple).__name__}; vcl-dist takes OpenCLIP's BPE tokenizer")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    start, end = simple.decoder[simple.sot_token_id], simple.decoder[simple.eot_token_id]
    tokenizer = CLIPTokenizer(vocab=dict(simple.encoder), merges=merges, bos_token=start, eos_token=end, pad_token=end,
                              unk_token=end)
    tokenizer.model_max_length = simple.context_length
    return tokenizer
