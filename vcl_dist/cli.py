"""What every ``jobs/*.py`` entry point shares: a bad input ends in one line on stderr and an exit code."""

from __future__ import annotations

import sys
from typing import Callable


def run_job(body: Callable[[], int]) -> int:
    """Run a job's ``body`` and return its exit code.

    A config error prints ``vcl-dist: config error: …`` and returns 2; a missing or unusable
    input (``FileNotFoundError``, ``FileExistsError``, ``ValueError``) prints
    ``vcl-dist: error: …`` and returns 1. Messages are one line by construction of the errors.
    """
    from .config import ConfigError
    from .redaction import redact_text

    try:
        return body()
    except ConfigError as err:
        print(f"vcl-dist: config error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"vcl-dist: error: {redact_text(str(err))}", file=sys.stderr)
        return 1
