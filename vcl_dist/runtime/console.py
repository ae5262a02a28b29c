"""What a user reads from vcl-dist, in one style: ``vcl-dist: <what happened>`` for news,
``vcl-dist: warning: …`` for something to look at, ``vcl-dist: error: …`` for what stopped a
job, each one line, with secrets masked (`vcl_dist.redaction`).

Errors become lines through `one_line`; every ``jobs/*.py`` entry point runs its body
through `run_job`, so that a bad input ends in such a line and an exit code.
"""

from __future__ import annotations

import sys
from typing import Callable

PREFIX = "vcl-dist: "


def one_line(err: BaseException | str, limit: int | None = None) -> str:
    """``err`` as one line: its text with every run of whitespace (newlines included) made one
    space, cut to ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if limit is None else text[:limit]


def _line(text: str, limit: int | None = None) -> str:
    """``vcl-dist: <text>`` on one line, secrets masked before anything is cut."""
    from ..redaction import redact_text

    text = redact_text(one_line(text))
    text = text.removeprefix(PREFIX)
    return PREFIX + (text if limit is None else text[:limit])


def say(text: str) -> None:
    """News on stdout: ``vcl-dist: <text>``."""
    print(_line(text), flush=True)


def warn(text: str, limit: int = 400) -> None:
    """Something to look at, on stderr: ``vcl-dist: warning: <text>``, cut to ``limit`` characters."""
    text = one_line(text).removeprefix(PREFIX).removeprefix("warning: ")
    print(_line(f"warning: {text}", limit and limit + len("warning: ")), file=sys.stderr, flush=True)


def run_job(body: Callable[[], int]) -> int:
    """Run a job's ``body`` and return its exit code.

    A config error prints ``vcl-dist: config error: …`` and returns 2; a missing or unusable
    input (``FileNotFoundError``, ``FileExistsError``, ``ValueError``) prints
    ``vcl-dist: error: …`` and returns 1. Messages are one line by construction of the errors.
    """
    from ..config import ConfigError

    try:
        return body()
    except ConfigError as err:
        print(_line(f"config error: {err}"), file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(_line(f"error: {err}"), file=sys.stderr)
        return 1
