"""A sharded negative memory (``loss.memory_shard``) saved by W gloo workers is the replicated
one, and restored at world sizes 1, 2 and 3 it gives the step the replicated memory gives.

Each worker fills its shard with the first step's rows and saves it; the shards assembled must
equal the replicated memory of one process, and re-cut for other world sizes (the checkpoint
format of vcl_dist.losses.memory) the second step from each restored memory must give the
single-process loss and gradients, float64. (How every loss meets its definition with a
sharded memory in the first place is the loss matrix's job: test_loss_matrix.py.)
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_steps import make_model, run_steps
from loss_matrix import global_batches
from torch.nn.parallel import DistributedDataParallel

from vcl_dist.losses import InfoNCELoss, NegativeMemory, TripletLoss, VCRLLoss
from vcl_dist.losses.negatives import NEGATIVE_SELECTION

NUM_CLASSES = 3


def make_loss(name, negatives, gather, memory_kind, chunk_size=None):
    """``memory_kind``: None, "replicated" or "sharded" (loss.memory_shard)."""
    torch.manual_seed(11)  # the same loss parameters on every worker and in the reference
    memory = NegativeMemory(size=9, shard=memory_kind == "sharded") if memory_kind else None
    if name == "triplet":
        loss = TripletLoss(margin=1.0, negatives=negatives, gather=gather, memory=memory, chunk_size=chunk_size)
    elif name == "vcrl":
        loss = VCRLLoss(margin=2.0, reg_lambda=0.05, negatives=negatives, gather=gather, memory=memory,
                        num_classes=NUM_CLASSES, embed_dim=5, label_weight=0.5, chunk_size=chunk_size)
    else:
        loss = InfoNCELoss(init_temperature=0.3, gather=gather, memory=memory, chunk_size=chunk_size)
    return loss.double()


RESHARDED = [
    (name, negatives, gather, "sharded", None)
    for name, modes in (("triplet", sorted(NEGATIVE_SELECTION)), ("vcrl", sorted(NEGATIVE_SELECTION)), ("infonce", ["-"]))
    for negatives in modes
    for gather in ("local", "full")
]


def reshard(state, world):
    """A replicated memory's state as the ``world`` shard states a sharded memory at that world
    size saves: worker r holds ring rows r, r + world, … (the format of vcl_dist.losses.memory)."""
    return [{**state, "rank": rank, "world": world,
             **{name: state[name][rank::world] for name in ("image", "text", "labels", "groups")}}
            for rank in range(world)]


def _worker(rank, world, sizes, out_dir):
    # A file rendezvous: no TCP port that another process could take in between.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    batches = global_batches()
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    results = {}
    for case in RESHARDED:
        # Fill a sharded memory with the first batch, save every worker's shard, assemble them
        # into a replicated memory, re-cut that for other world sizes, restore each here, and
        # take the second step from the restored memory.
        criterion = make_loss(*case)
        run_steps(DistributedDataParallel(make_model()), criterion, batches[:1], part)
        shards = [None] * world
        dist.all_gather_object(shards, criterion.memory.state_dict())
        assembled = NegativeMemory(size=9)
        assembled.load_state_dicts(shards)
        results[(*case, "assembled")] = assembled.state_dict()
        for saved_world in (1, 2, 3):
            restored = make_loss(*case)
            restored.memory.load_state_dicts(reshard(assembled.state_dict(), saved_world))
            step = run_steps(DistributedDataParallel(make_model()), restored, batches[1:], part)[0]
            mean_loss = step[0].clone()
            dist.all_reduce(mean_loss)
            results[(*case, f"restored from world {saved_world}")] = (mean_loss / world, step[1])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(6, 6), (5, 4, 3)], ids=["world2-equal", "world3-unequal"])
def test_a_sharded_memory_is_the_replicated_one_and_restores_at_any_world_size(sizes, tmp_path):
    mp.spawn(_worker, args=(len(sizes), list(sizes), str(tmp_path)), nprocs=len(sizes), join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(len(sizes))]
    batches = global_batches()
    for case in RESHARDED:
        name, negatives, gather, _, _ = case
        # The reference: dense, in one process, with a replicated memory.
        want = run_steps(make_model(), make_loss(name, negatives, gather, "replicated"), batches)
        # The memory after the first step, assembled from the workers' shards, is the replicated one.
        first = make_loss(name, negatives, gather, "replicated")
        run_steps(make_model(), first, batches[:1])
        for rank, results in enumerate(per_rank):
            assembled = results[(*case, "assembled")]
            for key, value in first.memory.state_dict().items():
                # Embeddings to rounding: the towers ran on other batch splits than the reference's.
                torch.testing.assert_close(torch.as_tensor(assembled[key]), torch.as_tensor(value), rtol=1e-12, atol=1e-14,
                                           msg=f"{case} rank {rank} memory {key}")
            for saved_world in (1, 2, 3):
                check_step(results[(*case, f"restored from world {saved_world}")], *want[1],
                           f"{case} restored from world {saved_world}, rank {rank}")


def check_step(got, want_loss, want_grads, where):
    got_loss, got_grads = got
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12, msg=where)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, f"{where} {name}"
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=f"{where} {name}")
