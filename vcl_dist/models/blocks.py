"""The repeated blocks of a tower: the units that are sharded (FSDP) and recomputed in the
backward pass (activation checkpointing) one at a time.

Found by shape, not by name, so that every tower family is covered: the children of a
``ModuleList`` or ``Sequential`` whose children are all of one class and each made of modules
themselves — Hugging Face's ``encoder.layer(s)``, open_clip's ``transformer.resblocks``,
torchvision's ViT ``encoder.layers``, timm's ``blocks``, the small ResNet's ``stages`` — and,
for torchvision ResNets, the stages ``layer1`` … ``layer4``. The outermost such container wins:
the blocks' insides are not searched.
"""

from __future__ import annotations

from torch import nn

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
TOWERS = ("image_tower", "text_tower")


def _is_block_container(module: nn.Module) -> bool:
    children = list(module.children())
    return (isinstance(module, (nn.ModuleList, nn.Sequential)) and bool(children)
            and len({type(child) for child in children}) == 1
            and all(any(True for _ in child.children()) for child in children)
            and any(True for _ in module.parameters()))


def repeated_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's blocks, in the order they run (see the module docstring); [] when it has none."""
    if all(isinstance(getattr(tower, name, None), nn.Module) for name in RESNET_STAGES):
        return [getattr(tower, name) for name in RESNET_STAGES]
    blocks: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in tower.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if module is not tower and all(isinstance(getattr(module, stage, None), nn.Module) for stage in RESNET_STAGES):
            blocks += [getattr(module, stage) for stage in RESNET_STAGES]
            inside.add(name)
        elif _is_block_container(module):
            blocks += list(module.children())
            inside.add(name)
    return blocks


def tower_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a dual encoder's image tower, then of its text tower."""
    towers = [getattr(model, name, None) for name in TOWERS]
    return [block for tower in towers if isinstance(tower, nn.Module) for block in repeated_blocks(tower)]
