"""Small collectives whose result the host needs at once run on a gloo group beside nccl.

On a GPU run the default group is nccl: a flag or a size all-reduced there would make the host
wait for every queued kernel before reading it. ``host_group`` gives those collectives their own
gloo group. Here two gloo processes stand in, with the default group's backend reported as nccl,
so the separate group is really made and used.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vcl_dist.losses import gather
from vcl_dist.train.lockstep import lockstep


def _worker(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    dist.get_backend = lambda group=None: "nccl"  # as a GPU run's default group
    group = gather.host_group()
    results = {"separate": group is not None and group is not dist.group.WORLD, "same_again": gather.host_group() is group,
               "sizes": gather.gather_sizes(3 + rank)}
    # Rank 1 has one batch fewer: both stop after the shorter one, through the host group.
    batches = iter([{"valid": torch.ones(4, dtype=torch.bool)}] * (3 - rank))
    results["steps"] = sum(1 for _ in lockstep(batches, []))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sizes_and_lockstep_flags_use_a_gloo_group_of_their_own(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results == {"separate": True, "same_again": True, "sizes": [3, 4], "steps": 2}, rank
