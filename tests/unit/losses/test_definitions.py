"""The fast, distributed-ready losses equal the short dense definitions of losses/definitions.py,
and the definitions equal the one-anchor-at-a-time loops, with and without a negative memory:
values and gradients, float64."""

import pytest
import torch
from reference_losses import reference_infonce, reference_sigmoid, reference_triplet, reference_vcrl
from test_losses import MODES, assert_same_value_and_grads, random_batch

from vcl_dist.losses import InfoNCELoss, TripletLoss, VCRLLoss
from vcl_dist.losses.definitions import infonce_loss, sigmoid_loss, triplet_loss, vcrl_loss


@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_equals_its_definition(negatives, normalize, seed):
    image, text, labels, groups = random_batch(n=12, seed=seed)
    margin = 0.5 if normalize else 3.0
    want = triplet_loss(image, text, labels, groups, margin, negatives, normalize)
    got = TripletLoss(margin, negatives, normalize=normalize)(image, text, labels, groups)
    assert_same_value_and_grads(got, want, (image, text))
    torch.testing.assert_close(want, reference_triplet(image, text, labels, groups, margin, negatives, normalize))


@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("label_tower", [False, True])
def test_vcrl_equals_its_definition(negatives, label_tower):
    image, text, labels, groups = random_batch(n=12, seed=3)
    loss = VCRLLoss(margin=3.0, reg_lambda=0.05, negatives=negatives, num_classes=3 if label_tower else None, embed_dim=5,
                    label_weight=0.7).double()
    classes = loss.class_embeddings if label_tower else None
    want = vcrl_loss(image, text, labels, groups, 3.0, 0.05, negatives, classes, 0.7)
    inputs = (image, text, classes) if label_tower else (image, text)
    assert_same_value_and_grads(loss(image, text, labels, groups), want, inputs)
    torch.testing.assert_close(want, reference_vcrl(image, text, labels, groups, 3.0, 0.05, negatives, classes, 0.7))


@pytest.mark.parametrize("seed", [0, 1])
def test_infonce_equals_its_definition(seed):
    image, text, labels, groups = random_batch(n=12, seed=seed)
    loss = InfoNCELoss(init_temperature=0.1).double()
    scale = loss.logit_scale.exp()
    want = infonce_loss(image, text, labels, groups, scale)
    assert_same_value_and_grads(loss(image, text, labels, groups), want, (image, text))
    torch.testing.assert_close(want, reference_infonce(image, text, labels, groups, scale))


def memory_rows(seed: int, batch_groups: torch.Tensor):
    """Seven past rows: labelled and not, one a caption of an image in the batch."""
    image, text, labels, groups = random_batch(n=7, seed=seed)
    groups = groups + 1000
    groups[4] = batch_groups[5]
    return image.detach(), text.detach(), labels, groups


DEFINITIONS = {
    "triplet": (lambda *batch, memory=None: triplet_loss(*batch, 0.5, "semi_hard", memory=memory),
                lambda *batch, memory=None: reference_triplet(*batch, 0.5, "semi_hard", memory=memory)),
    "triplet-raw-all": (lambda *batch, memory=None: triplet_loss(*batch, 3.0, "all", normalize=False, memory=memory),
                        lambda *batch, memory=None: reference_triplet(*batch, 3.0, "all", normalize=False, memory=memory)),
    "vcrl": (lambda *batch, memory=None: vcrl_loss(*batch, 3.0, 0.05, "hardest", memory=memory),
             lambda *batch, memory=None: reference_vcrl(*batch, 3.0, 0.05, "hardest", memory=memory)),
    "infonce": (lambda *batch, memory=None: infonce_loss(*batch, 4.0, memory=memory),
                lambda *batch, memory=None: reference_infonce(*batch, 4.0, memory=memory)),
    "sigmoid": (lambda *batch, memory=None: sigmoid_loss(*batch, 4.0, -2.0, memory=memory),
                lambda *batch, memory=None: reference_sigmoid(*batch, 4.0, -2.0, memory=memory)),
}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_definitions_with_a_memory_equal_the_loops(name):
    definition, loop = DEFINITIONS[name]
    image, text, labels, groups = random_batch(n=12, seed=4)
    memory = memory_rows(5, groups)
    got = definition(image, text, labels, groups, memory=memory)
    assert_same_value_and_grads(got, loop(image, text, labels, groups, memory=memory), (image, text))
    # The memory's rows are more negatives: the loss moves.
    assert abs(got.item() - definition(image, text, labels, groups).item()) > 1e-3
