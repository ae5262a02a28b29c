"""Image towers by torchvision name, text towers from a config or a local from_pretrained folder."""

import pytest
import torch
from transformers import BertConfig, BertModel

from vcl_dist.config import ImageTowerConfig, ModelConfig, TextTowerConfig, load_config
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.image_tower import build_image_tower
from vcl_dist.models.text_tower import build_text_tower
from vcl_dist.train.run_inputs import build_tokenizer


@pytest.mark.parametrize("arch", ["small_resnet", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_image_towers_return_pooled_features(arch):
    tower = build_image_tower(ImageTowerConfig(arch=arch, width=8)).eval()
    features = tower(torch.randn(2, 3, 48, 48))
    assert features.shape == (2, tower.out_features)


def test_small_input_resnet_keeps_resolution_in_its_stem():
    tower = build_image_tower(ImageTowerConfig(arch="resnet18", small_input=True))
    assert tower.conv1.stride == (1, 1) and isinstance(tower.maxpool, torch.nn.Identity)


def test_unknown_torchvision_architecture_names_the_key():
    with pytest.raises(ValueError, match="model.image.arch"):
        build_image_tower(ImageTowerConfig(arch="no_such_net"))


def test_text_tower_and_tokenizer_load_from_a_local_folder(tmp_path, repo_root):
    tokenizer = train_wordpiece(["a red circle", "a blue square in the top left"] * 10, vocab_size=80)
    encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    encoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    cfg = load_config(repo_root / "jobs/configs/default.yaml", [f"model.text.pretrained={tmp_path}"])
    loaded_tokenizer = build_tokenizer(cfg, source=None)  # a pretrained tokenizer needs no captions
    assert loaded_tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    tower = build_text_tower(cfg.model.text, vocab_size=0, max_length=16)
    assert tower.out_features == 16
    saved = encoder.state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(tower.encoder.embeddings.word_embeddings.weight, saved)  # the weights, not a fresh init
    tokens = loaded_tokenizer(["a red circle", "a blue square"], padding=True, return_tensors="pt")
    assert tower(tokens["input_ids"], tokens["attention_mask"]).shape == (2, 16)


def test_dual_encoder_projects_both_towers_into_one_space():
    text = TextTowerConfig(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=1)
    cfg = ModelConfig(embed_dim=24, image=ImageTowerConfig(width=8), text=text)
    model = build_dual_encoder(cfg, vocab_size=50, max_text_length=12).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ids = torch.randint(5, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 6:] = 0
    u, v = model(images, ids, mask)
    assert u.shape == v.shape == (3, 24)
    # Padding beyond every caption's length changes nothing: the text is trimmed to it.
    ids_padded = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    mask_padded = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.encode_text(ids_padded, mask_padded), v)


@pytest.mark.parametrize("loss, similarity", [("triplet", "cosine"), ("infonce", "cosine"), ("vcrl", "squared_distance")])
def test_the_similarity_a_model_ranks_by_is_part_of_the_model_and_its_export(loss, similarity, tmp_path):
    """Downstream code asks the model how to rank, not the losses package."""
    import json

    from safetensors import safe_open

    from vcl_dist.config import dump_config
    from vcl_dist.models.export import export_model
    from vcl_dist.retrieval import load_model

    cfg = load_config(None, [f"loss.name={loss}", "model.embed_dim=8", "model.image.width=4", "model.text.hidden_size=16",
                             "model.text.intermediate_size=32", "model.text.num_heads=2", "model.text.num_layers=1"])
    assert cfg.similarity == similarity
    tokenizer = train_wordpiece(["a red circle", "a blue square"] * 10, vocab_size=60)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, similarity=cfg.similarity)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save(model.state_dict(), checkpoint / "model.pt")
    (checkpoint / "config.yaml").write_text(dump_config(cfg))
    (checkpoint / "history.json").write_text(json.dumps([]))
    tokenizer.save_pretrained(str(checkpoint / "tokenizer"))
    export = export_model(checkpoint, tmp_path / "model")
    with safe_open(str(export / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata()["similarity"] == similarity
    loaded = load_model(export)
    assert loaded.model.similarity == similarity and loaded.normalized == (similarity == "cosine")
    # A PIL image is seen as the same file would be: transparency on white.
    from hostile_inputs import rgba_png
    from PIL import Image as PILImage

    picture = PILImage.open(__import__("io").BytesIO(rgba_png()))
    assert picture.mode == "RGBA"
    assert torch.equal(loaded.encode_images([picture]), loaded.encode_images([rgba_png()]))
