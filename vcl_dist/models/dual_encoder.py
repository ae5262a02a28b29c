"""The dual encoder: image tower + text tower, each projected into one shared latent space."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..runtime.console import one_line
from .image_tower import build_image_tower
from .locking import is_fully_locked, keep_locked_modules_in_eval, lock_tower
from .open_clip_towers import is_open_clip
from .patch_dropout import apply_patch_dropout
from .text_tower import build_text_tower

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class DualEncoder(nn.Module):
    """``forward(images, input_ids, attention_mask) -> (U [B, D], V [B, D])``, not normalised.

    Images arrive as ``uint8 [B, 3, H, W]`` straight from the data pipeline and are scaled and
    normalised here, on the model's device (with the towers' own mean and std). The
    projections are bias-free linear maps (``U = Wᵢᵀ X``, ``V = Wₜᵀ Y`` in the VCRL notation);
    losses decide whether to normalise, and ``similarity`` records the choice for retrieval.

    A locked tower (`.locking`) stays in eval mode through ``train()``, and a wholly locked
    one runs without autograd: nothing of it is kept for a backward pass.
    ``tower_configs``: the pretrained towers' own configs (a ``CLIPConfig``, a text encoder's),
    saved with the model so that it can be built again without the pretrained files.
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int, similarity: str = "cosine",
                 image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD):
        super().__init__()
        # How embeddings of this model are compared ("cosine" or "squared_distance"): fixed by
        # the loss it is trained with, part of the model for everything that ranks with it.
        self.similarity = similarity
        self.tower_configs: dict = {}
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = nn.Linear(image_tower.out_features, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.out_features, embed_dim, bias=False)
        self.register_buffer("image_mean", torch.tensor(list(image_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(list(image_std)).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DualEncoder":
        """Set training mode, keeping the modules of locked towers in eval mode (frozen batch-norm statistics and
        dropout).
        """
        super().train(mode)
        keep_locked_modules_in_eval(self)
        return self

    # The public encoders and the tower-output methods are entry points of their own (evaluation,
    # serving, feature caching; under FSDP each gathers the parameters it needs): none calls
    # another, so that a sharded model gathers once per call.
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures ``[B, 3, H, W]`` (uint8, or floats in [0, 1]) -> ``[B, D]``; or the image
        tower's own outputs ``[B, F]`` (a locked tower's, computed once) -> their projection."""
        return self._image_embeddings(images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised pictures -> the image tower's outputs ``[B, F]`` (without autograd when it is locked whole)."""
        return self._image_tower_outputs(images)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L]`` -> ``[B, D]``; or the text tower's own outputs ``[B, H]`` (floats: a
        locked tower's, computed once) -> their projection."""
        return self._text_embeddings(input_ids, attention_mask)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens -> the text tower's outputs ``[B, H]`` (without autograd when it is locked whole)."""
        return self._text_tower_outputs(input_ids, attention_mask)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers and their projections.

        Args:
            images: ``[B, 3, H, W]`` pixels, uint8 or floats in [0, 1] (normalised here with the tower's mean and
                std), or ``[B, F]`` cached features of a locked image tower.
            input_ids: ``[B, L]`` token ids.
            attention_mask: ``[B, L]`` 1 for tokens, 0 for padding.

        Returns:
            ``([B, D], [B, D])``: image and caption embeddings in the shared space, not normalised.
        """
        return self._image_embeddings(images), self._text_embeddings(input_ids, attention_mask)

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2 and images.is_floating_point():
            return self.image_projection(images.to(self.image_projection.weight.dtype))
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        images = (images - self.image_mean) / self.image_std
        return self.image_projection(self._image_tower_outputs(images))

    def _image_tower_outputs(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not is_fully_locked(self.image_tower)):
            return self.image_tower(images)

    def _text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.is_floating_point():
            return self.text_projection(input_ids.to(self.text_projection.weight.dtype))
        return self.text_projection(self._text_tower_outputs(input_ids, attention_mask))

    def _text_tower_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Drop the padding columns every caption of the batch has: a shorter sequence is
        # cheaper and, with the attention mask, gives the same result.
        length = int(attention_mask.sum(1).max().item()) if attention_mask.numel() else 1
        input_ids, attention_mask = input_ids[:, : max(length, 1)], attention_mask[:, : max(length, 1)]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not is_fully_locked(self.text_tower)):
            return self.text_tower(input_ids, attention_mask)


def check_model_config(cfg: ModelConfig) -> None:
    """Build the model's structure on the meta device — no memory, no weights — so that a config
    that describes no model (an unknown torchvision name, say) stops on the driver, before Ray
    starts any worker. Towers with pretrained weights are left to the workers: reading weights
    here would load them twice.

    Raises:
        ConfigError: the towers cannot be built (one line).
    """
    from ..config import ConfigError

    if cfg.image.weights or cfg.text.pretrained or cfg.init:
        return
    try:
        with torch.device("meta"):
            build_dual_encoder(cfg, cfg.text.vocab_size, 16)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(f"the config builds no model: {one_line(err, 300)}") from None


def build_dual_encoder(cfg: ModelConfig, vocab_size: int, max_text_length: int, pad_token_id: int = 0,
                       similarity: str = "cosine", saved_towers: dict | None = None) -> DualEncoder:
    """The dual encoder ``cfg`` describes, pretrained parts loaded, locks applied.

    ``similarity``: `vcl_dist.config.Config.similarity` of the run. ``saved_towers``: the
    ``tower_configs`` saved with a model: build its structure from them and read no pretrained
    weights (the model's own weights are loaded next).
    """
    if (saved_towers and "open_clip" in saved_towers) or is_open_clip(cfg.init):
        from .open_clip_towers import open_clip_config, open_clip_parts, saved_open_clip_parts

        if saved_towers:
            parts, config = saved_open_clip_parts(saved_towers["open_clip"]), saved_towers["open_clip"]
        else:
            parts, config = open_clip_parts(cfg.init, cfg.init_weights), open_clip_config(cfg.init)
        model = clip_dual_encoder(parts, {"open_clip": config}, cfg, similarity)
    elif cfg.init or (saved_towers and "clip" in saved_towers):
        from .clip_towers import clip_parts

        parts = clip_parts(None if saved_towers else cfg.init, config=(saved_towers or {}).get("clip"))
        model = clip_dual_encoder(parts, {"clip": parts.config}, cfg, similarity)
    else:
        text_config = (saved_towers or {}).get("text")
        text_tower = build_text_tower(cfg.text, vocab_size, max_text_length, pad_token_id, saved_config=text_config)
        model = DualEncoder(build_image_tower(cfg.image, load_weights=saved_towers is None), text_tower, cfg.embed_dim,
                            similarity, cfg.image.mean, cfg.image.std)
        if cfg.text.pretrained:
            model.tower_configs = {"text": text_tower.encoder.config.to_dict()}
    for tower, settings in ((model.image_tower, cfg.image), (model.text_tower, cfg.text)):
        if settings.lock:
            lock_tower(tower, settings.unlocked_groups)
    apply_patch_dropout(model.image_tower, cfg.image.patch_dropout)
    return model.train()


def clip_dual_encoder(parts, tower_configs: dict, cfg: ModelConfig, similarity: str) -> DualEncoder:
    """A dual encoder of a CLIP model's parts (Hugging Face's or OpenCLIP's): its towers, its own
    projections (not fresh ones) and its logit scale (a buffer: the InfoNCE loss starts from it,
    an export back to CLIP keeps it)."""
    model = DualEncoder(parts.image_tower, parts.text_tower, parts.visual_projection.out_features, similarity,
                        cfg.image.mean, cfg.image.std)
    model.image_projection, model.text_projection = parts.visual_projection, parts.text_projection
    model.tower_configs = tower_configs
    model.register_buffer("logit_scale", torch.tensor(parts.logit_scale))
    return model
