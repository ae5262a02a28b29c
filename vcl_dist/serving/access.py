"""Who may talk to the search server: a bearer token and a Host allow-list.

- **Token.** Read from ``VCL_DIST_SERVE_TOKEN`` or a file; the replicas keep only its SHA-256,
  and a request must send ``Authorization: Bearer <token>``. ``jobs/serve.py`` refuses to listen
  beyond loopback without one unless told ``--no-auth`` (then it warns).
- **Host allow-list.** A page on any website can reach a server on ``localhost`` through DNS
  rebinding (its own name, re-pointed at 127.0.0.1); the browser then sends that name in the
  ``Host`` header. Only the names this server is meant to be reached by are answered.

The web page (``/``) and ``/healthz`` need no token: the page holds no data (it asks for the
token and sends it with each query), and health probes come from load balancers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

# The variable's name, not a token.
TOKEN_ENV = "VCL_DIST_SERVE_TOKEN"  # nosec B105
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = frozenset({"/", "/healthz"})


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    # Recognising a wildcard address, not binding one.
    return host.strip("[]") in ("0.0.0.0", "::", "")  # nosec B104


def read_token(token_file: str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The token from ``token_file``, else from ``VCL_DIST_SERVE_TOKEN``; None when neither is set.

    Raises:
        ValueError: the file cannot be read, or the token is shorter than 16 characters (one line).
    """
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            token, where = Path(token_file).read_text().strip(), f"the token file {token_file}"
        except OSError as err:
            raise ValueError(f"cannot read the token file {token_file}: {err.strerror or err}") from None
    else:
        token, where = environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where} holds a token of {len(token)} characters: use at least {MIN_TOKEN_CHARS} "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def default_allowed_hosts(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The names a server bound to ``bind_host`` answers to: loopback, the address it is bound
    to, the machine's own names when it listens on every interface, and ``extra``."""
    hosts = list(LOOPBACK_NAMES)
    if is_wildcard(bind_host):
        hosts += [socket.gethostname(), socket.getfqdn()]
    elif not is_loopback(bind_host):
        hosts.append(bind_host.strip("[]"))
    hosts += list(extra)
    return list(dict.fromkeys(h.lower() for h in hosts if h))


@dataclass(frozen=True)
class AccessPolicy:
    token_sha256: str | None
    allowed_hosts: tuple[str, ...]

    def refusal(self, path: str, host_header: str | None, authorization: str | None) -> tuple[int, str] | None:
        """``(status, message)`` for a request this policy refuses, or None."""
        if "*" not in self.allowed_hosts:
            host = _hostname(host_header or "")
            if host not in self.allowed_hosts:
                return 400, f"Host {host[:100]!r} is not one this server answers to (its allowed hosts)"
        if self.token_sha256 is None or path in OPEN_PATHS:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "this server needs Authorization: Bearer <token>"
        if not hmac.compare_digest(token_digest(token.strip()), self.token_sha256):
            return 401, "the bearer token is not this server's"
        return None


def _hostname(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def resolve_access(bind_host: str, token: str | None, no_auth: bool, extra_hosts: list[str] | None = None
                   ) -> tuple[AccessPolicy, str | None]:
    """The policy for a server bound to ``bind_host``, and a warning to print (or None).

    Raises:
        ValueError: listening beyond loopback with no token and no ``no_auth``, or both a token
            and ``no_auth`` (one line).
    """
    if no_auth and token:
        raise ValueError(f"--no-auth and a token ({TOKEN_ENV} or --token-file) contradict each other: drop one")
    warning = None
    if not is_loopback(bind_host):
        if not token and not no_auth:
            raise ValueError(f"--host {bind_host} listens beyond this machine: set {TOKEN_ENV} (or --token-file) so that "
                             "every query needs Authorization: Bearer <token>, or pass --no-auth to serve without one")
        if no_auth:
            warning = (f"serving on {bind_host} without authentication (--no-auth): anyone who can reach this port "
                       "can query the corpus and see its thumbnails")
    return AccessPolicy(token_digest(token) if token else None, tuple(default_allowed_hosts(bind_host, extra_hosts or []))), warning
