"""Patch dropout (``model.image.patch_dropout``): in training a ViT tower's blocks see the class
token and a random share of each picture's patches; in evaluation every patch, and the same
outputs as the tower without it. torchvision's ViT, Hugging Face CLIP's and open_clip's."""

import pytest
import torch
import torchvision
from pretrained_models import save_tiny_clip
from test_open_clip import open_clip_folder  # noqa: F401  (the fixture)

from vcl_dist.config import load_config
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.blocks import repeated_blocks
from vcl_dist.models.patch_dropout import apply_patch_dropout, drop_patches


def test_each_row_keeps_its_leading_token_and_its_own_random_share_of_patches():
    tokens = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)  # a class token and 8 patches per row
    torch.manual_seed(0)
    kept = drop_patches(tokens, 0.5)
    assert kept.shape == (2, 5, 3)
    for row in range(2):
        assert torch.equal(kept[row, 0], tokens[row, 0])
        rows = {tuple(t.tolist()) for t in tokens[row, 1:]}
        chosen = [tuple(t.tolist()) for t in kept[row, 1:]]
        assert len(set(chosen)) == 4 and set(chosen) <= rows  # distinct patches of this very row
    assert drop_patches(tokens, 0.9).shape == (2, 2, 3)  # at least one patch stays
    draws = {tuple(drop_patches(tokens, 0.5)[0, 1:, 0].sort().values.tolist()) for _ in range(20)}
    assert len(draws) > 1


def tokens_into_the_first_block(tower, images) -> int:
    seen = []
    handle = repeated_blocks(tower)[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    tower(images)
    handle.remove()
    return seen[0]


def vit_dual_encoders(kind: str, tmp_path, open_clip_dir):
    """The same dual encoder (same weights) without and with patch dropout 0.5."""
    if kind == "torchvision":
        def tower(prob):
            torch.manual_seed(0)
            vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                       hidden_dim=16, mlp_dim=32)
            apply_patch_dropout(vit, prob)
            return vit
        return tower(0.0), tower(0.5), 16
    init = f"open_clip:local-dir:{open_clip_dir}" if kind == "open_clip" else str(save_tiny_clip(tmp_path / "clip"))
    models = []
    for prob in (0.0, 0.5):
        torch.manual_seed(0)
        cfg = load_config(None, [f"model.init={init}", f"model.image.patch_dropout={prob}"])
        models.append(build_dual_encoder(cfg.model, 0, 16).image_tower)
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1], 16


@pytest.mark.parametrize("kind", ["torchvision", "clip", "open_clip"])
def test_training_sees_half_the_patches_and_evaluation_all_of_them(kind, tmp_path, open_clip_folder):  # noqa: F811
    plain, dropping, patches = vit_dual_encoders(kind, tmp_path, open_clip_folder)
    assert plain.state_dict().keys() == dropping.state_dict().keys()  # no parameters, no new names
    images = torch.rand(3, 3, 32, 32)
    plain.train(), dropping.train()
    assert tokens_into_the_first_block(plain, images) == 1 + patches
    assert tokens_into_the_first_block(dropping, images) == 1 + patches // 2
    dropping.eval(), plain.eval()
    assert tokens_into_the_first_block(dropping, images) == 1 + patches
    with torch.no_grad():
        torch.testing.assert_close(dropping(images), plain(images))


def test_a_tower_without_patches_is_refused_in_one_line():
    with pytest.raises(ValueError, match="model.image.patch_dropout needs a ViT image tower") as err:
        build_dual_encoder(load_config(None, ["model.image.patch_dropout=0.5"]).model, 50, 8)
    assert "\n" not in str(err.value)
