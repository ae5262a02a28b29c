"""Whether a training step was finite: judged on the host at once, or on the device and read later.

On the CPU a step's verdict (its loss, its gradient norm, the gathered embeddings) is read at
once: reading a CPU tensor costs nothing. On a GPU reading it makes the host wait for every
kernel queued so far, so the host cannot queue the next step's kernels while this one runs; at
batch 256 on an H200 that wait cost 11% of the step (``benchmarks/results/gpu_*.txt``). There
the verdict stays on the device: the checks become device flags, fused AdamW skips a step whose
flags fail (its ``found_inf``, as ``GradScaler`` uses it), and the host reads the flags of all
steps since the last reading in one go at the loop's next collective point (every
``run.log_every_steps`` steps, before a checkpoint, at the end of an epoch). A non-finite step
still never changes the weights; the run ends at that reading, naming the step.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_deferred = threading.local()


class NonFiniteStepError(FloatingPointError):
    """The step's loss, gradient norm or gathered embeddings are NaN or infinite; its optimizer step was not taken."""


def embeddings_message(name: str) -> str:
    return (f"{name} contain NaN or inf: the model diverged or its input is corrupt "
            "(lower train.lr, check the data, or turn on train.grad_clip_norm)")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise `NonFiniteStepError` when ``tensor`` holds a NaN or an inf — or, inside
    `checks_on_device`, add the check to the step's device verdict instead."""
    checks = getattr(_deferred, "checks", None)
    if checks is not None:
        checks.append((name, torch.isfinite(tensor).all()))
    elif not torch.isfinite(tensor).all():
        raise NonFiniteStepError(embeddings_message(name))


@contextmanager
def checks_on_device():
    """Collect the `check_finite` calls made inside as ``(name, device flag)`` pairs."""
    checks: list[tuple[str, torch.Tensor]] = []
    previous, _deferred.checks = getattr(_deferred, "checks", None), checks
    try:
        yield checks
    finally:
        _deferred.checks = previous


@dataclass
class PendingVerdict:
    """A step's verdict still on the device: ``values`` = ``[loss, gradient norm, check flags…]``
    (float32), ``checks`` the names of the flags."""

    values: torch.Tensor
    checks: tuple[str, ...]


def judge(values: list[float], checks: tuple[str, ...] = ()) -> float:
    """The loss of a step whose read verdict is ``values``; raises `NonFiniteStepError` otherwise."""
    loss, norm, *flags = values
    for name, ok in zip(checks, flags):
        if not ok:
            raise NonFiniteStepError(embeddings_message(name))
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteStepError(f"loss {loss:.4g}, gradient norm {norm:.4g}")
    return loss


def read_verdicts(pending: list[PendingVerdict]) -> list[list[float]]:
    """Every pending verdict's values, read from the device in one synchronisation."""
    if not pending:
        return []
    width = max(v.values.numel() for v in pending)
    padded = [torch.nn.functional.pad(v.values, (0, width - v.values.numel()), value=1.0) for v in pending]
    return [row[: v.values.numel()] for row, v in zip(torch.stack(padded).tolist(), pending)]
