"""VCRL, InfoNCE and the negative memory against plain loop definitions; edge cases of all losses."""

import math

import pytest
import torch
from reference_losses import reference_infonce, reference_triplet, reference_vcrl

from vcl_dist.losses import InfoNCELoss, NegativeMemory, TripletLoss, VCRLLoss
from vcl_dist.losses.negatives import NEGATIVE_SELECTION

MODES = sorted(NEGATIVE_SELECTION)


def random_batch(n=10, d=5, seed=0, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    labels[0] = -1  # one unlabeled item
    groups = torch.arange(n) * 7
    groups[2] = groups[1]  # two captions of one image
    return image, text, labels, groups


def assert_same_value_and_grads(got, want, inputs):
    assert want.item() != 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    for g, w in zip(torch.autograd.grad(got, inputs, retain_graph=True), torch.autograd.grad(want, inputs)):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("negatives", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_vcrl_matches_loop_reference(negatives, seed):
    image, text, labels, groups = random_batch(seed=seed)
    loss = VCRLLoss(margin=3.0, reg_lambda=0.05, negatives=negatives).double()
    assert_same_value_and_grads(
        loss(image, text, labels, groups), reference_vcrl(image, text, labels, groups, 3.0, 0.05, negatives), (image, text)
    )


@pytest.mark.parametrize("negatives", MODES)
def test_vcrl_label_tower_matches_loop_reference(negatives):
    image, text, labels, groups = random_batch(seed=4)
    loss = VCRLLoss(margin=3.0, reg_lambda=0.05, negatives=negatives, num_classes=3, embed_dim=5, label_weight=0.7).double()
    want = reference_vcrl(image, text, labels, groups, 3.0, 0.05, negatives, loss.class_embeddings, 0.7)
    assert_same_value_and_grads(loss(image, text, labels, groups), want, (image, text, loss.class_embeddings))


def test_vcrl_regulariser_is_lambda_times_frobenius_norms_over_n():
    image, text, labels, groups = random_batch(seed=5)
    with_reg = VCRLLoss(margin=1.0, reg_lambda=0.3)(image, text, labels, groups)
    without = VCRLLoss(margin=1.0, reg_lambda=0.0)(image, text, labels, groups)
    expected = 0.3 * (image.pow(2).sum() + text.pow(2).sum()) / image.shape[0]
    torch.testing.assert_close(with_reg - without, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_matches_loop_reference(seed):
    image, text, labels, groups = random_batch(seed=seed)
    loss = InfoNCELoss(init_temperature=0.5).double()
    want = reference_infonce(image, text, labels, groups, loss.logit_scale.exp())
    assert_same_value_and_grads(loss(image, text, labels, groups), want, (image, text, loss.logit_scale))


def test_infonce_without_labels_is_clip_cross_entropy():
    image, text, _, _ = random_batch(seed=3)
    labels, groups = torch.full((10,), -1), torch.arange(10)
    loss = InfoNCELoss(init_temperature=0.1).double()
    logits = loss.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    target = torch.arange(10)
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
    torch.testing.assert_close(loss(image, text, labels, groups), clip)


def test_infonce_temperature_is_clamped():
    loss = InfoNCELoss(init_temperature=0.001, max_scale=100.0)
    assert loss.scale().item() == pytest.approx(100.0)
    image, text, labels, groups = random_batch()
    value = loss(image.float(), text.float(), labels, groups)
    value.backward()
    assert loss.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further




@pytest.mark.parametrize("negatives", MODES)
def test_triplet_memory_rows_act_as_extra_negatives(negatives):
    old_image, old_text, old_labels, old_groups = random_batch(n=6, seed=10)
    image, text, labels, groups = random_batch(n=8, seed=11)
    old_groups = old_groups + 1000  # other images than the current batch's
    memory = NegativeMemory(size=16)
    loss = TripletLoss(0.8, negatives, memory=memory)
    loss(old_image, old_text, old_labels, old_groups)  # fills the memory
    assert memory.filled == 6
    got = loss(image, text, labels, groups)
    # By hand: the current anchors against [batch; memory] pools, detached memory rows.
    norm = torch.nn.functional.normalize
    u, v = norm(image, dim=-1), norm(text, dim=-1)
    mu, mv = norm(old_image, dim=-1).detach(), norm(old_text, dim=-1).detach()
    all_labels, all_groups = torch.cat([labels, old_labels]), torch.cat([groups, old_groups])
    total = 0
    for anchors, pool in ((u, torch.cat([v, mv])), (v, torch.cat([u, mu]))):
        for i in range(8):
            d_ap = ((anchors[i] - pool[i]) ** 2).sum()
            d_negs = [((anchors[i] - pool[j]) ** 2).sum() for j in range(14)
                      if all_groups[j] != groups[i] and not (labels[i] >= 0 and all_labels[j] == labels[i])]
            from reference_losses import _hinge_for_anchor
            total = total + _hinge_for_anchor(d_ap, d_negs, 0.8, negatives) / 16
    assert_same_value_and_grads(got, total, (image, text))
    assert memory.filled == 14


def test_memory_is_a_fifo_with_warmup_and_state():
    memory = NegativeMemory(size=5, warmup_steps=2)
    for step in range(3):
        rows = torch.full((3, 2), float(step))
        memory.enqueue(rows, rows + 10, torch.full((3,), step), torch.arange(3) + 10 * step)
        if step == 0:
            assert memory.negatives() is None  # still warming up
    image, text, labels, groups = memory.negatives()
    # 9 rows went in, the 5 newest stay: two of step 1, three of step 2.
    assert sorted(labels.tolist()) == [1, 1, 2, 2, 2]
    assert torch.equal(text, image + 10)
    restored = NegativeMemory(size=5, warmup_steps=2)
    restored.load_state_dict(memory.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.negatives(), memory.negatives()))
    with pytest.raises(ValueError, match="holds 5 rows"):
        NegativeMemory(size=6).load_state_dict(memory.state_dict())



def sharded_memories(size, world, monkeypatch):
    """``world`` sharded memories as workers 0..world-1 place them (one process, no collectives:
    enqueue and restore need none)."""
    import vcl_dist.losses.memory as memory_module

    shards = []
    for rank in range(world):
        monkeypatch.setattr(memory_module, "distributed_world", lambda rank=rank: (rank, world))
        shard = NegativeMemory(size=size, shard=True)
        shard._place()
        shards.append(shard)
    return shards, memory_module


def test_a_sharded_memory_holds_each_ring_row_once_across_workers_and_restores_at_any_world_size(monkeypatch, tmp_path):
    from vcl_dist.train.checkpoint import MEMORY_SHARD_GLOB, save_memory_shard

    size, world = 11, 3
    replicated = NegativeMemory(size=size)
    shards, memory_module = sharded_memories(size, world, monkeypatch)
    generator = torch.Generator().manual_seed(5)
    pushed = []
    # Wraps the ring twice; the fourth batch is larger than the memory, and the last one then
    # overwrites the oldest of its rows.
    for step, count in enumerate((4, 6, 5, 13, 3)):
        batch = (torch.randn(count, 3, generator=generator), torch.randn(count, 3, generator=generator),
                 torch.randint(-1, 4, (count,), generator=generator), torch.arange(count) + 100 * step)
        pushed += batch[3].tolist()
        replicated.enqueue(*batch)
        for shard in shards:
            shard.enqueue(*batch)
    assert sorted(replicated.negatives()[3].tolist()) == sorted(pushed[-size:])  # a FIFO: the newest rows stay
    assert [s.capacity() for s in shards] == [4, 4, 3] and [s.local_filled() for s in shards] == [4, 4, 3]
    # Worker r holds ring rows r, r + 3, …: together, the replicated memory row for row.
    full = replicated.negatives()
    for rank, shard in enumerate(shards):
        for mine, whole in zip(shard.negatives(), full):
            assert torch.equal(mine, whole[rank::world])
        assert torch.equal(shard.global_rows(), torch.arange(rank, size, world))
        assert (shard.next_row, shard.filled, shard.steps) == (replicated.next_row, replicated.filled, replicated.steps)

    # The checkpoint files of the 3 workers restore a replicated memory, and 2 or 4 sharded ones.
    for shard in shards:
        save_memory_shard(tmp_path, shard)
    files = sorted(tmp_path.glob(MEMORY_SHARD_GLOB))
    assert [f.name for f in files] == [f"memory_shard_0000{r}_of_00003.pt" for r in range(3)]
    saved = [torch.load(f, weights_only=True) for f in files]
    monkeypatch.setattr(memory_module, "distributed_world", lambda: (0, 1))
    assembled = NegativeMemory(size=size)
    assembled.load_state_dicts(iter(saved))
    assert all(torch.equal(a, b) for a, b in zip(assembled.negatives(), full))
    for new_world in (2, 4):
        restored, _ = sharded_memories(size, new_world, monkeypatch)
        for rank, shard in enumerate(restored):
            monkeypatch.setattr(memory_module, "distributed_world", lambda rank=rank: (rank, new_world))
            shard.load_state_dicts(iter(saved))
            for mine, whole in zip(shard.negatives(), full):
                assert torch.equal(mine, whole[rank::new_world])
            assert shard.filled == size and shard.next_row == replicated.next_row

    # A lost shard file or shards of two different saves are errors, not a silently thinner memory.
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        NegativeMemory(size=size).load_state_dicts([saved[0], saved[2]])
    with pytest.raises(ValueError, match="shards disagree"):
        NegativeMemory(size=size).load_state_dicts([saved[0], {**saved[1], "steps": 2}, saved[2]])
    with pytest.raises(ValueError, match="holds 11 rows"):
        NegativeMemory(size=12, shard=True).load_state_dicts(saved)


ALL_LOSSES = [lambda: TripletLoss(0.2, m) for m in MODES] + [lambda: VCRLLoss(0.5, 0.01, m) for m in MODES] + [InfoNCELoss]


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
def test_batch_of_one_and_single_label_give_finite_zero_loss(make_loss):
    loss = make_loss()
    one = loss(torch.randn(1, 4), torch.randn(1, 4), torch.tensor([3]), torch.tensor([0]))
    assert torch.isfinite(one)
    same_label = loss(torch.randn(6, 4), torch.randn(6, 4), torch.zeros(6, dtype=torch.long), torch.arange(6))
    assert torch.isfinite(same_label)
    if not isinstance(loss, VCRLLoss):  # VCRL keeps its norm regulariser
        assert one.item() == 0.0 and same_label.item() == 0.0


@pytest.mark.parametrize("make_loss", ALL_LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_raise_a_clear_error(make_loss, bad):
    image = torch.randn(4, 3)
    image[2, 1] = bad
    with pytest.raises(FloatingPointError, match="image embeddings contain NaN or inf"):
        make_loss()(image, torch.randn(4, 3), torch.arange(4), torch.arange(4))


def test_some_anchors_without_valid_negatives():
    # Items 0-2 share a label; item 3 is alone: anchors 0-2 have only item 3 as negative,
    # and with groups making 3 the same image as 0, anchor 0 has none at all.
    image, text = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    labels, groups = torch.tensor([1, 1, 1, -1]), torch.tensor([5, 6, 7, 5])
    for negatives in MODES:
        got = TripletLoss(1.5, negatives)(image, text, labels, groups)
        want = reference_triplet(image, text, labels, groups, 1.5, negatives)
        torch.testing.assert_close(got, want)
        assert math.isfinite(got.item())


@pytest.mark.parametrize("case", ["unlabeled", "labels-nest-groups", "mixed", "group-spans-labels", "anchors-unlabeled"])
def test_never_negative_shortcuts_equal_the_full_definition(case):
    from vcl_dist.losses.pool import never_negative

    g = torch.Generator().manual_seed(7)
    groups = torch.randint(0, 12, (30,), generator=g)
    labels = (groups % 4) if case != "unlabeled" else torch.full((30,), -1)
    if case == "mixed":
        labels = labels.clone()
        labels[::3] = -1
    if case == "group-spans-labels":
        labels = torch.randint(0, 4, (30,), generator=g)
    anchor_labels = torch.full((10,), -1) if case == "anchors-unlabeled" else labels[:10]
    got = never_negative(anchor_labels, groups[:10], labels, groups)
    want = torch.tensor([[bool(groups[a] == groups[p]) or bool(anchor_labels[a] >= 0 and anchor_labels[a] == labels[p])
                          for p in range(30)] for a in range(10)])
    assert torch.equal(got, want)
