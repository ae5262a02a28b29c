"""Sharded towers (``train.strategy=fsdp``) train as DDP does, and their checkpoints are DDP's.

A dual encoder with transformer towers (a tiny CLIP's, from a local folder: layer norms only,
no batch statistics that would depend on how the batch is split), InfoNCE with its learnable
temperature, AdamW with weight decay, gradient clipping, float32, on gloo workers.
Every step's global batch of 12 rows is the same whatever the world size (6 + 6 or 4 + 4 + 4).

- On 2 workers, FSDP's per-step losses equal DDP's within 1e-5 for 20 steps, also with
  activation checkpointing and with micro-batches (GradCache), and so do the parameters at the
  end (within 1e-5 absolute).
- A checkpoint written at step 10 under either strategy, resumed under the other on 2 workers
  and under both on 3, gives the uninterrupted DDP run's losses for steps 11-20 within 1e-5.
- The exported model files (``model.safetensors``) of a DDP and an FSDP checkpoint have the
  same tensors (names, shapes, dtypes) and values within 1e-5.
- Each FSDP worker holds close to 1/W of DDP's parameter and optimizer bytes.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrained_models import clip_tokenizer, save_tiny_clip

from vcl_dist.config import dump_config, load_config
from vcl_dist.losses import InfoNCELoss
from vcl_dist.models import build_dual_encoder
from vcl_dist.train.checkpoint import load_checkpoint, save_checkpoint
from vcl_dist.train.schedule import build_optimizer, build_scheduler
from vcl_dist.train.sharding import bare_model, is_sharded, shard_model
from vcl_dist.train.state_dicts import whole_state
from vcl_dist.train.step import train_step
from vcl_dist.train.tower_options import checkpoint_blocks

GLOBAL_BATCH, STEPS, SAVED_AT, SEQ = 12, 20, 10, 8
CPU = torch.device("cpu")


def run_config(clip_dir: str):
    return load_config(None, [f"model.init={clip_dir}", "loss.name=infonce"])


def build(strategy: str, world: int, clip_dir: str, recompute: bool = False):
    torch.manual_seed(0)
    model = build_dual_encoder(run_config(clip_dir).model, 0, SEQ)
    if recompute:
        checkpoint_blocks(model)
    model = shard_model(model, strategy, CPU, world, use_amp=False)
    criterion = InfoNCELoss(init_temperature=0.2)
    optimizer = build_optimizer([bare_model(model), criterion], 3e-3, 0.05)
    scheduler = build_scheduler(optimizer, 2, STEPS, 0.1)
    return model, criterion, optimizer, scheduler


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    tokenizer = clip_tokenizer()
    input_ids = torch.randint(0, 256, (GLOBAL_BATCH, SEQ), generator=g)
    input_ids[:, -1] = tokenizer.eos_token_id  # CLIP's text tower pools at the end-of-text token
    return {"image": torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), generator=g, dtype=torch.uint8),
            "input_ids": input_ids,
            "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
            "label": torch.full((GLOBAL_BATCH,), -1), "group": torch.arange(GLOBAL_BATCH)}


def train(parts, first: int, last: int, rank: int, world: int, micro_batch: int | None = None) -> list[float]:
    """Steps ``first``..``last`` (1-based); the losses averaged over the workers."""
    model, criterion, optimizer, scheduler = parts
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(first, last + 1):
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in global_batch(step).items()}
        loss = torch.tensor(train_step(model, criterion, optimizer, scheduler, batch, CPU, False, 1.0, micro_batch))
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def checkpoint(parts, folder: Path, rank: int, clip_dir: str) -> None:
    model, criterion, optimizer, scheduler = parts
    state = whole_state(model, criterion, optimizer)  # every worker: FSDP gathers
    if rank == 0:
        folder.mkdir(parents=True)
        save_checkpoint(folder, model=bare_model(model), criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                        epoch=0, step=SAVED_AT, history=[], config_yaml=dump_config(run_config(clip_dir)),
                        tokenizer=clip_tokenizer(), state=state)
    dist.barrier()


def resumed(strategy: str, folder: Path, rank: int, world: int, clip_dir: str):
    """The losses of steps after the checkpoint, resumed under ``strategy``; and the parts."""
    parts = build(strategy, world, clip_dir)
    model, criterion, optimizer, scheduler = parts
    load_checkpoint(folder, model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler)
    return train(parts, SAVED_AT + 1, STEPS, rank, world), parts


def held_bytes(parts) -> int:
    """This worker's bytes of parameters and optimizer state (its shards, under FSDP)."""
    model, _, optimizer, _ = parts
    local = [getattr(t, "to_local", lambda t=t: t)() for t in model.parameters()]
    local += [getattr(t, "to_local", lambda t=t: t)() for state in optimizer.state.values() for t in state.values()
              if torch.is_tensor(t) and t.dim() > 0]
    return sum(t.numel() * t.element_size() for t in local)


def _worker(rank: int, world: int, out: str, clip_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{world}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out, results = Path(out), {}
    if world == 2:
        for strategy in ("ddp", "fsdp"):
            parts = build(strategy, world, clip_dir)
            assert is_sharded(parts[0]) == (strategy == "fsdp")
            losses = train(parts, 1, SAVED_AT, rank, world)
            checkpoint(parts, out / f"{strategy}-{SAVED_AT}", rank, clip_dir)
            results[strategy] = losses + train(parts, SAVED_AT + 1, STEPS, rank, world)
            results[f"{strategy} final"] = whole_state(*parts[:3]).model
            results[f"{strategy} bytes"] = held_bytes(parts)
        results["fsdp, recomputed"] = train(build("fsdp", world, clip_dir, recompute=True), 1, STEPS, rank, world)
        results["fsdp, micro-batches"] = train(build("fsdp", world, clip_dir), 1, STEPS, rank, world, micro_batch=4)
    for saved in ("ddp", "fsdp"):
        for strategy in ("ddp", "fsdp"):
            if world == 3 or saved != strategy:
                results[f"{saved} -> {strategy}"], parts = resumed(strategy, out / f"{saved}-{SAVED_AT}", rank, world,
                                                                   clip_dir)
                results.setdefault(f"{strategy} bytes", held_bytes(parts))
    torch.save(results, out / f"world{world}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    clip_dir = save_tiny_clip(out / "clip")
    for world in (2, 3):
        mp.spawn(_worker, args=(world, str(out), str(clip_dir)), nprocs=world, join=True)
    return out, {world: [torch.load(out / f"world{world}-rank{r}.pt") for r in range(world)] for world in (2, 3)}


def test_fsdp_trains_as_ddp_does(runs):
    _, results = runs
    ddp, fsdp = results[2][0]["ddp"], results[2][0]["fsdp"]
    assert len(ddp) == STEPS and ddp[-1] < ddp[0]
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(ddp), rtol=1e-5, atol=1e-6)
    # With each block's activations recomputed in the backward pass (train.activation_checkpointing),
    # and with the towers run in micro-batches of 4 rows with cached gradients (train.micro_batch_size).
    for variant in ("fsdp, recomputed", "fsdp, micro-batches"):
        torch.testing.assert_close(torch.tensor(results[2][0][variant]), torch.tensor(ddp), rtol=1e-5, atol=1e-6, msg=variant)
    assert_same_weights(results[2][0]["fsdp final"], results[2][0]["ddp final"])


def assert_same_weights(got: dict, want: dict) -> None:
    """The same tensors (names, shapes, dtypes), values within 1e-5. Attention's key biases have
    a zero gradient in exact arithmetic (a softmax does not see a shift common to its row):
    AdamW normalises the rounding noise that stands for it into lr-sized steps, under either
    strategy, so they are no measure of agreement."""
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    differ = {name: (got[name] - value).abs().max().item() for name, value in want.items()
              if not name.endswith("k_proj.bias") and not torch.allclose(got[name], value, rtol=1e-5, atol=1e-5)}
    assert not differ, "\n".join(f"{k}: {v:.2e}" for k, v in differ.items())


@pytest.mark.parametrize("world", [2, 3])
def test_a_checkpoint_resumes_under_either_strategy_at_another_world_size(runs, world):
    _, results = runs
    uninterrupted = torch.tensor(results[2][0]["ddp"][SAVED_AT:])
    resumes = [key for key in results[world][0] if "->" in key]
    assert len(resumes) == (4 if world == 3 else 2)
    for key in resumes:
        for rank, worker in enumerate(results[world]):
            torch.testing.assert_close(torch.tensor(worker[key]), uninterrupted, rtol=1e-5, atol=1e-6,
                                       msg=f"{key} on {world} workers, rank {rank}")


def test_the_exported_model_is_the_same_whichever_strategy_trained_it(runs, tmp_path):
    from safetensors.torch import load_file

    from vcl_dist.models.export import export_model

    out, _ = runs
    exported = {}
    for strategy in ("ddp", "fsdp"):
        export_model(out / f"{strategy}-{SAVED_AT}", tmp_path / strategy)
        exported[strategy] = load_file(tmp_path / strategy / "model.safetensors")
    assert_same_weights(exported["fsdp"], exported["ddp"])


def test_each_fsdp_worker_holds_about_one_wth_of_the_parameters_and_optimizer_state(runs):
    _, results = runs
    for world in (2, 3):
        ddp_bytes = results[world][0]["ddp bytes"]
        for rank, worker in enumerate(results[world]):
            share = worker["fsdp bytes"] / ddp_bytes
            assert 1 / world - 0.02 < share < 1 / world + 0.05, (world, rank, share)
