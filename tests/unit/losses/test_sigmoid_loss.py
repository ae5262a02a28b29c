"""The sigmoid loss (SigLIP): its definition against a one-pair-at-a-time loop and open_clip's
``SigLipLoss``; the loss class, dense and tiled, against the definition; its config and its
search space. On 1, 2 and 3 gloo workers, with the pool gathered (``local``, ``full``) or passed
round a ring (``ring``), dense, tiled, micro-batched, with a memory and in float32, it is held
against its definition by the loss matrix (test_loss_matrix.py)."""


import pytest
import torch
from reference_losses import reference_sigmoid
from torch import nn

from vcl_dist.config import ConfigError, load_config
from vcl_dist.losses import NegativeMemory, SigmoidLoss, build_loss
from vcl_dist.losses.definitions import sigmoid_loss

SCALE, BIAS = 3.0, -1.5


def random_batch(n: int, seed: int = 0, labelled: bool = True):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (n,), generator=g) if labelled else torch.full((n,), -1)
    if labelled:
        labels[::4] = -1
    groups = torch.arange(n) + 50
    groups[3] = groups[2]  # an image with two captions
    return image, text, labels, groups


def make_sigmoid(gather="local", chunk_size=None, memory=False):
    loss = SigmoidLoss(init_scale=SCALE, init_bias=BIAS, gather=gather, chunk_size=chunk_size,
                       memory=NegativeMemory(size=7) if memory else None)
    return loss.double()


def value_and_grads(fn, *tensors):
    value = fn(*tensors)
    grads = torch.autograd.grad(value, [t for t in tensors if t.requires_grad])
    return value.detach(), grads


def test_the_definition_is_the_pairwise_loop():
    image, text, labels, groups = random_batch(9)
    want = reference_sigmoid(image, text, labels, groups, SCALE, BIAS)
    got = sigmoid_loss(image, text, labels, groups, SCALE, BIAS)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_definition_is_open_clips_siglip_without_labels():
    from open_clip.loss import SigLipLoss

    image, text, labels, groups = random_batch(11, labelled=False)
    groups = torch.arange(11)  # one caption per image: open_clip knows no groups
    ours = sigmoid_loss(image, text, labels, groups, SCALE, BIAS)
    theirs = SigLipLoss()(nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1),
                          torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 12])
def test_the_loss_dense_and_tiled_is_the_definition(chunk_size):
    image, text, labels, groups = random_batch(12, seed=3)
    loss = make_sigmoid(chunk_size=chunk_size)
    scale, bias = loss.scale().item(), loss.logit_bias.item()  # SCALE, BIAS as float32 parameters hold them
    want = value_and_grads(lambda u, v: sigmoid_loss(u, v, labels, groups, scale, bias), image, text)
    got = value_and_grads(lambda u, v: loss(u, v, labels, groups), image, text)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # The scale's and the bias's gradients: against autograd through the definition.
    loss.zero_grad()
    loss(image, text, labels, groups).backward()
    log_scale = loss.logit_scale.detach().clone().requires_grad_()
    bias = loss.logit_bias.detach().clone().requires_grad_()
    sigmoid_loss(image.detach(), text.detach(), labels, groups, log_scale.exp(), bias).backward()
    torch.testing.assert_close(loss.logit_scale.grad, log_scale.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.logit_bias.grad, bias.grad, rtol=1e-10, atol=1e-12)


def test_the_loss_is_built_from_the_config_and_refuses_what_it_cannot_do(repo_root):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", ["loss.name=sigmoid", "loss.gather=ring",
                                                                "loss.init_scale=5", "loss.init_bias=-3"])
    loss = build_loss(cfg.loss)
    assert isinstance(loss, SigmoidLoss) and loss.gather == "ring"
    assert loss.scale().item() == pytest.approx(5) and loss.logit_bias.item() == -3
    assert set(loss.monitored()) == {"logit_scale", "logit_bias"}
    for overrides, message in [
        (["loss.name=infonce", "loss.gather=ring"], "loss.gather=ring"),
        (["loss.name=sigmoid", "loss.memory_size=64", "loss.memory_shard=true"], "replicated negative memory"),
        (["loss.name=sigmoid", "loss.gather=ring", "loss.memory_size=64"], "replicated negative memory"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(repo_root / "jobs/configs/default.yaml", overrides)
        assert "\n" not in str(err.value)


def test_a_search_can_tune_the_sigmoid_losss_scale_and_bias(repo_root):
    from vcl_dist.tune import check_tune_config
    from vcl_dist.tune.search import search_space

    cfg = load_config(repo_root / "jobs/configs/tune.yaml", [
        "loss.name=sigmoid",
        "tune.space[loss.init_bias]={type: uniform, low: -12, high: -4}",
        "tune.space[loss.init_scale]={type: loguniform, low: 3, high: 30}"])
    check_tune_config(cfg)
    assert {"loss.init_bias", "loss.init_scale"} <= set(search_space(cfg))
    with pytest.raises(ConfigError, match=r"tune.space\[loss.init_scale\]"):
        check_tune_config(load_config(repo_root / "jobs/configs/tune.yaml", [
            "loss.name=sigmoid", "tune.space[loss.init_scale]={type: uniform, low: -1, high: 3}"]))
