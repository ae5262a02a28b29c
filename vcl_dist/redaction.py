"""Secrets out of run records and log lines: the credentials a URI can carry become ``***``.

Every place that records or prints a URI (``config.yaml``, ``result.json``, tracker parameters,
error messages) goes through here. A URI's user info (``https://user:password@host``) and the
values of known secret query keys (``?token=…``, presigned S3 signatures) are replaced; the rest
stays readable, so a record still says which server or bucket a run used. Credentials belong in
the environment (``MLFLOW_TRACKING_TOKEN``, ``AWS_*``), where nothing here writes them down.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "password", "passwd", "pwd",
    "secret", "client_secret", "api_key", "apikey", "key", "sig", "signature", "sas", "credential", "credentials",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
})
# A scheme, "://", then everything up to whitespace or a quote: URIs inside free text.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# A secret query pair outside a whole URI (a client's error quotes the request's path alone).
_SECRET_PAIR = re.compile(r"([?&](?:" + "|".join(re.escape(k) for k in sorted(SECRET_QUERY_KEYS)) + r")=)(?!\*\*\*)[^&\s),;\]'\"<>`]+",
                          re.IGNORECASE)


def _redact_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        key = item.split("=", 1)[0]
        items.append(f"{key}={MASK}" if unquote(key).strip().lower() in SECRET_QUERY_KEYS else item)
    return "&".join(items)


def redact_uri(uri: str) -> str:
    """``uri`` with its user info and secret query values replaced by ``***``."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # a malformed host (say, an unclosed IPv6 bracket): mask what looks like user info
        return re.sub(r"(://)[^/@\s]*@", rf"\g<1>{MASK}@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = _redact_query(parts.query) if parts.query else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every URI in it redacted. Punctuation that
    ends a URI's sentence (``).,;:``) stays outside it, as a linkifier would read it."""

    def redact(match: re.Match) -> str:
        uri = match.group()
        core = uri.rstrip(".,;:)]}!?")
        return redact_uri(core) + uri[len(core):]

    return _SECRET_PAIR.sub(rf"\g<1>{MASK}", _URI.sub(redact, text))


def redact_values(node: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings) with every string redacted."""
    if isinstance(node, str):
        return redact_text(node)
    if isinstance(node, dict):
        return {key: redact_values(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact_values(value) for value in node]
    return node
