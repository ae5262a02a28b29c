"""Every loss against its dense float64 definition, in every way it runs, on 1, 2 and 3 workers:
the matrix of ``tests/support/loss_matrix.py`` (read its docstring), and its page in the docs."""

import pytest
import torch
import torch.multiprocessing as mp
from loss_matrix import LOCAL_SIZES, LOSSES, PAGE, VARIANTS, cell_id, cells, matrix_worker, mismatches, page, reference, refusal, run_cell


@pytest.mark.parametrize("world", sorted(LOCAL_SIZES), ids=lambda w: f"{w}-workers")
def test_every_loss_equals_its_definition_in_every_way_it_runs(world, tmp_path):
    if world == 1:
        per_rank = [{cell_id(*cell): run_cell(*cell, slice(None), 1) for cell in cells()}]
    else:
        mp.spawn(matrix_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
        per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    failures = []
    for row, variant, gather in cells():
        want = reference(row, variant, gather)
        for rank, results in enumerate(per_rank):
            failures += [f"{cell_id(row, variant, gather)}, rank {rank}, {problem}"
                         for problem in mismatches(results[cell_id(row, variant, gather)], want, variant.dtype)]
    assert not failures, "\n".join(failures)


def test_the_matrix_covers_every_loss_and_refuses_what_the_config_refuses():
    names = {row.config[0] for row in LOSSES}
    assert names == {f"loss.name={name}" for name in ("triplet", "vcrl", "infonce", "sigmoid")}
    assert {v.name for v in VARIANTS} >= {"dense", "tiled", "micro-batched", "replicated memory", "sharded memory"}
    sigmoid = next(row for row in LOSSES if row.config[0] == "loss.name=sigmoid")
    infonce = next(row for row in LOSSES if row.config[0] == "loss.name=infonce")
    dense = VARIANTS[0]
    sharded = next(v for v in VARIANTS if v.memory == "sharded")
    assert refusal(sigmoid, dense, "ring") is None
    assert "loss.gather=ring" in refusal(infonce, dense, "ring")
    assert "replicated negative memory" in refusal(sigmoid, sharded, "local")


def test_the_documentation_shows_the_matrix_as_it_is():
    assert PAGE.read_text() == page(), "regenerate it: python tests/support/loss_matrix.py --write"
