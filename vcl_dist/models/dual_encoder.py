"""The dual encoder: image tower + text tower, each projected into one shared latent space."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .image_tower import build_image_tower
from .text_tower import build_text_tower

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class DualEncoder(nn.Module):
    """``forward(images, input_ids, attention_mask) -> (U [B, D], V [B, D])``, not normalised.

    Images arrive as ``uint8 [B, 3, H, W]`` straight from the data pipeline and are scaled and
    normalised here, on the model's device. The projections are bias-free linear maps
    (``U = Wᵢᵀ X``, ``V = Wₜᵀ Y`` in the VCRL notation); losses decide whether to normalise, and
    ``similarity`` records the choice for retrieval.
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int, similarity: str = "cosine"):
        super().__init__()
        # How embeddings of this model are compared ("cosine" or "squared_distance"): fixed by
        # the loss it is trained with, part of the model for everything that ranks with it.
        self.similarity = similarity
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = nn.Linear(image_tower.out_features, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.out_features, embed_dim, bias=False)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        images = (images - self.image_mean) / self.image_std
        return self.image_projection(self.image_tower(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Drop the padding columns every caption of the batch has: a shorter sequence is
        # cheaper and, with the attention mask, gives the same result.
        length = int(attention_mask.sum(1).max().item()) if attention_mask.numel() else 1
        input_ids, attention_mask = input_ids[:, : max(length, 1)], attention_mask[:, : max(length, 1)]
        return self.text_projection(self.text_tower(input_ids, attention_mask))

    def forward(self, images, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


def check_model_config(cfg: ModelConfig) -> None:
    """Build the model's structure on the meta device — no memory, no weights — so that a config
    that describes no model (an unknown torchvision name, say) stops on the driver, before Ray
    starts any worker. Towers with pretrained weights are left to the workers: reading weights
    here would load them twice.

    Raises:
        ConfigError: the towers cannot be built (one line).
    """
    from ..config import ConfigError

    if cfg.image.weights or cfg.text.pretrained:
        return
    try:
        with torch.device("meta"):
            build_dual_encoder(cfg, cfg.text.vocab_size, 16)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(f"the config builds no model: {' '.join(str(err).split())[:300]}") from None


def build_dual_encoder(cfg: ModelConfig, vocab_size: int, max_text_length: int, pad_token_id: int = 0,
                       similarity: str = "cosine") -> DualEncoder:
    """``similarity``: :attr:`vcl_dist.config.Config.similarity` of the run."""
    return DualEncoder(
        build_image_tower(cfg.image),
        build_text_tower(cfg.text, vocab_size, max_text_length, pad_token_id),
        cfg.embed_dim,
        similarity,
    )
