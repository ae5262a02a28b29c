"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based; a fraction between steps)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineBySamples:
    """`warmup_cosine` of the training progress counted in samples, in units of the
    planned global batch (``reference_batch``): an elastic run whose world size — hence global
    batch — changes still warms up over the same samples and ends at its floor when the planned
    samples are done, instead of stretching or cutting the schedule by steps.

    A ``LambdaLR`` lambda: each scheduler step advances the progress by ``samples_per_step``
    (the current global batch; set it anew when the world size changes). LambdaLR saves a
    callable object's attributes in its state dict, so the progress survives checkpoints
    (`ScheduleBySamples` restores only the progress). With ``samples_per_step ==
    reference_batch`` it is the schedule by steps.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, reference_batch: int = 1):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.reference_batch = self.samples_per_step = reference_batch
        self.samples = 0
        self.step = 0

    def __call__(self, step: int) -> float:
        if step > self.step:  # a scheduler step (LambdaLR also calls back for the current one)
            self.samples += (step - self.step) * self.samples_per_step
            self.step = step
        return warmup_cosine(self.samples / self.reference_batch, self.warmup_steps, self.total_steps, self.min_ratio)


class ScheduleBySamples(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` over a `WarmupCosineBySamples` that restores only the progress from a
    checkpoint: the shape of the schedule (warmup, length, floor, planned batch) is the current
    config's, so ``--resume train.epochs=N`` stretches the schedule to the new length."""

    PROGRESS = ("samples", "step")

    def finish_epoch(self, epochs_done: int, planned_steps_per_epoch: int) -> None:
        """Set the progress to ``epochs_done`` whole epochs of planned samples, and the learning
        rate with it. An uninterrupted run is there already (a no-op); an elastic run is not: an
        epoch re-dealt at another world size leaves out its last, partial global batch, and at
        another world size an epoch's steps can hold more or fewer samples than planned. Counted
        this way the schedule still ends at its floor with the last epoch, whatever happened."""
        schedule = self.lr_lambdas[0]
        schedule.samples = epochs_done * planned_steps_per_epoch * schedule.reference_batch
        self._last_lr = []
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * schedule(self.last_epoch)  # the current step: no progress added
            self._last_lr.append(group["lr"])

    def load_state_dict(self, state_dict: dict) -> None:
        progress = [{key: value for key, value in (saved or {}).items() if key in self.PROGRESS}
                    for saved in state_dict["lr_lambdas"]]
        super().load_state_dict({**state_dict, "lr_lambdas": progress})


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float,
                    reference_batch: int = 1):
    """Linear warmup then cosine decay over ``total_steps`` steps of ``reference_batch`` samples
    (see `WarmupCosineBySamples`)."""
    return ScheduleBySamples(optimizer, WarmupCosineBySamples(warmup_steps, total_steps, min_ratio, reference_batch))


def build_optimizer(modules: list[torch.nn.Module], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters of ``modules`` (the model and the loss), with no decay on
    1-d parameters (biases, norms) and scalars (a temperature).

    On a GPU the update is the fused kernel (one launch for all parameters instead of a few per
    tensor group; the same state dict, so checkpoints move between devices); on the CPU torch's
    default (for-each) implementation.
    """
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)
    on_gpu = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
        fused=True if on_gpu else None,
    )
