"""Errors that end a run at once: a restart from the latest checkpoint would fail the same way.

With ``train.max_failures > 0`` Ray Train restarts the worker group after *any* error in the
training function. That is right for a preempted node or an out-of-memory kill, and wrong for
an error that the run's own data, config or checkpoint causes: too many bad rows, a checkpoint
that cannot be loaded, a config that builds no model, a step whose loss or gradient is not
finite. Those fail identically on every restart, and a run with ``max_failures=-1`` would
retry them forever.

Every `FatalTrainingError` is raised by *every* worker at the same point — from a
collective verdict (summed bad-row counts, the gradient norm after DDP's all-reduce, the
gathered embeddings) or from inputs every worker shares (the checkpoint, the config) — so
`end_run_on_fatal_error` can end the training function normally on all of them with the
error as its return value, which Ray Train does not retry, and the driver raises it again
(`raise_if_fatal`) with its one-line message.
"""

from __future__ import annotations

import functools
from typing import Callable

from ..runtime.console import one_line, say


class FatalTrainingError(RuntimeError):
    """An error that would happen again after a restart; ``str(err)`` is one line."""


class NonFiniteLossError(FatalTrainingError):
    """A step's loss or gradient was NaN or infinite; the optimizer step was not taken."""


class CheckpointLoadError(FatalTrainingError):
    """The checkpoint to resume from cannot be read."""


class ModelBuildError(FatalTrainingError):
    """The config describes a model (or loss) that cannot be built."""


class RunEndedByFatalError(RuntimeError):
    """On the driver: the run ended with a `FatalTrainingError` on its workers."""


FATAL_KEY = "fatal_error"


def end_run_on_fatal_error(train_fn: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
    """Wrap a training function so that a `FatalTrainingError` ends it normally, with
    ``{FATAL_KEY: "<Type>: <message>"}`` as its return value, instead of as an error that
    Ray Train would retry."""

    @functools.wraps(train_fn)
    def wrapped(loop_config: dict) -> dict | None:
        try:
            return train_fn(loop_config)
        except FatalTrainingError as err:
            message = one_line(err)
            say(f"ending the run, not retrying it: {type(err).__name__}: {message}")
            return {FATAL_KEY: f"{type(err).__name__}: {message}"}

    return wrapped


def raise_if_fatal(return_value: dict | None) -> None:
    """Raise `RunEndedByFatalError` when rank 0's return value carries a fatal error."""
    if return_value and FATAL_KEY in return_value:
        raise RunEndedByFatalError(return_value[FATAL_KEY])
