"""Where a training step's time goes: exclusive wall time per named phase.

A `PhaseClock` attributes every moment of a step to the innermost phase open at that
moment: the all-gather inside the loss is "gather", not "loss"; what no phase covers (the
loop's bookkeeping) is "other", so the phases add up to the step exactly. On a GPU, work is
asynchronous: a clock made with ``sync=torch.cuda.synchronize`` waits for the device at every
phase boundary, so a phase is charged for its own kernels (it also removes the overlap the
phases would otherwise have: time only a sample of steps there).

Code that wants to be timed calls `phase` (a no-op unless a clock is active in this
thread, so the losses and the step run untimed anywhere else); the training loop opens a step
with `PhaseClock.begin_step` where it starts waiting for the batch and closes it with
`PhaseClock.end_step` once the step's bookkeeping is done.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Callable, Iterator

# In step order; "sync": waiting at the step's start for every worker to have a batch (the
# lock-step all-reduce), "other": whatever no phase covers.
PHASES = ("data_wait", "sync", "h2d", "forward", "gather", "loss", "backward", "optimizer", "other")

_active: ContextVar["PhaseClock | None"] = ContextVar("vcl_dist_phase_clock", default=None)


class PhaseClock:
    """Exclusive seconds per phase, summed over the timed steps; ``step_seconds``: their wall time.

    ``every``: time one step in that many (the others run untimed and unsynchronised).
    """

    def __init__(self, sync: Callable[[], None] | None = None, every: int = 1):
        self.sync, self.every = sync, every
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.step_seconds = 0.0
        self.steps = 0
        self._begun = 0
        self._token = None
        self._open: list[str] = []
        self._started = self._mark = 0.0

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def begin_step(self) -> None:
        """A step starts (then `end_step`, or `cancel_step` when it turned out to be none)."""
        self._begun += 1
        if (self._begun - 1) % self.every:
            return
        self._token = _active.set(self)
        self._started = self._mark = self._now()
        self._open = ["other"]

    def end_step(self) -> None:
        if self._token is None:
            return
        _active.reset(self._token)
        self._token = None
        ended = self._now()
        self.seconds["other"] += ended - self._mark
        self.step_seconds += ended - self._started
        self.steps += 1
        self._open = []

    def cancel_step(self) -> None:
        """The step begun had no batch (the epoch ended): nothing of it is counted."""
        if self._token is not None:
            _active.reset(self._token)
            self._token = None
            self._open = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = self._now()
        self.seconds[self._open[-1]] += now - self._mark
        self._open.append(name)
        self._mark = now
        try:
            yield
        finally:
            now = self._now()
            self.seconds[self._open.pop()] += now - self._mark
            self._mark = now


def phase(name: str):
    """Charge what runs inside to ``name`` on the active clock; nothing when none is active."""
    clock = _active.get()
    return clock.phase(name) if clock is not None else nullcontext()
