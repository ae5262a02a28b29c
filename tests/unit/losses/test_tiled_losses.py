"""Tiled losses (``chunk_size``) equal the dense ones: every loss × negative mode × memory on/off ×
label tower, values and every gradient, float64 to 1e-9, with chunk sizes that do and do not
divide the pool. (The distributed equivalence with tiling on is in the loss matrix, test_loss_matrix.py.)"""

import pytest
import torch

from vcl_dist.losses import InfoNCELoss, NegativeMemory, TripletLoss, VCRLLoss
from vcl_dist.losses.negatives import NEGATIVE_SELECTION
from vcl_dist.losses.pool import NeverNegatives, never_negative
from vcl_dist.losses.tiled import mine_negatives_tiled

BATCH, MEMORY, DIM, CLASSES = 20, 9, 6, 4
POOL_WITH_MEMORY = BATCH + MEMORY


def make_loss(name, negatives, normalize, with_memory, label_tower, chunk_size):
    torch.manual_seed(3)  # the same class embeddings / temperature in the dense and tiled loss
    memory = NegativeMemory(MEMORY) if with_memory else None
    if name == "triplet":
        return TripletLoss(0.6 if normalize else 4.0, negatives, normalize=normalize, memory=memory, chunk_size=chunk_size)
    if name == "vcrl":
        return VCRLLoss(4.0, 0.05, negatives, memory=memory, num_classes=CLASSES if label_tower else None, embed_dim=DIM,
                        label_weight=0.7, chunk_size=chunk_size).double()
    return InfoNCELoss(init_temperature=0.2, memory=memory, chunk_size=chunk_size).double()


def batches(seed):
    """Two steps of one batch each (the first fills the memory), with unlabeled items, shared
    labels and an image with two captions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(2):
        image = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        text = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
        labels[::6] = -1
        groups = torch.arange(BATCH) + 100 * step
        groups[5] = groups[4]
        out.append((image, text, labels, groups))
    return out


CASES = [
    ("triplet", negatives, normalize, False) for negatives in sorted(NEGATIVE_SELECTION) for normalize in (True, False)
] + [("vcrl", negatives, False, tower) for negatives in sorted(NEGATIVE_SELECTION) for tower in (False, True)] + [
    ("infonce", "-", True, False)
]


@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "memory"])
@pytest.mark.parametrize("chunk_size", [1, 7, POOL_WITH_MEMORY])
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_tiled_equals_dense_values_and_gradients(case, chunk_size, with_memory):
    name, negatives, normalize, tower = case
    dense = make_loss(name, negatives, normalize, with_memory, tower, None)
    tiled = make_loss(name, negatives, normalize, with_memory, tower, chunk_size)
    for image, text, labels, groups in batches(seed=chunk_size):
        want = dense(image, text, labels, groups)
        got = tiled(image, text, labels, groups)
        assert want.item() != 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        inputs = [image, text, *dense.parameters()]
        want_grads = torch.autograd.grad(want, inputs)
        got_grads = torch.autograd.grad(got, [image, text, *tiled.parameters()])
        for g, w in zip(got_grads, want_grads):
            assert w.abs().sum() > 0
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    if with_memory:  # the second step's pool held the first batch as memory rows
        assert dense.memory.filled == tiled.memory.filled == MEMORY


def test_tiles_of_the_mask_make_the_whole_mask():
    g = torch.Generator().manual_seed(0)
    never_rules = set()
    for labels in (torch.full((13,), -1), torch.randint(0, 3, (13,), generator=g), torch.randint(-1, 3, (13,), generator=g),
                   torch.randint(0, 3, (13,), generator=g)):
        groups = torch.randint(0, 8, (13,), generator=g) * 10**12  # ids need not be small
        if labels.min() >= 0 and len(never_rules) == 2:
            groups = torch.arange(13) * 10**12  # groups nested in labels: the "label" rule
        never = NeverNegatives(labels[:5], groups[:5], labels, groups)
        never_rules.add(never.rule)
        whole = never_negative(labels[:5], groups[:5], labels, groups)
        assert torch.equal(torch.cat([never.tile(s, min(s + 4, 13)) for s in range(0, 13, 4)], dim=1), whole)
        assert torch.equal(never.counts(), whole.sum(1))
    assert never_rules == {"group", "label", "group or label"}


def test_mined_ties_go_to_the_first_row_as_in_a_dense_minimum():
    anchors = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    never = NeverNegatives(torch.tensor([-1]), torch.tensor([0]), torch.full((4,), -1), torch.tensor([0, 1, 2, 3]))
    for chunk in (1, 2, 4):
        [(index, found)] = mine_negatives_tiled(anchors, items, torch.zeros(1, dtype=torch.float64), never, "hardest", chunk,
                                            normalized=True)
        assert index.tolist() == [1] and found.tolist() == [True]


def test_an_anchor_without_negatives_adds_nothing_tiled():
    # Every item shares the anchor's label: no negative anywhere, in every tile.
    image = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    text = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels, groups = torch.zeros(6, dtype=torch.long), torch.arange(6)
    for negatives in sorted(NEGATIVE_SELECTION):
        loss = TripletLoss(0.5, negatives, chunk_size=4)(image, text, labels, groups)
        assert loss.item() == 0
        assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, (image, text)))
    # InfoNCE keeps only the own pair in the softmax: log 1 = 0, also across an all-excluded tile.
    loss = InfoNCELoss(chunk_size=2).double()(image, text, labels, groups)
    assert abs(loss.item()) < 1e-12


def test_chunk_size_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            TripletLoss(chunk_size=bad)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_tiled_losses_never_build_a_mask_wider_than_a_chunk(case, monkeypatch):
    widths = []
    tile = NeverNegatives.tile

    def recording_tile(self, start, stop):
        widths.append(stop - start)
        return tile(self, start, stop)

    monkeypatch.setattr(NeverNegatives, "tile", recording_tile)
    name, negatives, normalize, tower = case
    loss = make_loss(name, negatives, normalize, True, tower, 7)
    for image, text, labels, groups in batches(seed=1):
        loss(image, text, labels, groups).backward()
    assert widths and max(widths) == 7, widths


@pytest.mark.parametrize("pool_dims", [(1,), (1, 0)])
@pytest.mark.parametrize("normalized", [True, False])
def test_hinge_terms_with_any_upstream_gradient_equal_the_dense_ones(pool_dims, normalized):
    # The losses give every anchor's term the same upstream gradient (the eager route); any other
    # use of the terms takes the recompute route: both must be the dense gradient.
    from vcl_dist.losses.fused import mean_hinge_all_negatives
    from vcl_dist.losses.tiled import mean_hinge_all_negatives_tiled

    (anchors, items, labels, groups), _ = batches(seed=4)
    positive = torch.arange(BATCH)
    never = NeverNegatives(labels, groups, labels, groups)
    weights = torch.rand(len(pool_dims), BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for upstream in (torch.full_like(weights, 0.3), weights):
        want = mean_hinge_all_negatives(anchors, items, never.tile(0, BATCH), positive, pool_dims, 1.5, normalized)
        got = mean_hinge_all_negatives_tiled(anchors, items, positive, never, 1.5, normalized, 7, pool_dims)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        for g, w in zip(torch.autograd.grad((got * upstream).sum(), (anchors, items)),
                        torch.autograd.grad((want * upstream).sum(), (anchors, items))):
            assert w.abs().sum() > 0
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
