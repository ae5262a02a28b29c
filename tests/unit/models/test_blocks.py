"""The repeated blocks that FSDP shards and activation checkpointing recomputes, found in every
tower family: the built-in ResNet's stages, torchvision's ResNet stages and ViT blocks, the
BERT text tower's layers, Hugging Face CLIP's and open_clip's transformer blocks."""

import pytest
import torchvision
from pretrained_models import save_tiny_clip
from test_open_clip import open_clip_folder  # noqa: F401  (the fixture)

from vcl_dist.config import load_config
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.blocks import repeated_blocks


def names(tower) -> list[str]:
    return [type(block).__name__ for block in repeated_blocks(tower)]


def test_the_built_in_towers_blocks():
    model = build_dual_encoder(load_config(None, ["model.image.blocks=[1,2,1,1]", "model.text.num_layers=3"]).model, 50, 8)
    assert [len(stage) for stage in repeated_blocks(model.image_tower)] == [1, 2, 1, 1]  # the stages
    assert names(model.text_tower) == ["BertLayer"] * 3


@pytest.mark.parametrize("arch, expected", [("resnet18", ["Sequential"] * 4), ("vit_b_32", ["EncoderBlock"] * 12)])
def test_torchvision_towers_blocks(arch, expected):
    assert names(getattr(torchvision.models, arch)()) == expected


def test_clip_and_open_clip_towers_blocks(tmp_path, open_clip_folder):  # noqa: F811
    clip = build_dual_encoder(load_config(None, [f"model.init={save_tiny_clip(tmp_path / 'clip')}"]).model, 0, 8)
    assert names(clip.image_tower) == ["CLIPEncoderLayer"] * 2 and names(clip.text_tower) == ["CLIPEncoderLayer"] * 2
    opened = build_dual_encoder(load_config(None, [f"model.init=open_clip:local-dir:{open_clip_folder}"]).model, 0, 8)
    assert names(opened.image_tower) == ["ResidualAttentionBlock"] * 2
    assert names(opened.text_tower) == ["ResidualAttentionBlock"] * 2
