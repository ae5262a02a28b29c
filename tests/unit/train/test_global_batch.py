"""Which shares of the rows a worker trains on (``train.keep_global_batch``), and a worker's
batches of several shares joined into one. (An elastic run that shrinks and grows with it:
tests/e2e/test_multinode.py.)"""

import numpy as np

from vcl_dist.train.global_batch import planned_shares, worker_shares
from vcl_dist.train.worker_stream import joined


def test_a_smaller_group_covers_every_planned_share_once():
    assert planned_shares(3, 3, True) == planned_shares(3, 3, False) == 3
    assert planned_shares(3, 2, False) == 2  # without the setting the shares follow the group
    assert planned_shares(3, 2, True) == 3
    for planned in (2, 3, 4, 7):
        for world in range(1, planned + 1):
            shares = [worker_shares(rank, world, planned) for rank in range(world)]
            assert sorted(s for own in shares for s in own) == list(range(planned))
            assert all(own[0] == rank for rank, own in enumerate(shares))  # a worker keeps its own share first
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_batches_of_several_shares_are_joined_in_share_order():
    first = {"key": np.array(["a", "b"]), "image": np.zeros((2, 3, 4, 4), np.uint8)}
    second = {"key": np.array(["c"]), "image": np.ones((1, 3, 4, 4), np.uint8)}
    both = joined((first, second))
    assert both["key"].tolist() == ["a", "b", "c"] and both["image"].shape == (3, 3, 4, 4)
    assert both["image"][2].min() == 1 and both["image"][:2].max() == 0
