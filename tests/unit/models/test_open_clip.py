"""An OpenCLIP model carried over faithfully: its towers, BPE tokenizer, preprocessing and logit scale."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from test_pretrained import CLASSES, random_pictures

from vcl_dist.config import dump_config, load_config
from vcl_dist.data.images import ImageGeometry
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.evaluate import class_prompt_embeddings, zero_shot_accuracy
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.export import export_model, read_model_folder
from vcl_dist.models.pretrained import adopt_pretrained_settings
from vcl_dist.train.checkpoint import save_checkpoint
from vcl_dist.train.run_inputs import build_tokenizer
from vcl_dist.train.schedule import build_optimizer, build_scheduler

open_clip = pytest.importorskip("open_clip")
TEMPLATES = ["a photo of a {}.", "an illustration of the {}"]


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A tiny randomly initialised OpenCLIP ViT saved as OpenCLIP's hub repositories hold one."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open-clip")
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}},
              "preprocess_cfg": {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "interpolation": "bicubic",
                                 "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_an_open_clip_model_is_carried_over_faithfully(open_clip_folder, tmp_path):
    init = f"open_clip:local-dir:{open_clip_folder}"
    cfg = adopt_pretrained_settings(load_config(None, [f"model.init={init}", "loss.name=infonce", "data.max_text_length=77"]),
                                    log=lambda line: None)
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.resize_side, cfg.data.interpolation, cfg.data.crop_offset) == (
        32, "shorter_side", 32, "bicubic", "round")
    assert cfg.model.embed_dim == 16 and cfg.model.image.mean == pytest.approx([0.5, 0.4, 0.3])
    tokenizer = build_tokenizer(cfg, None)
    theirs = open_clip.get_tokenizer(f"local-dir:{open_clip_folder}")
    prompts = [t.format(c) for t in TEMPLATES for c in CLASSES] + ["Two DOGS, don't they? 3 cats & 1,000 birds!"]
    ours = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    reference_tokens = theirs(prompts)
    for row in range(len(prompts)):  # the same ids up to the end token (OpenCLIP pads with 0, we with the end token)
        length = int(ours["attention_mask"][row].sum())
        assert ours["input_ids"][row, :length].tolist() == reference_tokens[row, :length].tolist()

    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id, cfg.similarity).eval()
    original, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_folder}")
    original.eval()
    assert float(model.logit_scale) == pytest.approx(float(original.logit_scale.detach()))
    pictures = random_pictures(12, seed=2)
    rows = Preprocessor(tokenizer, ImageGeometry.of(cfg.data), 77, augment=False)(
        {"key": [str(i) for i in range(12)], "image": pictures, "caption": ["x"] * 12, "label": [i % 4 for i in range(12)]})
    reference_pixels = torch.stack([preprocess(Image.open(io.BytesIO(p)).convert("RGB")) for p in pictures])
    normalised = (torch.from_numpy(rows["image"]).float() / 255 - model.image_mean) / model.image_std
    assert torch.allclose(normalised, reference_pixels, atol=1e-5)
    with torch.no_grad():
        image_emb = model.encode_image(torch.from_numpy(rows["image"]))
        reference_images = original.encode_image(reference_pixels)
        assert torch.allclose(image_emb, reference_images, atol=1e-5)
        ours_text = model.encode_text(ours["input_ids"], ours["attention_mask"])
        assert torch.allclose(ours_text, original.encode_text(reference_tokens), atol=1e-5)
        ensemble = class_prompt_embeddings(model, tokenizer, CLASSES, TEMPLATES, torch.device("cpu"), 77)
        reference_classes = torch.stack([torch.nn.functional.normalize(original.encode_text(theirs([t.format(c) for c in CLASSES])),
                                                                       dim=-1) for t in TEMPLATES]).mean(0)
        reference_classes = torch.nn.functional.normalize(reference_classes, dim=-1)
        assert torch.allclose(ensemble.float(), reference_classes, atol=1e-5)
    labels = torch.tensor([i % 4 for i in range(12)])
    accuracy = zero_shot_accuracy(model, tokenizer, CLASSES, TEMPLATES, {"image": image_emb, "label": labels,
                                                                          "group": torch.arange(12)}, torch.device("cpu"), 77)
    reference = ((torch.nn.functional.normalize(reference_images, dim=-1) @ reference_classes.T).argmax(1) == labels)
    assert accuracy == reference.double().mean().item()

    # Saved and loaded back from the model folder alone (its structure from towers.json).
    criterion = build_loss(cfg.loss)
    optimizer = build_optimizer([model, criterion], 1e-3, 0.0)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, model=model, criterion=criterion, optimizer=optimizer, scheduler=build_scheduler(optimizer, 0, 4, 0.1),
                    epoch=0, step=1, history=[], config_yaml=dump_config(cfg), tokenizer=tokenizer)
    moved = open_clip_folder.rename(open_clip_folder.with_name("moved-away"))
    try:
        reloaded = read_model_folder(export_model(checkpoint, tmp_path / "model")).model.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded.encode_image(torch.from_numpy(rows["image"])), image_emb, atol=1e-6)
            assert torch.allclose(reloaded.encode_text(ours["input_ids"], ours["attention_mask"]), ours_text, atol=1e-6)
    finally:
        moved.rename(open_clip_folder)
