"""Training: the per-worker loop, the TorchTrainer driver, checkpoints and the schedule."""
