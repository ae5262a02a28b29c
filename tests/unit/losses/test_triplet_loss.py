"""The vectorised triplet loss equals the plain loop definition, in value and gradient."""

import pytest
import torch
from reference_losses import reference_triplet

from vcl_dist.losses import TripletLoss
from vcl_dist.losses.negatives import NEGATIVE_SELECTION


def random_batch(n=12, d=6, seed=0, num_labels=4, unlabeled=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    labels[:unlabeled] = -1
    groups = torch.arange(n)
    groups[1] = groups[0]  # two captions of one image
    return image, text, labels, groups


@pytest.mark.parametrize("negatives", sorted(NEGATIVE_SELECTION))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(negatives, normalize, seed):
    image, text, labels, groups = random_batch(seed=seed)
    margin = 0.7 if normalize else 4.0  # large enough that many hinges are active
    got = TripletLoss(margin, negatives, normalize)(image, text, labels, groups)
    want = reference_triplet(image, text, labels, groups, margin, negatives, normalize)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    got_grads = torch.autograd.grad(got, (image, text))
    want_grads = torch.autograd.grad(want, (image, text))
    for g, w in zip(got_grads, want_grads):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_same_label_and_same_image_are_never_negatives():
    # Two items of one label, far apart from everything else: no negative is violated.
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    text = image.clone()
    labels = torch.tensor([5, 5, 7])
    groups = torch.arange(3)
    loss = TripletLoss(margin=0.5, negatives="hardest")(image, text, labels, groups)
    unlabeled = TripletLoss(margin=0.5, negatives="hardest")(image, text, torch.full((3,), -1), groups)
    assert loss.item() == pytest.approx(0.0)
    assert unlabeled.item() > 0  # without labels, item 1 is a violating negative of item 0


def test_semi_hard_falls_back_to_hardest_when_no_negative_is_farther():
    d_ap = torch.tensor([2.0, 0.1], dtype=torch.float64)
    d_an = torch.tensor([[0.5, 1.0], [0.05, 0.3]], dtype=torch.float64)
    valid = torch.ones(2, 2, dtype=torch.bool)
    losses = NEGATIVE_SELECTION["semi_hard"](d_ap, d_an, valid, 0.2)
    # The same in the transposed layout (pool along dim 0).
    torch.testing.assert_close(NEGATIVE_SELECTION["semi_hard"](d_ap, d_an.T, valid, 0.2, pool_dim=0), losses)
    # Anchor 0: nothing farther than 2.0 -> hardest (0.5). Anchor 1: closest farther is 0.3.
    torch.testing.assert_close(losses, torch.tensor([2.0 - 0.5 + 0.2, 0.0], dtype=torch.float64))


def test_anchor_without_negatives_contributes_zero():
    image, text, _, groups = random_batch(n=4)
    labels = torch.zeros(4, dtype=torch.long)  # everything one class: no negatives at all
    for negatives in NEGATIVE_SELECTION:
        loss = TripletLoss(0.2, negatives)(image, text, labels, groups)
        assert loss.item() == 0.0 and torch.isfinite(loss)
