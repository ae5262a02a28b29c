"""A real 2-worker Ray Train run on a local Ray: it trains, reports, checkpoints, and learns."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from job_modules import load_job
from tracked_metrics import assert_same_weights, checked_reference_run

from vcl_dist.config import load_config
from vcl_dist.losses import build_loss
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.export import TOKENIZER_DIR
from vcl_dist.train.checkpoint import load_checkpoint
from vcl_dist.train.metrics import HISTORY_ONLY, reported_metric_names
from vcl_dist.train.runner import run_training


@pytest.fixture(scope="module")
def straight(local_ray, tiny_shapes_overrides, repo_root, tmp_path_factory):
    """512 rows, 2 workers, local batch 32: 8 lock-stepped steps per epoch, 4 epochs, checkpoints
    every 3 steps and at epoch ends; never stopped: the reference that stopped, resumed and
    sharded runs of the same config must equal step for step. Returns the run and its overrides
    (without run.name and run.storage_path).

    The triplet loss over all negatives: a mined one (semi-hard) picks its negative by comparing
    distances, and the last-bit differences between DDP's all-reduce and FSDP's reduce-scatter
    flip a pick within a few steps (seen at step 5), after which the runs differ for good."""
    overrides = [*tiny_shapes_overrides, "train.epochs=4", "train.checkpoint_every_steps=3", "loss.negatives=all"]
    storage = tmp_path_factory.mktemp("straight")
    outcome = checked_reference_run(repo_root / "jobs/configs/default.yaml",
                                    [*overrides, f"run.storage_path={storage}", "run.name=straight"])
    return outcome, overrides


def test_two_workers_train_checkpoint_inside_epochs_and_resume_there(straight, tiny_shapes_overrides, repo_root, tmp_path,
                                                                    capsys):
    # train.max_steps stops the run at step 20, 4 steps into epoch 3.
    straight, overrides = straight
    overrides = [*overrides, f"run.storage_path={tmp_path}"]
    cfg = load_config(repo_root / "jobs/configs/default.yaml", [*overrides, "run.name=ray-train-test", "train.max_steps=20"])
    outcome = run_training(cfg)

    history = outcome.history
    assert [m["epoch"] for m in history] == [1, 2] and [m["step"] for m in history] == [8, 16]
    assert all(m["world_size"] == 2 for m in history)
    # Learning is checked after the resume below, over 4 epochs: after 2 (16 steps) the tiny
    # model's mean loss moves by about its run-to-run noise (measured 0.006-0.009 lower in
    # three runs, 0.0002 higher in one CI run).
    for key in ("val_i2t_r1", "val_t2i_r10", "val_t2i_class_r1", "val_zero_shot_acc", "val_rsum", "samples_per_s"):
        assert key in history[-1], key
    assert history[-1]["val_num_images"] == 64 and history[-1]["val_num_captions"] == 128
    # What tune.metric is checked against is what an epoch reports: one list, no drift.
    assert set(history[-1]) - set(HISTORY_ONLY) == reported_metric_names(cfg)

    run = Path(outcome.run_path)
    result = json.loads((run / "result.json").read_text())
    assert result["final_metrics"]["epoch"] == 2 and result["config"]["train"]["epochs"] == 4
    assert result["throughput"]["samples_per_s"] > 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # The last checkpoint is inside epoch 3 and restores into a fresh model with weights_only loading.
    checkpoint = Path(outcome.checkpoint_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = load_checkpoint(checkpoint, model=model)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (2, 4, 20) and len(state["history"]) == 2
    assert len(state["rng"]) == 2 and [p["steps"] for p in state["epoch_progress"]] == [4, 4]  # one per worker
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The same run.name without --resume is refused before anything starts: Ray Train would
    # otherwise continue that run silently, under the new config.
    capsys.readouterr()
    assert load_job("train").main([*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "run.name=ray-train-test",
                                   "loss.margin=0.5"]) == 2
    # Ray's progress bars and worker logs (of the run above) share stderr, and may precede the
    # message on its line.
    errors = [line for line in capsys.readouterr().err.splitlines() if "vcl-dist: config error" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"vcl-dist: config error: run.name=ray-train-test: a run of that name exists in {tmp_path}; "
        "continue it with --resume or choose another run.name"), errors
    assert json.loads((run / "result.json").read_text()) == result

    # jobs/train.py --resume: the run with the newest checkpoint, its own config; a run that
    # train.max_steps stopped goes on to train.epochs.
    capsys.readouterr()
    assert load_job("train").main(["--resume", f"run.storage_path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "vcl-dist: run ray-train-test stopped at train.max_steps=20; resuming it to train.epochs=4" in out
    # Progress inside the epochs, from the driver (stdout is no terminal here: plain lines, the
    # first at once, then at most one per run.progress_every_s = 30 s), and a line at each end.
    progress = [line for line in out.splitlines() if re.match(r"vcl-dist: epoch \d+/4 step \d+/8 ", line)]
    assert progress and progress[0].startswith("vcl-dist: epoch 3/4 step ") and len(progress) <= 4, progress
    assert [line.split(" done in ")[0] for line in out.splitlines() if " done in " in line] == [
        "vcl-dist: epoch 3/4", "vcl-dist: epoch 4/4"]
    resumed = json.loads((run / "result.json").read_text())
    assert resumed["run_name"] == "ray-train-test" and resumed["config"]["train"]["epochs"] == 4
    # Epoch 3 finished its remaining 4 steps: 32 in all, not 20 + 8 (a restarted epoch) + 8.
    assert resumed["final_metrics"]["epoch"] == 4 and resumed["final_metrics"]["step"] == 32
    assert resumed["final_metrics"]["resumed_from_step"] == 20
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [8, 16, 24, 32]
    # The resumed epochs started from the trained weights, not from scratch ...
    assert resumed["final_metrics"]["train_loss"] < history[0]["train_loss"]
    # ... and on the very rows, crops and random draws of the run that was never stopped: the
    # same loss at every step (the headline of exact resume), the same final weights.
    resumed_history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [len(m["step_losses"]) for m in resumed_history] == [8, 8, 8, 8]
    for stopped, uninterrupted in zip(resumed_history, straight.history):
        assert stopped["step_losses"] == pytest.approx(uninterrupted["step_losses"], abs=1e-6, rel=0)
    assert resumed["final_metrics"]["train_loss"] == pytest.approx(straight.final_metrics["train_loss"], abs=1e-6, rel=0)
    assert_same_weights(Path(resumed["model"]), Path(straight.model_path))
    assert_errors_that_would_happen_again_end_the_run(tmp_path, Path(resumed["checkpoint"]))


def test_sharded_towers_train_as_ddp_does_and_their_checkpoints_resume_under_ddp(straight, repo_root, tmp_path):
    # train.strategy=fsdp: the towers sharded over the 2 workers, stopped at step 20 inside
    # epoch 3 (evaluation and checkpoints gather them on every worker), then resumed under DDP.
    straight, overrides = straight
    overrides = [*overrides, f"run.storage_path={tmp_path}", "run.name=sharded"]
    outcome = run_training(load_config(repo_root / "jobs/configs/default.yaml",
                                       [*overrides, "train.strategy=fsdp", "train.max_steps=20"]))
    assert [m["step"] for m in outcome.history] == [8, 16]
    for sharded, replicated in zip(outcome.history, straight.history):
        assert sharded["step_losses"] == pytest.approx(replicated["step_losses"], abs=1e-5, rel=0)
        assert "val_rsum" in sharded and "val_zero_shot_acc" in sharded  # rank 0 evaluated, with the others in step
    assert load_job("train").main(["--resume", f"run.storage_path={tmp_path}", "run.name=sharded",
                                   "train.strategy=ddp"]) == 0
    run = Path(outcome.run_path)
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [8, 16, 24, 32] and resumed[-1]["resumed_from_step"] == 20
    for stopped, uninterrupted in zip(resumed, straight.history):
        assert stopped["step_losses"] == pytest.approx(uninterrupted["step_losses"], abs=1e-5, rel=0)
    result = json.loads((run / "result.json").read_text())
    assert result["config"]["train"]["strategy"] == "ddp"
    assert_same_weights(Path(result["model"]), Path(straight.model_path), atol=1e-4, zero_gradient=("key.bias",))


def assert_errors_that_would_happen_again_end_the_run(storage: Path, checkpoint: Path) -> None:
    """With restarts allowed, a step that overflows still ends the run at once, in one line: a
    restart would fail the same way. (Too many bad rows: the same, in test_data_sources; a config
    that builds no model stops before Ray, in test_config.) A checkpoint cut short is skipped for
    the one before it."""

    def resume(*overrides: str) -> list[str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = load_job("train").main(["--resume", f"run.storage_path={storage}", "train.epochs=5", "train.max_failures=3",
                                           *overrides])
        assert code == 1
        lines = err.getvalue().splitlines()
        return [line for n, line in enumerate(lines) if line.startswith("vcl-dist: training failed:") or
                (line.startswith("  ") and lines[n - 1].startswith(("vcl-dist: training failed:", "  ")))]

    # Resumed as VCRL with λ = 1e38: λ·‖U‖² overflows float32 at the next step, which stops
    # before the optimizer moves and names the checkpoint that is still good.
    failures = resume("loss.name=vcrl", "loss.reg_lambda=1e38")
    assert len(failures) == 4, failures
    assert failures[0].startswith("vcl-dist: training failed: NonFiniteLossError: step 33 (epoch 5): loss inf")
    assert f"the optimizer step was not taken. Last good checkpoint: {checkpoint}" in failures[0]
    # Under the one-line error: where each worker's logs are (files that exist), and the last
    # metrics the run reported (this worker group failed before reporting any: its checkpoint's).
    for rank, line in enumerate(failures[1:3]):
        assert line.startswith(f"  rank {rank} logs (node "), line
        log_file = line.split("): ", 1)[1].split()[0]
        assert Path(log_file).is_file() and log_file.endswith(".out"), line
    assert failures[3].startswith(f"  last checkpoint's metrics ({checkpoint}): epoch=4 step=32 train_loss="), failures[3]

    # The same checkpoint with its weights file cut short (a full disk, a killed copy): skipped,
    # with a warning that names it, for the checkpoint Ray Train registered before it.
    weights = checkpoint / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = load_job("train").main(["--resume", f"run.storage_path={storage}", "train.epochs=4"])
    assert code == 0, err.getvalue()[-2000:]
    assert f"vcl-dist: warning: skipped the checkpoint {checkpoint}: unreadable model.pt" in err.getvalue()
    result = json.loads((checkpoint.parent / "result.json").read_text())
    # It went on from the previous checkpoint (step 30, inside epoch 4: checkpoints every 3 steps).
    assert result["final_metrics"]["resumed_from_step"] == 30 and result["final_metrics"]["step"] == 32


def test_vcrl_with_label_tower_and_sharded_memory_trains_and_checkpoints_its_state(local_ray, tiny_shapes_overrides, repo_root,
                                                                                  tmp_path):
    cfg = load_config(
        repo_root / "jobs/configs/default.yaml",
        [*tiny_shapes_overrides, f"run.storage_path={tmp_path}", "run.name=vcrl", "train.epochs=3", "train.max_steps=16",
         "loss.name=vcrl", "loss.margin=0.5", "loss.reg_lambda=0.05", "loss.label_tower=true",
         "loss.memory_size=96", "loss.memory_warmup_steps=2", "loss.memory_shard=true",
         # A checkpoint after every step: 0.0001 minutes pass between any two.
         "train.checkpoint_every_minutes=0.0001"],
    )
    outcome = run_training(cfg)
    snapshot = json.loads((Path(outcome.run_path) / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["current_report_index"] == 16  # 14 inside the epochs, by the clock, and 2 at their ends
    # train.max_steps reached on an epoch's last step: that epoch still reports and checkpoints.
    assert [m["step"] for m in outcome.history] == [8, 16]
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    checkpoint = Path(outcome.checkpoint_path)
    loss_state = torch.load(checkpoint / "loss.pt", weights_only=True)
    assert loss_state["class_embeddings"].shape == (30, cfg.model.embed_dim)  # one per shapes class
    # Each worker saved its half of the memory into the one checkpoint folder.
    assert torch.load(checkpoint / "training_state.pt", weights_only=True)["memory"] is None
    shards = [torch.load(checkpoint / f"memory_shard_0000{rank}_of_00002.pt", weights_only=True) for rank in range(2)]
    # 16 global steps of 64 rows went through a memory of 96 rows: 48 on each worker.
    assert all(shard["filled"] == 96 and shard["steps"] == 16 and shard["rank"] == rank for rank, shard in enumerate(shards))
    assert all(shard["image"].shape == (48, cfg.model.embed_dim) for shard in shards)
    # Loaded through the checkpoint reader into a replicated memory: the whole ring, every row
    # a trained (non-zero) embedding.
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR))
    criterion = build_loss(cfg.loss.model_copy(update={"memory_shard": False}), num_classes=30, embed_dim=cfg.model.embed_dim)
    load_checkpoint(checkpoint, model=build_dual_encoder(cfg.model, vocabulary, cfg.data.max_text_length), criterion=criterion)
    image, text, labels, _ = criterion.memory.negatives()
    assert image.shape == (96, cfg.model.embed_dim) and bool((image.norm(dim=1) > 0).all() and (text.norm(dim=1) > 0).all())
    assert torch.equal(image[0::2], shards[0]["image"]) and torch.equal(labels[1::2], shards[1]["labels"])


# The InfoNCE/full-gather equivalence is proven by the loss matrix (test_loss_matrix.py); this real run joins the e2e checks to keep
# the suite under its 15-minute budget (15 min 22 s measured with it, after the sharded-memory and checkpoint tests).
