"""Image towers: a small ResNet for small images, or any ``torchvision.models`` architecture.

Every tower returns pooled features ``[B, F]`` and exposes ``out_features = F``; the dual
encoder adds the projection into the shared space.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..config import ImageTowerConfig


class SmallResNet(nn.Module):
    """A ResNet of torchvision ``BasicBlock`` stages sized for 32-96 px inputs.

    Stem: 3x3 conv with stride 2 (no max-pool), then stages of widths ``w, 2w, 4w, 8w`` with
    stride 2 between stages, then global average pooling. At 48 px and ``w = 32`` it costs
    about 1/40 of a ResNet-18 at 224 px, which is what a CPU-only laptop run can afford.
    """

    def __init__(self, width: int = 32, blocks: list[int] | tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, in_ch = [], width
        for index, count in enumerate(blocks):
            out_ch = width * 2**index
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
            layers = [BasicBlock(in_ch, out_ch, stride, downsample)]
            layers += [BasicBlock(out_ch, out_ch) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = in_ch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(images))).flatten(1)


def _strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace a torchvision classifier head by Identity; return the model and its feature size."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) else [head]
        if linears:
            setattr(model, attr, nn.Identity())
            return model, linears[0].in_features
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    if cfg.arch == "small_resnet":
        return SmallResNet(cfg.width, cfg.blocks)
    try:
        model = torchvision.models.get_model(cfg.arch, weights=cfg.weights)
    except ValueError as err:
        raise ValueError(f"model.image.arch: {err}") from None
    if cfg.small_input and isinstance(model, torchvision.models.ResNet):
        # CIFAR-style stem: small images keep their resolution through the first stage.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model, features = _strip_classifier(model)
    model.out_features = features
    return model
