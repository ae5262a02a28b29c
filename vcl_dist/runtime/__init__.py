"""The cross-cutting layer every wing may use: how a step is timed (`.step_phases`) and
judged finite (`.step_verdict`), mixed precision (`.precision`), the process's memory
(`.memory`), and what a user reads: one message style and one error formatter
(`.console`), tables (`.tables`).

It imports nothing of vcl-dist above `vcl_dist.redaction`; the losses import none of it
(a training step lends them its timer and its finiteness check as arguments:
`vcl_dist.losses.hooks.StepHooks`).
"""
