"""An iterator whose first item is fetched ahead, in a background thread: an epoch's (or an
epoch part's) reads start before its consumer asks for them."""

from __future__ import annotations

import threading
from typing import Iterator


def fetch_first_ahead(batches: Iterator) -> Iterator:
    """``batches``, whose first item is fetched from now on in a background thread."""
    fetched: list = []
    done = threading.Event()

    def fetch() -> None:
        try:
            fetched.append(next(batches, None))
        except BaseException as err:  # handed to the consumer, raised in its thread
            fetched.append(err)
        done.set()

    # A daemon thread: a run that stops early (an error, train.max_steps) must not wait on it.
    threading.Thread(target=fetch, name="vcl-dist-epoch-prefetch", daemon=True).start()

    def chained() -> Iterator:
        done.wait()
        first = fetched[0]
        if isinstance(first, BaseException):
            raise first
        if first is not None:
            yield first
            yield from batches

    return chained()
