"""Pretrained towers: a CLIPModel carried over faithfully (towers, tokenizer, preprocessing,
logit scale), separate pretrained towers from local files, locking (LiT), prompt ensembles and
the exports others load."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pretrained_models import save_tiny_clip, save_tiny_sentence_encoder

from vcl_dist.config import ConfigError, load_config
from vcl_dist.data.images import ImageGeometry
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.evaluate import class_prompt_embeddings, zero_shot_accuracy
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.locking import layer_groups
from vcl_dist.models.pretrained import adopt_pretrained_settings
from vcl_dist.train.run_inputs import build_tokenizer

CLASSES = ["circle", "square", "triangle", "star"]
TEMPLATES = ["a photo of a {}", "a drawing of the {}.", "an illustration of a {}"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


def random_pictures(count: int, seed: int = 0) -> list[bytes]:
    """PNGs of several shapes and sizes (wide, tall, square; larger and smaller than the crop)."""
    rng = np.random.default_rng(seed)
    sizes = [(50, 40), (40, 64), (36, 36), (90, 70), (33, 80), (128, 96)]
    out = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def clip_run_config(folder, *overrides):
    # 40: the tiny tokenizer spells most words letter by letter; no prompt may be cut short.
    cfg = load_config(None, [f"model.init={folder}", "data.max_text_length=40", *overrides])
    lines = []
    return adopt_pretrained_settings(cfg, log=lines.append), lines


def test_a_clip_model_is_carried_over_faithfully_and_zero_shot_equals_the_original(clip_folder):
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg, lines = clip_run_config(clip_folder, "loss.name=infonce")
    # The model's preprocessing and sizes replace the config's, and the run says so.
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.resize_side, cfg.data.interpolation) == (32, "shorter_side", 36, "bicubic")
    assert cfg.model.embed_dim == 16 and cfg.model.image.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert len(lines) == 1 and "data.resize_side=36" in lines[0] and "model.embed_dim=16" in lines[0]
    tokenizer = build_tokenizer(cfg, None)
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id,
                               cfg.similarity).eval()
    original = CLIPModel.from_pretrained(clip_folder).eval()
    assert float(model.logit_scale) == pytest.approx(3.0)

    pictures = random_pictures(12)
    labels = [i % len(CLASSES) for i in range(12)]
    rows = Preprocessor(tokenizer, ImageGeometry.of(cfg.data), cfg.data.max_text_length, augment=False)(
        {"key": [str(i) for i in range(12)], "image": pictures, "caption": ["a photo"] * 12, "label": labels})
    reference_pixels = CLIPImageProcessorPil.from_pretrained(clip_folder)(
        images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pictures], return_tensors="pt")["pixel_values"]
    ours = torch.from_numpy(rows["image"])
    normalised = (ours.float() / 255 - model.image_mean) / model.image_std
    assert normalised.shape == reference_pixels.shape == (12, 3, 32, 32)
    assert torch.allclose(normalised, reference_pixels, atol=1e-5)  # the same pixels, to float rounding

    with torch.no_grad():
        image_emb = model.encode_image(ours)
        reference_images = original.get_image_features(pixel_values=reference_pixels).pooler_output
        assert torch.allclose(image_emb, reference_images, atol=1e-5)
        ensemble = class_prompt_embeddings(model, tokenizer, CLASSES, TEMPLATES, torch.device("cpu"), cfg.data.max_text_length)
        reference_prompts = []
        for template in TEMPLATES:
            tokens = tokenizer([template.format(c) for c in CLASSES], padding=True, return_tensors="pt")
            reference_prompts.append(torch.nn.functional.normalize(original.get_text_features(**tokens).pooler_output, dim=-1))
        reference_classes = torch.nn.functional.normalize(torch.stack(reference_prompts).mean(0), dim=-1)
        assert torch.allclose(ensemble.float(), reference_classes, atol=1e-5)

    embeddings = {"image": image_emb, "label": torch.tensor(labels), "group": torch.arange(12)}
    ours_accuracy = zero_shot_accuracy(model, tokenizer, CLASSES, TEMPLATES, embeddings, torch.device("cpu"),
                                       cfg.data.max_text_length)
    reference_logits = torch.nn.functional.normalize(reference_images, dim=-1) @ reference_classes.T
    reference_accuracy = (reference_logits.argmax(1) == torch.tensor(labels)).double().mean().item()
    assert ours_accuracy == reference_accuracy


def test_model_init_that_is_no_clip_model_is_one_line(tmp_path):
    folder = save_tiny_sentence_encoder(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"model.init: .* is a 'bert' model, not a CLIPModel"):
        adopt_pretrained_settings(load_config(None, [f"model.init={folder}"]))
    with pytest.raises(ConfigError, match=r"model.init: cannot load"):
        adopt_pretrained_settings(load_config(None, [f"model.init={tmp_path / 'nothing-here'}"]))
    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(ConfigError, match=r"data.max_text_length \(64\) is longer than model.init's text tower reads \(40"):
        adopt_pretrained_settings(load_config(None, [f"model.init={clip}", "data.max_text_length=64"]))


def test_a_sentence_transformers_text_tower_pools_as_its_folder_says(tmp_path):
    folder = save_tiny_sentence_encoder(tmp_path / "st", pooling="cls")
    cfg = adopt_pretrained_settings(load_config(None, [f"model.text.pretrained={folder}", "model.embed_dim=8"]))
    assert cfg.model.text.pooling == "cls"
    tokenizer = build_tokenizer(cfg, None)
    model = build_dual_encoder(cfg.model, len(tokenizer), 16).eval()
    tokens = tokenizer(["a red circle", "a photo of a blue square"], padding=True, return_tensors="pt")
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        first_token = encoder(**tokens).last_hidden_state[:, 0]
        assert torch.allclose(model.text_tower(tokens["input_ids"], tokens["attention_mask"]), first_token, atol=1e-6)
    mean_folder = save_tiny_sentence_encoder(tmp_path / "st-mean", pooling="mean")
    assert adopt_pretrained_settings(load_config(None, [f"model.text.pretrained={mean_folder}"])).model.text.pooling == "mean"
    # Said in the config, the pooling is the config's.
    assert adopt_pretrained_settings(load_config(None, [f"model.text.pretrained={folder}",
                                                        "model.text.pooling=mean"])).model.text.pooling == "mean"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", "folder"])
def test_image_backbone_weights_load_from_a_local_file_or_folder(tmp_path, suffix):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=7)  # another head: it is dropped anyway
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        path = tmp_path / "weights.pth"
        torch.save({"state_dict": state}, path)  # a training checkpoint's nesting is unwrapped
    elif suffix == ".safetensors":
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "backbone"
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
    cfg = load_config(None, ["model.image.arch=resnet18", "model.image.small_input=false", f"model.image.weights={path}"])
    model = build_dual_encoder(cfg.model, 100, 16)
    tower = model.image_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in state.items() if not k.startswith("fc."))
    # The structure alone, for a saved model whose own weights come next: nothing is read.
    path.rename(tmp_path / "gone")
    build_dual_encoder(cfg.model, 100, 16, saved_towers={})


def test_image_weights_that_do_not_fit_are_one_line(tmp_path):
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    cfg = load_config(None, ["model.image.arch=resnet18", "model.image.small_input=false", f"model.image.weights={path}"])
    with pytest.raises(ValueError, match=r"model.image.weights: .*resnet34.pth does not fit ResNet \(\d+ keys differ"):
        build_dual_encoder(cfg.model, 100, 16)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    cfg = load_config(None, ["model.image.arch=resnet18", f"model.image.weights={tmp_path / 'junk.pth'}"])
    with pytest.raises(ValueError, match=r"model.image.weights: cannot read"):
        build_dual_encoder(cfg.model, 100, 16)


def test_a_timm_backbone_with_local_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    cfg = load_config(None, ["model.image.arch=timm:resnet10t", f"model.image.weights={tmp_path / 'resnet10t.pth'}"])
    model = build_dual_encoder(cfg.model, 100, 16).eval()
    source.reset_classifier(0)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.image_tower(pixels), source.eval()(pixels))
    assert model.image_projection.in_features == source.num_features
    groups = layer_groups(model.image_tower)
    assert len(groups) >= 5 and any("stages.3" in name or "layer4" in name for name in groups[-1])


def test_layer_groups_follow_the_input_from_stem_to_head(clip_folder):
    import torchvision

    from vcl_dist.models.clip_towers import clip_parts
    from vcl_dist.models.image_tower import SmallResNet

    parts = clip_parts(str(clip_folder))
    vision = layer_groups(parts.image_tower)
    # embeddings + pre-norm, the 2 transformer layers, the post-norm
    assert len(vision) == 4 and vision[0][0].startswith("vision_model.embeddings")
    assert all(name.startswith("vision_model.encoder.layers.1.") for name in vision[2])
    assert vision[3] == ["vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"]
    assert len(layer_groups(parts.text_tower)) == 4
    assert [g[0].split(".")[0] for g in layer_groups(SmallResNet(8, (1, 1)))] == ["stem", "stages", "stages"]
    resnet = layer_groups(torchvision.models.resnet18())
    assert len(resnet) == 6 and resnet[0][0] == "conv1.weight" and resnet[-1][-1].startswith("fc.")


def small_lit_model(**locks):
    overrides = ["model.embed_dim=8", "model.image.width=8", "model.image.blocks=[1,1]", "model.text.hidden_size=16",
                 "model.text.intermediate_size=32", "model.text.num_heads=2", "model.text.num_layers=2"]
    cfg = load_config(None, overrides + [f"model.{k.replace('_', '.', 1)}={v}" for k, v in locks.items()])
    torch.manual_seed(0)
    return build_dual_encoder(cfg.model, 60, 12)


def test_locked_towers_stay_bit_identical_through_training_and_are_left_out_of_the_optimizer():
    from vcl_dist.losses import build_loss
    from vcl_dist.train.schedule import build_optimizer, build_scheduler
    from vcl_dist.train.step import train_step

    model = small_lit_model(text_lock="true", image_lock="true", image_unlocked_groups=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text_names = {f"text_tower.{n}" for n, _ in model.text_tower.named_parameters()}
    last_stage = {f"image_tower.{n}" for n in layer_groups(model.image_tower)[-1]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == last_stage | {"image_projection.weight", "text_projection.weight"}
    criterion = build_loss(load_config(None, []).loss)
    optimizer = build_optimizer([model, criterion], 0.05, 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    scheduler = build_scheduler(optimizer, 0, 10, 0.1)
    model.train()
    assert not model.text_tower.training and not model.image_tower.stem.training  # locked: eval (batch norm, dropout)
    assert model.image_tower.stages[1].training
    rng = torch.Generator().manual_seed(1)
    for _ in range(4):
        batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=rng),
                 "input_ids": torch.randint(5, 60, (8, 12), generator=rng), "attention_mask": torch.ones(8, 12, dtype=torch.long),
                 "label": torch.full((8,), -1), "group": torch.arange(8), "valid": torch.ones(8, dtype=torch.uint8)}
        train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    after = model.state_dict()
    for name, value in before.items():
        moved = not torch.equal(value, after[name])
        # Parameters and buffers (batch-norm statistics) of the locked parts do not move; the trained ones do.
        statistics = name.startswith("image_tower.stages.1.") and ("running" in name or "num_batches" in name)
        assert moved == (name in trainable or statistics), name
    assert text_names.isdisjoint(trainable)


def test_unlocking_every_group_is_refused():
    with pytest.raises(ValueError, match=r"unlocked_groups=9 leaves nothing locked: the tower has \d layer groups"):
        small_lit_model(text_lock="true", text_unlocked_groups=9)


def test_prompt_templates_config():
    cfg = load_config(None, ["eval.prompt_templates=imagenet"])
    assert len(cfg.eval.templates) == 80 and "a photo of a {}." in cfg.eval.templates
    assert load_config(None, []).eval.templates == ["a photo of a {}"]
    assert load_config(None, ["eval.prompt_templates=['a {} drawn','a picture showing a {}']"]).eval.templates == [
        "a {} drawn", "a picture showing a {}"]
    with pytest.raises(ConfigError, match=r"eval.prompt_templates: 'a drawing' has no '\{\}'"):
        load_config(None, ["eval.prompt_templates=['a {} drawn','a drawing']"])
    with pytest.raises(ConfigError, match="eval.prompt_templates must not be empty"):
        load_config(None, ["eval.prompt_templates=[]"])
    # A second or a named slot would fail at the first evaluation, after an epoch of training: refused here.
    for bad in ("eval.prompt_templates=['a {} and {}']", "eval.prompt_template='a {} of {name}'"):
        with pytest.raises(ConfigError, match=r"must take exactly one '\{\}'"):
            load_config(None, [bad])


def test_an_export_of_a_fine_tuned_clip_loads_in_transformers_with_equal_embeddings(clip_folder, tmp_path):
    import shutil

    from transformers import CLIPModel, CLIPProcessor

    from vcl_dist.config import dump_config
    from vcl_dist.losses import build_loss
    from vcl_dist.models.export import export_model, read_model_folder
    from vcl_dist.train.checkpoint import save_checkpoint
    from vcl_dist.train.schedule import build_optimizer, build_scheduler

    own = save_tiny_clip(tmp_path / "clip-copy")  # removed below: the export must not need it
    cfg, _ = clip_run_config(own, "loss.name=infonce", "model.image.lock=true")
    tokenizer = build_tokenizer(cfg, None)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id, cfg.similarity)
    criterion = build_loss(cfg.loss)
    criterion.logit_scale.data.fill_(2.5)  # as if trained
    with torch.no_grad():  # as if fine-tuned
        for param in [*model.text_tower.parameters(), model.text_projection.weight]:
            param.add_(0.01 * torch.randn_like(param))
    optimizer = build_optimizer([model, criterion], 1e-3, 0.0)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, model=model, criterion=criterion, optimizer=optimizer,
                    scheduler=build_scheduler(optimizer, 0, 4, 0.1), epoch=0, step=1,
                    history=[{"epoch": 1, "val_rsum": 1.5, "val_zero_shot_acc": 0.25}], config_yaml=dump_config(cfg),
                    tokenizer=tokenizer, class_names=CLASSES)
    shutil.rmtree(own)
    out = export_model(checkpoint, tmp_path / "model")
    hub = json.loads((out / "config.json").read_text())
    assert hub["embed_dim"] == 16 and hub["init"] == str(own) and hub["image_preprocessing"]["resize_side"] == 36
    card = (out / "README.md").read_text()
    assert "library_name: vcl-dist" in card and "| val_rsum | 1.5000 |" in card and "loss:\n  name: infonce" in card

    # What Ray ships to embedding actors: the model's own files, not the clip/ copy of its weights; enough to load it.
    from vcl_dist.models.locate import folder_of_files, model_files

    files = model_files(out)
    assert "towers.json" in files and not any(name.startswith("clip/") for name in files)
    with folder_of_files(files) as shipped:
        assert read_model_folder(shipped).model.tower_configs.keys() == {"clip"}

    exported = CLIPModel.from_pretrained(out / "clip").eval()
    processor = CLIPProcessor.from_pretrained(out / "clip")
    assert float(exported.logit_scale.detach()) == pytest.approx(2.5)
    reloaded = read_model_folder(out).model.eval()
    pictures = [Image.open(io.BytesIO(p)).convert("RGB") for p in random_pictures(4, seed=5)]
    inputs = processor(text=["a red circle", "a photo of a square"], images=pictures, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(exported.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
                              reloaded.image_tower.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
                              @ reloaded.image_projection.weight.T, atol=1e-5)
        theirs = exported.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        assert torch.allclose(theirs, model.eval().encode_text(inputs["input_ids"], inputs["attention_mask"]), atol=1e-5)
        assert torch.allclose(theirs, reloaded.encode_text(inputs["input_ids"], inputs["attention_mask"]), atol=1e-5)
