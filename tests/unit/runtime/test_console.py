"""One message style: ``vcl-dist: …`` on one line, secrets masked before a line is cut."""

from vcl_dist.config import ConfigError
from vcl_dist.runtime.console import one_line, run_job, say, warn


def test_an_error_becomes_one_line_cut_where_asked():
    err = ValueError("first line\n  second\tline\r\n")
    assert one_line(err) == "first line second line"
    assert one_line(err, 10) == "first line"


def test_say_and_warn_print_one_prefixed_line(capsys):
    say("vcl-dist: started\na local Ray")  # a prefix already there is not doubled
    warn("vcl-dist: warning: something\nto look at")
    out, err = capsys.readouterr()
    assert out == "vcl-dist: started a local Ray\n"
    assert err == "vcl-dist: warning: something to look at\n"


def test_a_secret_is_masked_before_the_line_is_cut(capsys):
    # The credential straddles the cut: cutting first would leave a prefix of it in the line.
    uri = "https://user:" + "s3cr3t" * 20 + "@mlflow.example.com"
    warn(f"{'x' * 380} {uri}")
    line = capsys.readouterr().err
    assert "s3cr3t" not in line and "s3cr" not in line and len(line) <= len("vcl-dist: warning: ") + 401


def test_jobs_end_in_one_line_and_an_exit_code(capsys):
    def config_error() -> int:
        raise ConfigError("train.lr: must be\npositive")

    def missing() -> int:
        raise FileNotFoundError("no such\nfile")

    assert run_job(config_error) == 2 and run_job(missing) == 1 and run_job(lambda: 0) == 0
    assert capsys.readouterr().err.splitlines() == ["vcl-dist: config error: train.lr: must be positive",
                                                   "vcl-dist: error: no such file"]
