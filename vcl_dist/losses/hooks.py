"""What a caller lends a loss for one call: a timer for its phases and a finiteness check for
the embeddings it gathers. The losses import no step instrumentation; a training step passes
its own (``vcl_dist.train.step``: phases timed by the step's clock, checks deferred to the
device on a GPU), anything else gets `PLAIN`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch


def untimed(name: str) -> AbstractContextManager:
    """A phase clock that times nothing: the context manager a loss uses when no step lends it a clock."""
    return nullcontext()


def raise_if_not_finite(name: str, tensor: torch.Tensor) -> None:
    """The check of `PLAIN`: a NaN or inf ends the call (FloatingPointError, one line)."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"{name} contain NaN or inf: the model diverged or its input is corrupt "
                                 "(lower train.lr, check the data, or turn on train.grad_clip_norm)")


@dataclass(frozen=True)
class StepHooks:
    """``phase(name)``: a context manager around a named part of the call (the gather);
    ``check_finite(name, tensor)``: raises, or records, when ``tensor`` is not finite."""

    phase: Callable[[str], AbstractContextManager] = untimed
    check_finite: Callable[[str, torch.Tensor], None] = raise_if_not_finite


PLAIN = StepHooks()
