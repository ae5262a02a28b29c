"""Credentials inside URIs never reach a run record or a printed line."""

import json

import pyarrow.fs as pafs
import pytest

from vcl_dist.config import config_record, dump_config, load_config
from vcl_dist.redaction import redact_text, redact_uri, redact_values
from vcl_dist.runtime.console import run_job, warn
from vcl_dist.tracking import RunIdentity, flat_params, open_trackers

SECRET = "pa55-w0rd-3e8f"


@pytest.mark.parametrize("uri, expected", [
    (f"https://alice:{SECRET}@mlflow.example.com:5000/", "https://***@mlflow.example.com:5000/"),
    (f"https://{SECRET}@host/path", "https://***@host/path"),
    (f"postgresql://user:{SECRET}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    (f"https://host/api?experiment=3&token={SECRET}", "https://host/api?experiment=3&token=***"),
    (f"https://host/?Access_Token={SECRET}&x=1", "https://host/?Access_Token=***&x=1"),
    (f"https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}",
     "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    (f"https://u:{SECRET}@[::1", "https://***@[::1"),  # not a valid URI: the user info still goes
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("s3://bucket/runs?versionId=3", "s3://bucket/runs?versionId=3"),
])
def test_a_uri_keeps_where_it_points_and_loses_its_credentials(uri, expected):
    assert redact_uri(uri) == expected


def test_text_and_trees_are_redacted_wherever_a_uri_sits():
    line = f"cannot reach 'https://bob:{SECRET}@host/x' (and http://h/?token={SECRET}): refused"
    assert redact_text(line) == "cannot reach 'https://***@host/x' (and http://h/?token=***): refused"
    tree = {"a": [f"s3://k:{SECRET}@b/p", 3, None], "b": {"c": f"see https://h/?sig={SECRET}"}}
    assert SECRET not in json.dumps(redact_values(tree)) and redact_values(tree)["a"][1:] == [3, None]


def secret_config(tmp_path):
    return load_config(None, [f"run.storage_path={tmp_path}", "run.trackers=[mlflow]",
                              f"mlflow.tracking_uri=http://vcl:{SECRET}@127.0.0.1:9/?token={SECRET}"])


def test_records_of_a_config_carry_no_credentials(tmp_path):
    cfg = secret_config(tmp_path)
    assert SECRET in cfg.mlflow.tracking_uri  # the run itself still uses them
    for record in (dump_config(cfg), json.dumps(config_record(cfg)), json.dumps(flat_params(cfg))):
        assert SECRET not in record and "http://***@127.0.0.1:9/?token=***" in record


def test_messages_carry_no_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = secret_config(tmp_path)

    def start_tracking() -> int:
        open_trackers(cfg, RunIdentity("x", pafs.LocalFileSystem(), str(tmp_path), f"{tmp_path}/x"))
        return 0

    assert run_job(start_tracking) == 1
    warn(f"tracking stopped: cannot reach {cfg.mlflow.tracking_uri}")
    err = capsys.readouterr().err
    assert "vcl-dist: error: mlflow.tracking_uri=http://***@127.0.0.1:9/?token=***: cannot start" in err
    assert "vcl-dist: warning: tracking stopped" in err and SECRET not in err
