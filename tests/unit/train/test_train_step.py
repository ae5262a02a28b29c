"""One training step, in one process: a step whose loss or gradient is not finite never reaches
the optimizer."""

import pytest
import torch
from tiny_step import setup

from vcl_dist.runtime.step_verdict import judge, read_verdicts
from vcl_dist.train.schedule import build_scheduler
from vcl_dist.train.step import NonFiniteStepError, PendingVerdict, train_step


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_finite_step_moves_the_weights():
    model, criterion, optimizer, scheduler, batch = setup()
    before = weights(model)
    loss = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    assert loss > 0 and any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("clip", [1.0, None], ids=["clipped", "unclipped"])
def test_an_infinite_gradient_stops_the_step_before_the_optimizer(clip):
    model, criterion, optimizer, scheduler, batch = setup()
    model.text_projection.weight.register_hook(lambda grad: grad * float("inf"))
    before = weights(model)
    with pytest.raises(NonFiniteStepError, match="gradient norm inf"):
        train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, clip)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not optimizer.state and scheduler.last_epoch == 0  # no AdamW moments, no schedule step


def test_nan_embeddings_stop_the_step_before_backward():
    model, criterion, optimizer, scheduler, batch = setup()
    with torch.no_grad():
        model.image_projection.weight[0, 0] = float("nan")
    before = weights(model)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0)
    assert all(torch.equal(before[n], p) or torch.isnan(p).any() for n, p in model.named_parameters())
    assert not optimizer.state


def test_the_schedule_counts_samples_so_an_elastic_run_ends_at_its_floor():
    from vcl_dist.train.schedule import warmup_cosine

    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(optimizer, 4, 20, 0.1, reference_batch=64)

    # At the planned global batch it is the schedule by steps.
    optimizer, scheduler = make()
    for step in range(25):
        assert scheduler.get_last_lr()[0] == pytest.approx(warmup_cosine(step, 4, 20, 0.1), abs=1e-12)
        optimizer.step()
        scheduler.step()

    # 8 steps at 64 rows, then the world halves: 32-row steps, twice as many for the rest. The
    # schedule's progress survives a checkpoint (LambdaLR saves the callable's attributes).
    optimizer, scheduler = make()
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    optimizer, scheduler = make()
    scheduler.load_state_dict(saved)
    scheduler.lr_lambdas[0].samples_per_step = 32
    lrs = []
    for _ in range(24):  # (20 − 8) planned steps' worth of samples
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[-1] == pytest.approx(0.1)  # at its floor, when the planned samples are done
    assert lrs[1] == pytest.approx(warmup_cosine(9, 4, 20, 0.1))  # two half steps: one planned step
    assert lrs[-2] > 0.1

    # Resumed under a longer plan (--resume train.epochs=N): the progress is the checkpoint's,
    # the shape of the schedule the new config's.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    longer = build_scheduler(optimizer, 4, 40, 0.1, reference_batch=64)
    longer.load_state_dict(saved)
    optimizer.step()
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(warmup_cosine(9, 4, 40, 0.1))


def test_an_epoch_end_settles_the_schedule_on_whole_planned_epochs():
    from vcl_dist.train.schedule import warmup_cosine

    # 2 epochs of 10 planned 64-row steps. Epoch 1 is re-dealt after 3 steps at half the world
    # and its last partial global batch left out: 3 + 13 half steps = 9.5 planned steps' samples.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, 2, 20, 0.1, reference_batch=64)
    for steps, per_step in ((3, 64), (13, 32)):
        scheduler.lr_lambdas[0].samples_per_step = per_step
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * warmup_cosine(9.5, 2, 20, 0.1))
    scheduler.finish_epoch(1, 10)
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == pytest.approx(2.0 * warmup_cosine(10, 2, 20, 0.1))
    scheduler.lr_lambdas[0].samples_per_step = 64  # epoch 2 at the planned world: its end is the floor
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * 0.1)
    before = scheduler.state_dict()
    scheduler.finish_epoch(2, 10)  # an uninterrupted epoch: nothing moves
    assert scheduler.state_dict() == before and scheduler.get_last_lr()[0] == pytest.approx(0.2)


# --- The verdict kept on the device (a GPU run's path), exercised here with fused AdamW on the CPU.

def fused_setup(seed: int = 0):
    model, criterion, _, _, batch = setup(seed)
    optimizer = torch.optim.AdamW([*model.parameters(), *criterion.parameters()], lr=1e-3, fused=True)
    return model, criterion, optimizer, build_scheduler(optimizer, 0, 10, 0.1), batch


def test_a_step_judged_on_the_device_trains_as_one_judged_at_once():
    results = []
    for on_device in (False, True):
        model, criterion, optimizer, scheduler, batch = fused_setup()
        outcome = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0,
                             verdict_on_device=on_device)
        results.append((outcome, weights(model)))
    (loss, at_once), (pending, on_device) = results
    assert isinstance(pending, PendingVerdict) and pending.checks == ("image embeddings", "text embeddings")
    assert judge(*read_verdicts([pending]), pending.checks) == loss > 0
    assert all(torch.equal(at_once[name], on_device[name]) for name in at_once)


def test_an_infinite_gradient_judged_on_the_device_skips_the_update():
    model, criterion, optimizer, scheduler, batch = fused_setup()
    model.text_projection.weight.register_hook(lambda grad: grad * float("inf"))
    before = weights(model)
    pending = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0,
                         verdict_on_device=True)  # no error yet: nothing was read
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # AdamW's step count undone too
    with pytest.raises(NonFiniteStepError, match="gradient norm inf"):
        judge(*read_verdicts([pending]), pending.checks)


def test_nan_embeddings_judged_on_the_device_are_named_when_read():
    model, criterion, optimizer, scheduler, batch = fused_setup()
    with torch.no_grad():
        model.image_projection.weight[0, 0] = float("nan")
    before = weights(model)
    pending = train_step(model, criterion, optimizer, scheduler, batch, torch.device("cpu"), False, 1.0,
                         verdict_on_device=True)
    assert all(torch.equal(before[n], p) or torch.isnan(p).any() for n, p in model.named_parameters())
    with pytest.raises(NonFiniteStepError, match="image embeddings contain NaN or inf"):
        judge(*read_verdicts([pending]), pending.checks)


def test_an_epoch_reads_pending_verdicts_together_and_names_the_failed_step():
    from vcl_dist.train.metrics import EpochProgress

    progress = EpochProgress(epoch=2, carried={"loss_sum": 0.0, "steps": 0}, max_bad_fraction=0.1, global_batch=6)
    steps = {11: [0.5, 1.0], 12: [0.25, 2.0]}
    for step, values in steps.items():
        progress.add(PendingVerdict(torch.tensor(values), ()), step)
    assert progress.progress_record(10)["loss"] is None  # nothing read yet, nothing made up
    assert progress.running_sums() == {"loss_sum": 0.75, "steps": 2, "losses": [0.5, 0.25]}
    progress.add(0.75, 13)  # a step judged at once (the CPU's path) mixes in
    progress.add(PendingVerdict(torch.tensor([float("nan"), 1.0, 1.0]), ("text embeddings",)), 14)
    progress.add(PendingVerdict(torch.tensor([0.5, float("inf")]), ()), 15)
    assert progress.progress_record(10)["loss"] == pytest.approx(1.5 / 3)
    with pytest.raises(NonFiniteStepError, match=r"^step 14 \(epoch 3\): loss nan, .*read at step 15\)$"):
        progress.settle()


def test_a_float64_worker_model_trains_in_float64_from_uint8_pixels(repo_root, tiny_shapes_overrides):
    """``train.dtype=float64``: weights, embeddings, the loss and AdamW's moments in double
    precision (the pixels arrive as uint8, the tokens as ids); refused beside bf16 autocast."""
    from vcl_dist.config import ConfigError, load_config
    from vcl_dist.data.tokenizer import train_wordpiece
    from vcl_dist.train.worker_model import TrainingModel

    tokenizer = train_wordpiece(["a red circle", "a small blue square"] * 4, 64)
    cfg = load_config(repo_root / "jobs/configs/default.yaml", [*tiny_shapes_overrides, "train.dtype=float64",
                                                                "train.num_workers=1"])
    trained = TrainingModel(cfg, tokenizer, None, torch.device("cpu"), 1, 1e-3, 64, 512)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    ids = torch.randint(5, len(tokenizer), (8, 6), generator=generator)
    u, v = trained.model(images, ids, torch.ones_like(ids))
    assert u.dtype == v.dtype == torch.float64 and not trained.use_amp
    loss = trained.criterion(u, v, torch.arange(8), torch.arange(8))
    assert loss.dtype == torch.float64
    loss.backward()
    trained.optimizer.step()
    assert all(state["exp_avg"].dtype == torch.float64 for state in trained.optimizer.state.values())
    with pytest.raises(ConfigError, match="train.dtype=float64 with train.amp=true"):
        load_config(repo_root / "jobs/configs/default.yaml", ["train.dtype=float64", "train.amp=true"])
