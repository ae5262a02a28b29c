"""Config loading: overrides merge, and every bad input is one line on stderr with exit code 2."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vcl_dist.config import ConfigError, load_config


def test_default_config_file_loads_and_overrides_apply(repo_root):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", ["loss.margin=0.35", "train.epochs=3", "model.image.blocks=[2,1]"])
    assert cfg.loss.margin == 0.35 and cfg.train.epochs == 3 and cfg.model.image.blocks == [2, 1]
    assert cfg.data.source == "shapes"


def test_error_names_key_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.margn=0.3"])
    assert str(err.value) == "loss.margn: unknown key"


BAD_INPUTS = [
    (["loss.margn=0.3"], "loss.margn: unknown key"),
    (["trian.epochs=3"], "trian: unknown key"),
    (["loss.margin=-1"], "loss.margin"),
    (["loss.margin=abc"], "loss.margin"),
    (["loss.negatives=hardest_please"], "loss.negatives"),
    (["loss.name=contrastive"], "loss.name"),
    (["train.epochs=0"], "train.epochs"),
    (["train.batch_size=127"], "train.batch_size"),
    (["train.lr=2"], "train.lr"),
    (["data.source=parquet"], "data.train_path"),
    (["data.image_size=3"], "data.image_size"),
    (["model.text.hidden_size=130"], "model.text.hidden_size"),
    (["eval.prompt_template=no slot"], "eval.prompt_template"),
    (["train.use_gpu=sometimes"], "train.use_gpu"),
    (["model.image.arch=no_such_net"], "the config builds no model: model.image.arch: Unknown model no_such_net"),
    (["epochs"], "not of the form section.key=value"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
    (["--config", "{bad_yaml}"], "cannot read config"),
    (["--config", "{list_yaml}"], "top level must be a mapping"),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(args, expected, repo_root, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("loss: {margin: [unclosed\n")
    list_yaml = tmp_path / "list.yaml"
    list_yaml.write_text("- a\n- b\n")
    args = [a.format(bad_yaml=bad_yaml, list_yaml=list_yaml) for a in args]
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/train.py"), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vcl-dist: config error: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_resume_without_a_run_is_one_line(tmp_path, capsys):
    # Here, not beside the Ray Train tests: no Ray is connected in this module, so no Ray
    # worker's log line can land in the captured stderr (a leftover Train controller's did).
    from job_modules import load_job

    assert load_job("train").main(["--resume", f"run.storage_path={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "no run with a checkpoint to resume" in err and len(err.strip().splitlines()) == 1


def test_relative_paths_resolve_against_the_starting_folder_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bert").mkdir()
    cfg = load_config(None, ["data.source=parquet", "data.train_path=shards/train", "data.val_path=shards/*/val-*.parquet",
                             "run.storage_path=runs", "tune.storage_path=../tune", "model.text.pretrained=bert"])
    assert cfg.run.storage_path == str(tmp_path / "runs") and cfg.tune.storage_path == str(tmp_path / "../tune")
    assert cfg.data.train_path == str(tmp_path / "shards/train") and cfg.data.val_path == str(tmp_path / "shards/*/val-*.parquet")
    assert cfg.data.cache_dir == str(Path.home() / ".cache/vcl-dist")
    assert cfg.model.text.pretrained == str(tmp_path / "bert")  # a folder that exists; a hub name stays a name
    assert load_config(None, ["model.text.pretrained=bert-base-uncased"]).model.text.pretrained == "bert-base-uncased"
    remote = load_config(None, ["run.storage_path=s3://bucket/runs"])
    assert remote.run.storage_path == "s3://bucket/runs"


@pytest.mark.parametrize("where", ["run:\n  name: ${oc.env:VCL_TEST_SECRET}\n",
                                   "eval:\n  prompt_template: 'a {} ${oc.env:VCL_TEST_SECRET}'\n",
                                   "eval:\n  recall_ks: [1, '${oc.env:VCL_TEST_SECRET}']\n"])
def test_a_saved_config_is_data_never_resolved(where, tmp_path, monkeypatch, capsys):
    """A model folder comes from anywhere: its config.yaml must not read the loader's environment."""
    from job_modules import load_job

    from vcl_dist.config import load_saved_config
    from vcl_dist.retrieval.model import load_model

    monkeypatch.setenv("VCL_TEST_SECRET", "s3cr3t-value")
    with pytest.raises(ConfigError) as err:
        load_saved_config(where, "config.yaml")
    assert "interpolation" in str(err.value) and "s3cr3t" not in str(err.value)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    (model / "config.yaml").write_text(where)
    with pytest.raises(ConfigError, match="refusing to load it"):
        load_model(model)
    assert load_job("evaluate").main(["--model", str(model), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "interpolation" in err and "s3cr3t" not in err


def test_a_saved_config_without_interpolations_loads_as_written():
    from vcl_dist.config import dump_config, load_saved_config

    cfg = load_config(None, ["loss.name=vcrl", "eval.prompt_template=a drawing of a {}"])
    assert load_saved_config(dump_config(cfg), "config.yaml") == cfg


def test_default_run_names_sort_by_start_time_and_never_collide():
    from vcl_dist.train.runner import default_run_name

    names = [default_run_name() for _ in range(50)]  # all in the same second, or two
    assert len(set(names)) == 50
    assert all(re.fullmatch(r"vcl-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names), names[0]
