"""Slow end-to-end training runs on a local Ray: InfoNCE with full gather, the sigmoid loss round
a ring, a CLIP model fine-tuned with its image tower locked and exported back to transformers,
locked towers' features computed once. (A SIGKILLed worker and other faults: test_chaos_soak.)"""

from pathlib import Path

import pytest
import torch
import yaml

from vcl_dist.config import load_config
from vcl_dist.train.runner import run_training


@pytest.mark.e2e
def test_infonce_with_full_gather_trains(local_ray, tiny_shapes_overrides, repo_root, tmp_path, capsys):
    cfg = load_config(
        repo_root / "jobs/configs/default.yaml",
        [*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "run.name=infonce", "train.epochs=2",
         "loss.name=infonce", "loss.gather=full", "train.channels_last=true"],
    )
    outcome = run_training(cfg)
    assert "channels-last image tower" in capsys.readouterr().out  # the workers' towers (tests/unit/train/test_tower_options.py)
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    logit_scale = torch.load(Path(outcome.checkpoint_path) / "loss.pt", weights_only=True)["logit_scale"]
    assert logit_scale.item() != pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())  # it was trained


@pytest.mark.e2e
def test_the_sigmoid_loss_trains_with_its_captions_passed_round_a_ring(local_ray, tiny_shapes_overrides, repo_root,
                                                                         tmp_path, capsys):
    cfg = load_config(
        repo_root / "jobs/configs/default.yaml",
        [*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "run.name=sigmoid", "train.epochs=3",
         "loss.name=sigmoid", "loss.gather=ring", "loss.chunk_size=16"],
    )
    outcome = run_training(cfg)
    assert "captions passed round a ring of workers" in capsys.readouterr().out
    history = outcome.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_rsum"] > history[0]["val_rsum"]
    state = torch.load(Path(outcome.checkpoint_path) / "loss.pt", weights_only=True)
    assert state["logit_bias"].item() != -10.0  # the bias was trained (its gradient came back round the ring)


# Faithful carry-over, locking and the export are proven on the CPU in test_pretrained; this real run (2 DDP workers
# through Ray Train) is an e2e check.
@pytest.mark.e2e
def test_a_clip_model_fine_tunes_with_its_image_tower_locked_and_exports_back_to_transformers(local_ray, tiny_shapes_overrides,
                                                                                               repo_root, tmp_path):
    from pretrained_models import save_tiny_clip
    from transformers import CLIPModel

    folder = save_tiny_clip(tmp_path / "tiny-clip", image_size=32, resize_side=36)
    cfg = load_config(repo_root / "jobs/configs/default.yaml",
                      [*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "run.name=clip", "train.epochs=2",
                       f"model.init={folder}", "model.image.lock=true", "data.max_text_length=40", "loss.name=infonce",
                       "train.lr=0.001"])
    outcome = run_training(cfg)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in outcome.history)
    original = CLIPModel.from_pretrained(folder)
    exported = CLIPModel.from_pretrained(Path(outcome.run_path) / "model" / "clip")
    # The locked tower, through DDP and two epochs of steps: bit-identical. The rest trained.
    for name, value in original.vision_model.state_dict().items():
        assert torch.equal(value, exported.vision_model.state_dict()[name]), name
    assert not torch.equal(original.text_projection.weight, exported.text_projection.weight)
    assert not torch.equal(original.text_model.embeddings.token_embedding.weight,
                           exported.text_model.embeddings.token_embedding.weight)
    trained_scale = torch.load(Path(outcome.checkpoint_path) / "loss.pt", weights_only=True)["logit_scale"]
    assert float(exported.logit_scale.detach()) == pytest.approx(float(trained_scale)) and float(trained_scale) != pytest.approx(3.0)
    config = yaml.safe_load((Path(outcome.run_path) / "model" / "config.yaml").read_text())
    assert config["data"]["resize"] == "shorter_side" and config["model"]["embed_dim"] == 16


@pytest.mark.e2e
def test_locked_towers_features_are_computed_once_and_train_as_the_towers_would(local_ray, tiny_shapes_overrides,
                                                                                        repo_root, tmp_path, capsys):
    features = tmp_path / "features"
    # Both towers locked: only the projections train, on features read back for both.
    overrides = [*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "train.epochs=2", "model.image.lock=true",
                 "model.text.lock=true", "data.augment=false", f"data.features_path={features}"]
    cached = run_training(load_config(repo_root / "jobs/configs/default.yaml", [*overrides, "run.name=cached"]))
    out = capsys.readouterr().out
    assert "computed the locked image tower's and text tower's features of 512 rows once" in out
    folders = [p for p in features.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "_complete.json").is_file()
    every_step = run_training(load_config(repo_root / "jobs/configs/default.yaml",
                                          [*overrides, "run.name=every-step", "train.cache_locked_features=false"]))
    # The same steps: the tower's outputs read back, or the tower run on the same pixels every step.
    for read, ran in zip(cached.history, every_step.history):
        assert read["step_losses"] == pytest.approx(ran["step_losses"], abs=1e-5)
    assert cached.history[-1]["val_rsum"] == pytest.approx(every_step.history[-1]["val_rsum"], abs=1e-6)
    again = run_training(load_config(repo_root / "jobs/configs/default.yaml", [*overrides, "run.name=again",
                                                                               "train.epochs=1"]))
    assert "features of " in capsys.readouterr().out and len(again.history) == 1  # found, not computed again
    assert [p for p in features.iterdir() if p.is_dir()] == folders
