"""Locking a tower (LiT) or all but its last layer groups, as OpenCLIP's ``--lock-image`` and
``--lock-image-unlocked-groups`` do.

A tower's parameters fall into *layer groups* in the order the input passes them: what comes
before its trunk (embeddings, a stem), each block of the trunk (a transformer layer, a ResNet
stage), and what comes after it (a final norm). Locking with ``unlocked_groups = N`` freezes
every group but the last N. Frozen parameters get ``requires_grad = False`` before the model is
wrapped in DDP, so they are in no gradient bucket (no all-reduce) and, built after, in no
optimizer group; the modules that hold only frozen parameters stay in eval mode whatever
``model.train()`` says, so their batch-norm statistics do not move and their dropout is off.
A locked tower is thereby bit-identical at the end of training to what it was at the start.
"""

from __future__ import annotations

from torch import nn

# Where the blocks of a tower's trunk are, by architecture: Hugging Face CLIP and BERT-like
# encoders, OpenCLIP transformers, timm ViTs and convnets, vcl-dist's SmallResNet.
TRUNK_PATHS = ("encoder.layers", "encoder.layer", "transformer.resblocks", "blocks", "stages", "layers")
# torchvision ResNets keep their stages as attributes, not in one container.
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _trunk_prefixes(tower: nn.Module) -> list[str]:
    """Name prefixes (``encoder.layers.0.``, …) of the trunk's blocks, in order."""
    modules = dict(tower.named_modules())
    for suffix in TRUNK_PATHS:
        # The shortest module path ending in ``suffix`` (a wrapper may nest the model once or twice).
        for name in sorted((n for n in modules if n == suffix or n.endswith("." + suffix)), key=len):
            container = modules[name]
            if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) >= 2:
                return [f"{name}.{child}." for child, _ in container.named_children()]
    stages = [name for name in RESNET_STAGES if name in modules]
    return [f"{name}." for name in stages] if len(stages) >= 2 else []


def layer_groups(tower: nn.Module) -> list[list[str]]:
    """The names of ``tower``'s parameters in layer groups, input side first: everything
    before the trunk, one group per trunk block, everything after. A tower without a trunk we
    know has one group per top-level child."""
    names = [name for name, _ in tower.named_parameters()]
    prefixes = _trunk_prefixes(tower)
    if not prefixes:
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.split(".", 1)[0], []).append(name)
        return list(groups.values())
    before, blocks, after = [], [[] for _ in prefixes], []
    for name in names:
        block = next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        if block is not None:
            blocks[block].append(name)
        elif any(blocks):
            after.append(name)
        else:
            before.append(name)
    return [group for group in [before, *blocks, after] if group]


def lock_tower(tower: nn.Module, unlocked_groups: int = 0) -> int:
    """Freeze every parameter of ``tower`` but those of its last ``unlocked_groups`` layer
    groups; the number of frozen parameters (elements).

    Raises:
        ValueError: ``unlocked_groups`` is not below the tower's number of groups (nothing would be locked).
    """
    groups = layer_groups(tower)
    if unlocked_groups >= len(groups):
        raise ValueError(f"unlocked_groups={unlocked_groups} leaves nothing locked: the tower has {len(groups)} layer groups")
    locked = {name for group in groups[: len(groups) - unlocked_groups] for name in group}
    frozen = 0
    for name, param in tower.named_parameters():
        if name in locked:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def is_fully_locked(tower: nn.Module) -> bool:
    """Whether a tower has parameters and none of them trains (a tower locked whole)."""
    params = list(tower.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def keep_locked_modules_in_eval(module: nn.Module) -> None:
    """Put back in eval mode every submodule whose parameters are all frozen (with everything
    inside it, dropout too); call after ``module.train()``."""
    for sub in module.modules():
        params = list(sub.parameters())
        if sub.training and params and not any(p.requires_grad for p in params):
            sub.eval()
