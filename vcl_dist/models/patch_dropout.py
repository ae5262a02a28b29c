"""Patch dropout (FLIP, Li et al. 2023): in training, a ViT image tower sees a random share of
each picture's patches (``model.image.patch_dropout``), so its blocks run on fewer tokens.

Dropping half the patches about halves a ViT step, at a small cost in accuracy that FLIP
recovers with a short unmasked tune at the end. Evaluation, export and serving see every patch:
the drop happens only while the tower is in training mode (a locked tower never is).

The drop is placed where each tower family has its patch tokens with their position embeddings
added, before the first block: torchvision's ViT after ``encoder.dropout``, Hugging Face
CLIP's after ``vision_model.embeddings``, open_clip's in its own ``patch_dropout`` slot. Hooks
and that slot hold no parameters: the state dict is the same with and without it.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_patches(tokens: torch.Tensor, prob: float, leading: int = 1) -> torch.Tensor:
    """``tokens [B, leading + P, D]`` -> ``[B, leading + K, D]``: the ``leading`` tokens (a class
    token) and a random ``K = max(1, ⌊P·(1 − prob)⌋)`` of each row's patches, drawn apart per row."""
    patches = tokens.shape[1] - leading
    keep = max(1, int(patches * (1 - prob)))
    chosen = torch.rand(tokens.shape[0], patches, device=tokens.device).topk(keep, dim=1).indices + leading
    kept = tokens.gather(1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    return torch.cat([tokens[:, :leading], kept], dim=1)


class PatchDropout(nn.Module):
    """`drop_patches` in training mode, nothing in eval mode."""

    def __init__(self, prob: float, leading: int = 1):
        super().__init__()
        self.prob, self.leading = prob, leading

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` tokens -> ``[B, T', C]``: in training, the leading tokens and a random share of the patches."""
        return drop_patches(tokens, self.prob, self.leading) if self.training and self.prob > 0 else tokens


def _hook(prob: float):
    def after(module: nn.Module, inputs, output):
        return drop_patches(output, prob) if module.training else output

    return after


def apply_patch_dropout(image_tower: nn.Module, prob: float) -> None:
    """Make ``image_tower`` drop ``prob`` of its patches in training.

    Raises:
        ValueError: the tower is no ViT (a CNN has no patch tokens to drop).
    """
    if not 0 <= prob < 1:
        raise ValueError(f"model.image.patch_dropout must be in [0, 1), got {prob}")
    if prob == 0:
        return
    import torchvision

    visual = getattr(image_tower, "visual", None)
    vision_model = getattr(image_tower, "vision_model", None)
    if isinstance(image_tower, torchvision.models.VisionTransformer):
        image_tower.encoder.dropout.register_forward_hook(_hook(prob))
    elif vision_model is not None and hasattr(vision_model, "embeddings"):
        vision_model.embeddings.register_forward_hook(_hook(prob))
    elif visual is not None and hasattr(visual, "patch_dropout"):
        visual.patch_dropout = PatchDropout(prob, leading=1 if getattr(visual, "class_embedding", None) is not None else 0)
    else:
        raise ValueError(f"model.image.patch_dropout needs a ViT image tower (torchvision's vit_*, a CLIP or open_clip "
                         f"model), not {type(image_tower).__name__}")
