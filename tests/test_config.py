"""Config loading: overrides merge, and every bad input is one line on stderr with exit code 2."""

import subprocess
import sys

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
