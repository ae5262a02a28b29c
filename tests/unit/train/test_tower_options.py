"""``train.compile``, ``train.channels_last`` and ``train.activation_checkpointing``: the same
training step, other kernels, strides or memory."""

import pytest
import torch

from vcl_dist.config import Config, ConfigError, LossConfig, ModelConfig, TrainConfig, load_config
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.train.schedule import build_scheduler
from vcl_dist.train.step import train_step
from vcl_dist.train.tower_options import prepare_towers


def setup(train: TrainConfig):
    torch.manual_seed(0)
    # Width 8 at 32 px: inductor's CPU code for a 4-channel ResNet at 16 px corrupts the heap
    # with one intra-op thread (torch 2.14; pytorch/pytorch#181618-like), wider towers do not.
    model = build_dual_encoder(ModelConfig(embed_dim=8, image={"width": 8}, text={"hidden_size": 16, "intermediate_size": 32,
                                                                                  "num_heads": 2, "num_layers": 1}), 50, 10)
    done = prepare_towers(model, train)
    criterion = build_loss(LossConfig(name="triplet"))
    # SGD: its update is proportional to the gradient, so weights compare to the gradients'
    # rounding (AdamW's first update is lr·sign(g): a gradient near 0 can flip it).
    optimizer = torch.optim.SGD([*model.parameters(), *criterion.parameters()], lr=0.5)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(5, 50, (6, 10), generator=g), "attention_mask": torch.ones(6, 10, dtype=torch.long),
             "label": torch.arange(6), "group": torch.arange(6)}
    return model, criterion, optimizer, build_scheduler(optimizer, 0, 10, 0.1), batch, done


def two_steps(train: TrainConfig):
    model, criterion, optimizer, scheduler, batch, done = setup(train)
    losses = [train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0,
                         channels_last=train.channels_last) for _ in range(2)]
    return losses, model, done


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True, "channels_last": True},
                                     {"activation_checkpointing": True}],
                         ids=["channels_last", "compiled_channels_last", "activation_checkpointing"])
def test_the_options_train_as_the_plain_towers(options):
    want_losses, want_model, _ = two_steps(TrainConfig())
    losses, model, done = two_steps(TrainConfig(**options))
    assert losses == pytest.approx(want_losses, rel=1e-6 if options.get("activation_checkpointing") else 1e-5)
    want = want_model.state_dict()
    state = model.state_dict()
    assert list(state) == list(want)  # compiled in place: no "_orig_mod." in checkpoints
    for name, value in state.items():
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-6, msg=name)
    if options.get("channels_last"):
        assert model.image_tower.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert "channels-last image tower" in done
    if options.get("compile"):
        assert "torch.compile (mode default) of image_tower, text_tower" in done
        assert model.image_tower._compiled_call_impl is not None and model.text_tower._compiled_call_impl is not None
    if options.get("activation_checkpointing"):  # 4 ResNet stages, 1 BERT layer; their BatchNorm statistics above
        assert "activations of 5 blocks recomputed in the backward pass" in done


def test_a_compile_mode_is_checked_when_the_config_loads(tmp_path):
    assert Config.model_validate({"train": {"compile": "max-autotune"}}).train.compile == "max-autotune"
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  compile: fastest\n")
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(str(path))


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=fsdp", "train.compile=true"], "train.strategy=fsdp does not combine with train.compile"),
    (["train.strategy=zero3"], "train.strategy"),
    (["train.strategy=fsdp", "train.keep_global_batch=true"], "train.keep_global_batch with train.strategy=fsdp"),
    (["model.image.patch_dropout=0.95"], "model.image.patch_dropout"),
])
def test_sharding_and_patch_dropout_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
