"""Who the search server answers: the bind rule, the token, the Host allow-list (no Ray here;
the served application is exercised over HTTP in tests/unit/retrieval/test_retrieval.py)."""

import pytest
from job_modules import load_job

from vcl_dist.serving.access import TOKEN_ENV, AccessPolicy, read_token, resolve_access, token_digest

TOKEN = "a-long-enough-token-4f9a"


def test_loopback_needs_no_token_and_answers_loopback_names_only():
    policy, warning = resolve_access("127.0.0.1", None, no_auth=False)
    assert warning is None and policy.token_sha256 is None
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
        assert policy.refusal("/search", host, None) is None, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "", "[::2]:80"):
        status, message = policy.refusal("/search", host, None)
        assert status == 400 and "is not one this server answers to" in message, host


def test_beyond_loopback_a_token_is_required_unless_no_auth_is_explicit():
    with pytest.raises(ValueError, match=f"--host 0.0.0.0 listens beyond this machine: set {TOKEN_ENV}"):
        resolve_access("0.0.0.0", None, no_auth=False)
    policy, warning = resolve_access("0.0.0.0", None, no_auth=True)
    assert policy.token_sha256 is None and "without authentication (--no-auth)" in warning
    with pytest.raises(ValueError, match="contradict"):
        resolve_access("127.0.0.1", TOKEN, no_auth=True)
    policy, warning = resolve_access("10.1.2.3", TOKEN, no_auth=False, extra_hosts=["search.internal"])
    assert warning is None and {"10.1.2.3", "search.internal", "localhost"} <= set(policy.allowed_hosts)


def test_the_token_is_checked_on_every_data_path_and_never_kept_in_clear():
    policy, _ = resolve_access("127.0.0.1", TOKEN, no_auth=False)
    assert policy.token_sha256 == token_digest(TOKEN) and TOKEN not in repr(policy)
    host = "127.0.0.1:8000"
    assert policy.refusal("/search", host, f"Bearer {TOKEN}") is None
    assert policy.refusal("/similar", host, f"bearer  {TOKEN} ") is None
    for header in (None, "", "Bearer", f"Basic {TOKEN}", "Bearer wrong-token-123456789"):
        assert policy.refusal("/search", host, header)[0] == 401, header
    assert policy.refusal("/", host, None) is None and policy.refusal("/healthz", host, None) is None
    assert AccessPolicy(None, ("*",)).refusal("/search", "anything.example", None) is None


def test_the_token_comes_from_a_file_or_the_environment_and_must_be_long(tmp_path):
    assert read_token(None, {}) is None
    assert read_token(None, {TOKEN_ENV: f" {TOKEN}\n"}) == TOKEN
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(str(tmp_path / "token"), {TOKEN_ENV: "other-token-from-env-xyz"}) == TOKEN
    with pytest.raises(ValueError, match="a token of 5 characters: use at least 16"):
        read_token(None, {TOKEN_ENV: "short"})
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token(str(tmp_path / "missing"), {})


def test_serve_py_refuses_an_open_bind_in_one_line_before_starting_anything(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    serve = load_job("serve")
    assert serve.main(["--model", "m", "--corpus", "c", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vcl-dist: error: --host 0.0.0.0 listens beyond this machine") and "\n" not in err
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert serve.main(["--model", "m", "--corpus", "c"]) == 1
    assert "use at least 16" in capsys.readouterr().err
