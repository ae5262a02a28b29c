"""What the page generators share: write the page, or ``--check`` that it is current, and say which
outputs are stale."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def page_main(doc: str, page: Path, render: Callable[[], str], source: str, script: str,
              argv: list[str] | None = None) -> int:
    """Write ``render()`` to ``page``; with ``--check``, exit 1 when the page differs from it.

    Args:
        doc: the generator's docstring, for ``--help``.
        page: the page it writes.
        render: makes the page's text from its ``source``.
        source: what the page is made from, in words (for the message).
        script: the generator's path, for the message that says how to remake the page.
        argv: the arguments (default: the command line's).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the page differs from {source}")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not page.exists() or page.read_text() != text:
            print(f"{page.name} differs from {source}: run python {script}")
            return 1
        return 0
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return 0


def stale_exit(stale: list[str], what: str, script: str) -> int:
    """Exit code of a ``--check``: 1, after a line naming the stale ``what`` and how to remake
    them, or 0 when none is stale."""
    if stale:
        print(f"{what}: {', '.join(stale)}: run python {script}")
        return 1
    return 0
