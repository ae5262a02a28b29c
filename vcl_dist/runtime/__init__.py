"""The cross-cutting layer every wing may use: how a step is timed (:mod:`.step_phases`) and
judged finite (:mod:`.step_verdict`), mixed precision (:mod:`.precision`), the process's memory
(:mod:`.memory`), and what a user reads: one message style and one error formatter
(:mod:`.console`), tables (:mod:`.tables`).

It imports nothing of vcl-dist above :mod:`vcl_dist.redaction`; the losses import none of it
(a training step lends them its timer and its finiteness check as arguments:
:class:`vcl_dist.losses.hooks.StepHooks`).
"""
