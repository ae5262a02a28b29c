"""A Hugging Face ``CLIPModel`` as vcl-dist's two towers, and back.

``model.init`` names a ``CLIPModel`` (a hub name or a local folder). Its vision and text
transformers become the image and text towers (pooled outputs: the class token after the
post-layernorm, the end-of-text token after the final norm), its ``visual_projection`` and
``text_projection`` the dual encoder's projections, its ``logit_scale`` the InfoNCE loss's
starting temperature; its tokenizer and image processor (resize, crop, mean and std) become the
run's (`clip_preprocessing`). Nothing is re-initialised: before any training step the
dual encoder gives the original model's embeddings.

`to_clip_model` assembles the fine-tuned weights back into a ``CLIPModel`` that
``CLIPModel.from_pretrained`` loads from the export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class CLIPImageTower(nn.Module):
    """A ``CLIPVisionModel``: ``[B, 3, H, W]`` normalised pixels -> pooled ``[B, hidden]``."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.out_features = vision_model.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels -> ``[B, hidden]`` the vision transformer's pooled output."""
        return self.vision_model(pixel_values=images).pooler_output


class CLIPTextTower(nn.Module):
    """A ``CLIPTextModel``: tokens -> the end-of-text token's final state ``[B, hidden]``."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.out_features = text_model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` token ids and attention mask -> ``[B, hidden]`` the text transformer's pooled output."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


@dataclass
class CLIPParts:
    """The pieces of a Hugging Face ``CLIPModel`` that a dual encoder is built from."""
    image_tower: CLIPImageTower
    text_tower: CLIPTextTower
    visual_projection: nn.Linear
    text_projection: nn.Linear
    logit_scale: float  # log of CLIP's learned 1/temperature
    config: dict  # the CLIPConfig, to build the structure again without the weights


def clip_parts(name_or_path: str | None = None, config: dict | None = None) -> CLIPParts:
    """The parts of a ``CLIPModel``: loaded with its weights from ``name_or_path``, or built
    with fresh weights from a saved ``config`` (a model folder's, whose weights come next)."""
    from transformers import CLIPConfig, CLIPModel

    if name_or_path is not None:
        # trust_remote_code stays off: no code from a model hub runs on the cluster.
        model = CLIPModel.from_pretrained(name_or_path, trust_remote_code=False)
    else:
        model = CLIPModel(CLIPConfig.from_dict(config))
    return CLIPParts(CLIPImageTower(model.vision_model), CLIPTextTower(model.text_model), model.visual_projection,
                     model.text_projection, float(model.logit_scale.detach()), model.config.to_dict())


def is_clip_folder(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a ``CLIPModel`` (its config's ``model_type``)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False).model_type == "clip"
    except (OSError, ValueError):
        return False


def to_clip_model(dual_encoder: nn.Module, clip_config: dict, logit_scale: float | None = None):
    """A ``CLIPModel`` holding ``dual_encoder``'s weights (towers and projections); the logit
    scale is ``logit_scale`` (the trained InfoNCE temperature's) or the original's."""
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig.from_dict(clip_config))
    model.vision_model.load_state_dict(dual_encoder.image_tower.vision_model.state_dict())
    model.text_model.load_state_dict(dual_encoder.text_tower.text_model.state_dict())
    model.visual_projection.load_state_dict(dual_encoder.image_projection.state_dict())
    model.text_projection.load_state_dict(dual_encoder.text_projection.state_dict())
    if logit_scale is not None:
        model.logit_scale.data.fill_(logit_scale)
    return model.eval()
