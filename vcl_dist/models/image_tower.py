"""Image towers: a small ResNet for small images, any ``torchvision.models`` architecture, or a
timm model (``timm:<name>``); pretrained weights by torchvision name or from a local file.

Every tower returns pooled features ``[B, F]`` and exposes ``out_features = F``; the dual
encoder adds the projection into the shared space.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from ..config import ImageTowerConfig
from ..runtime.console import one_line

# Weights files a model folder may hold, in the order they are looked for.
WEIGHTS_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


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
        """``[B, 3, H, W]`` -> ``[B, features]``: the stem, the residual stages, global average pooling."""
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


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file (safetensors, or a torch file read with
    ``weights_only``), or from the one weights file of a folder; a checkpoint's ``state_dict`` /
    ``model`` entry is unwrapped.

    Raises:
        ValueError: no such file, no weights file in the folder, or an unreadable file (one line).
    """
    found = Path(path)
    if found.is_dir():
        candidates = [found / name for name in WEIGHTS_FILE_NAMES if (found / name).is_file()]
        candidates = candidates or sorted(p for p in found.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
        if not candidates:
            raise ValueError(f"model.image.weights: no weights file in {path}")
        found = candidates[0]
    if not found.is_file():
        raise ValueError(f"model.image.weights: no such file: {path}")
    try:
        if found.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(found))
        else:
            state = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise ValueError(f"model.image.weights: cannot read {found}: {one_line(err, 200)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.image.weights: {found} holds no state dict of tensors")
    return state


def is_local_weights(weights: str | None) -> bool:
    """Whether ``model.image.weights`` names a local file or folder rather than a torchvision weights name."""
    return bool(weights) and ("/" in weights or Path(weights).exists())


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load a local weights file into a backbone, its classifier head allowed to be missing or
    other (it is dropped next); any other missing or unexpected key is an error."""
    head = ("fc.", "classifier.", "head.", "heads.")
    state = {k: v for k, v in read_weights_file(path).items() if not k.startswith(head)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape that differs
        raise ValueError(f"model.image.weights: {path} does not fit {type(model).__name__} "
                         f"({one_line(err, 200)})") from None
    problems = [k for k in [*result.missing_keys, *result.unexpected_keys] if not k.startswith(head)]
    if problems:
        raise ValueError(f"model.image.weights: {path} does not fit {type(model).__name__} "
                         f"({len(problems)} keys differ, e.g. {problems[0]})")


def build_image_tower(cfg: ImageTowerConfig, load_weights: bool = True) -> nn.Module:
    """The tower ``model.image`` names. ``load_weights=False``: its structure only (a saved
    model's weights come next), so that no weights are read or downloaded again."""
    if cfg.arch == "small_resnet":
        return SmallResNet(cfg.width, cfg.blocks)
    local = is_local_weights(cfg.weights)
    if cfg.arch.startswith("timm:"):
        return build_timm_tower(cfg.arch.removeprefix("timm:"), cfg.weights if load_weights else None)
    try:
        named = cfg.weights if load_weights and not local else None
        model = torchvision.models.get_model(cfg.arch, weights=named)
    except ValueError as err:
        raise ValueError(f"model.image.arch: {err}") from None
    if load_weights and local:
        load_backbone_weights(model, cfg.weights)
    if cfg.small_input and isinstance(model, torchvision.models.ResNet):
        # CIFAR-style stem: small images keep their resolution through the first stage.
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model, features = _strip_classifier(model)
    model.out_features = features
    return model


def build_timm_tower(name: str, weights: str | None) -> nn.Module:
    """A timm backbone without its classifier (``num_classes=0``: pooled features); ``weights``:
    a local file or folder (nothing is downloaded)."""
    try:
        import timm
    except ImportError:
        raise ValueError("model.image.arch: timm models need timm (pip install 'vcl-dist[timm]')") from None
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"model.image.arch: {one_line(err, 200)}") from None
    if weights:
        load_backbone_weights(model, weights)
    model.out_features = model.num_features
    return model
