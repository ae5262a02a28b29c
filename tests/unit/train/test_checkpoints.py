"""Which checkpoint a run resumes or loads from: the newest that Ray Train registered as complete
(its checkpoint manager's snapshot), less any with a missing or cut-short file — never a folder
that a crash left half-written because its name sorts last; and exports that appear whole."""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from vcl_dist.config import dump_config, load_config
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.losses import NegativeMemory, TripletLoss
from vcl_dist.models import build_dual_encoder
from vcl_dist.models.export import MODEL_FILE, WEIGHTS_FILE, export_model, upload_export
from vcl_dist.models.locate import CHECKPOINT_MANAGER_SNAPSHOT, find_model_folder, registered_checkpoints
from vcl_dist.train.checkpoint import checkpoint_problem, newest_checkpoint, save_checkpoint, save_memory_shard


@pytest.fixture(scope="module")
def checkpoint_maker(tiny_shapes_overrides, repo_root):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", tiny_shapes_overrides)
    tokenizer = train_wordpiece(["a red circle", "a small blue square"], 100)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def make(folder: Path, step: int, criterion=None) -> Path:
        folder.mkdir(parents=True)
        save_checkpoint(folder, model=model, criterion=criterion or torch.nn.Module(), optimizer=optimizer, scheduler=scheduler,
                        epoch=step, step=step, history=[], config_yaml=dump_config(cfg), tokenizer=tokenizer)
        return folder

    return make


def write_snapshot(run: Path, names: list[str]) -> None:
    """What Ray Train's checkpoint manager writes (the fields read here), in report order."""
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": name, "metrics": {}} for name in names],
                "checkpoint_report_indices": list(range(len(names))),
                "latest_checkpoint_result": {"checkpoint_dir_name": names[-1]} if names else None}
    (run / CHECKPOINT_MANAGER_SNAPSHOT).write_text(json.dumps(snapshot))


def test_the_newest_registered_readable_checkpoint_is_used(checkpoint_maker, tmp_path, capsys):
    run = tmp_path / "run"
    first = checkpoint_maker(run / "checkpoint_2026-01-01_00-00-01.000000", 1)
    second = checkpoint_maker(run / "checkpoint_2026-01-01_00-00-02.000000", 2)
    write_snapshot(run, [first.name, second.name])
    # A later folder a killed upload left behind: never registered, so never chosen, whole or not.
    checkpoint_maker(run / "checkpoint_2026-01-01_00-00-03.000000", 3)
    fs = pafs.LocalFileSystem()
    assert registered_checkpoints(fs, str(run)) == [str(second), str(first)]
    assert newest_checkpoint(fs, str(run)) == str(second)

    # The registered newest, cut short (a full disk, a copy killed half-way): skipped, with a
    # warning that names it, for the one before.
    weights = second / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "unreadable model.pt" in checkpoint_problem(fs, str(second))
    warnings: list[str] = []
    assert newest_checkpoint(fs, str(run), warnings.append) == str(first)
    assert len(warnings) == 1 and warnings[0].startswith(f"vcl-dist: warning: skipped the checkpoint {second}: unreadable model.pt")
    assert find_model_folder(fs, str(run), str(run)) == str(first)
    assert f"skipped the checkpoint {second}" in capsys.readouterr().err

    # Without a snapshot (a run of another trainer): by name, still skipping what cannot be read.
    (run / CHECKPOINT_MANAGER_SNAPSHOT).unlink()
    (run / "checkpoint_2026-01-01_00-00-03.000000" / "training_state.pt").unlink()
    warnings.clear()
    assert newest_checkpoint(fs, str(run), warnings.append) == str(first)
    assert [w.rsplit(".000000: ", 1)[-1] for w in warnings] == [
        "missing training_state.pt", "unreadable model.pt (BadZipFile: File is not a zip file)"]

    # A snapshot cut short: a warning, and the folders by name.
    (run / CHECKPOINT_MANAGER_SNAPSHOT).write_text('{"checkpoint_results": [{"checkpoint_dir')
    warnings.clear()
    assert newest_checkpoint(fs, str(run), warnings.append) == str(first)
    assert warnings[0].startswith("vcl-dist: warning: unreadable ") and warnings[0].endswith("taking the checkpoints by name")


def test_a_sharded_memory_checkpoint_is_whole_only_with_every_shard(checkpoint_maker, tmp_path, monkeypatch):
    import vcl_dist.losses.memory as memory_module

    folder = checkpoint_maker(tmp_path / "checkpoint_1", 1, TripletLoss(memory=NegativeMemory(8, shard=True)))
    for rank in range(3):
        monkeypatch.setattr(memory_module, "distributed_world", lambda rank=rank: (rank, 3))
        memory = NegativeMemory(8, shard=True)
        memory.enqueue(torch.randn(8, 4), torch.randn(8, 4), torch.zeros(8, dtype=torch.long), torch.arange(8))
        save_memory_shard(folder, memory)
    fs = pafs.LocalFileSystem()
    assert checkpoint_problem(fs, str(folder)) is None
    (folder / "memory_shard_00001_of_00003.pt").unlink()
    assert checkpoint_problem(fs, str(folder)) == "memory shards ['memory_shard_00001_of_00003.pt'] missing or extra"
    for shard in folder.glob("memory_shard_*"):
        shard.rename(folder / "memory_shard_00000_of_three.pt")
        break
    assert checkpoint_problem(fs, str(folder)).startswith("an unrecognised memory shard file memory_shard_")


def test_an_export_uploaded_to_an_object_store_is_an_export_only_once_whole(checkpoint_maker, tmp_path):
    checkpoint = checkpoint_maker(tmp_path / "run" / "checkpoint_1", 1)
    write_snapshot(tmp_path / "run", [checkpoint.name])
    staged = export_model(checkpoint, tmp_path / "staged")
    fs, target = pafs.LocalFileSystem(), str(tmp_path / "run" / "model")
    uploaded: list[str] = []

    class Interrupted(Exception):
        pass

    # Record each upload, and die at the weights: an upload killed before its last file.
    import pyarrow.fs as fs_module

    real_copy = fs_module.copy_files

    def copy_files(source, destination, **kwargs):
        uploaded.append(Path(destination).name)
        if Path(destination).name == WEIGHTS_FILE:
            raise Interrupted
        return real_copy(source, destination, **kwargs)

    fs_module.copy_files = copy_files
    try:
        with pytest.raises(Interrupted):
            upload_export(staged, fs, target)
    finally:
        fs_module.copy_files = real_copy
    assert uploaded[-1] == WEIGHTS_FILE and len(uploaded) > 1  # the weights go last
    # Half an export is no export: a reader takes the newest checkpoint meanwhile.
    assert find_model_folder(fs, str(tmp_path / "run"), "run") == str(checkpoint)
    upload_export(staged, fs, target)
    assert find_model_folder(fs, str(tmp_path / "run"), "run") == target
    assert sorted(p.name for p in Path(target).iterdir()) == sorted(p.name for p in staged.iterdir())


def test_a_checkpoint_its_storage_cannot_serve_now_fails_the_group_instead_of_being_skipped(checkpoint_maker, tmp_path,
                                                                                          tiny_shapes_overrides, repo_root):
    """Resuming while the storage is down (or the local disk is full) is a passing fault: the
    group fails, to be restarted by Ray Train and try the same checkpoint again, rather than
    skip to an older one or end the run as if every checkpoint were broken."""
    import ray.train
    from ports import free_port

    from vcl_dist.config import S3Config
    from vcl_dist.storage import filesystem_for
    from vcl_dist.train.fatal import CheckpointLoadError
    from vcl_dist.train.resume import CheckpointUnavailableError, ResumePoint

    cfg = load_config(repo_root / "jobs/configs/default.yaml", tiny_shapes_overrides)
    tokenizer = train_wordpiece(["a red circle", "a small blue square"], 100)
    model = build_dual_encoder(cfg.model, len(tokenizer), cfg.data.max_text_length, tokenizer.pad_token_id)
    good = checkpoint_maker(tmp_path / "run/checkpoint_2026-01-01_00-00-01.000000", 1)
    broken = checkpoint_maker(tmp_path / "run/checkpoint_2026-01-01_00-00-02.000000", 2)
    (broken / "training_state.pt").write_bytes(b"cut short")
    down, _ = filesystem_for("s3://bucket/run", S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}"), attempts=1)

    def restore(*checkpoints):
        return ResumePoint.restore(list(checkpoints), model=model, criterion=torch.nn.Module(), optimizer=None,
                                   scheduler=None, lr=0.1, device=torch.device("cpu"), data=None, local_batch=32)

    local = pafs.LocalFileSystem()
    with pytest.raises(CheckpointUnavailableError, match="cannot read the checkpoint bucket/run/checkpoint_3 now: OSError"):
        restore(ray.train.Checkpoint("bucket/run/checkpoint_3", filesystem=down), ray.train.Checkpoint(str(good), filesystem=local))
    assert not isinstance(CheckpointUnavailableError("x"), CheckpointLoadError)  # Ray Train retries it
    # A checkpoint whose own files are broken is still skipped for the one before it.
    point = restore(ray.train.Checkpoint(str(broken), filesystem=local), ray.train.Checkpoint(str(good), filesystem=local))
    assert point.step == 1 and point.checkpoint == good.name
