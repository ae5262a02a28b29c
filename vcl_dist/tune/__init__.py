"""Ray Tune around the trainer: the search (`.search`) and what it leaves behind (`.results`)."""

from .search import check_tune_config, run_tune, trial_concurrency

__all__ = ["check_tune_config", "run_tune", "trial_concurrency"]
