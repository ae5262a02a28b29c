"""Negative memory: a FIFO of detached embeddings from past global batches (XBM / MoCo style).

Every worker enqueues the same *global* batch, in rank order, so the queues are identical on
every worker (pytorch-metric-learning's cross-batch memory builds a differently ordered queue
on each rank, its issue 639). Memory rows only ever serve as negatives, and carry no gradient.
"""

from __future__ import annotations

import torch


class NegativeMemory:
    """A ring buffer of ``size`` rows of (image embedding, text embedding, label, group).

    ``warmup_steps``: the number of enqueued batches before the memory is used: early
    embeddings move too fast to be useful negatives later (XBM starts its memory late too).
    """

    def __init__(self, size: int, warmup_steps: int = 0):
        if size < 1:
            raise ValueError(f"memory size must be positive, got {size}")
        self.size = size
        self.warmup_steps = warmup_steps
        self.image: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.next_row = 0
        self.filled = 0
        self.steps = 0

    def _allocate(self, image: torch.Tensor, labels: torch.Tensor) -> None:
        dim = image.shape[1]
        self.image = image.new_zeros((self.size, dim))
        self.text = image.new_zeros((self.size, dim))
        self.labels = labels.new_full((self.size,), -1)
        self.groups = labels.new_zeros((self.size,))

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        """Append a global batch ``[N, D]``, overwriting the oldest rows once full."""
        if self.image is None or self.image.shape[1] != image.shape[1]:
            self._allocate(image, labels)
        elif self.image.device != image.device or self.image.dtype != image.dtype:
            # A memory restored from a checkpoint arrives on the CPU: follow the embeddings.
            self.image, self.text = self.image.to(image), self.text.to(image)
            self.labels, self.groups = self.labels.to(labels.device), self.groups.to(labels.device)
        image, text = image.detach(), text.detach()
        if image.shape[0] >= self.size:  # a batch larger than the memory keeps its newest rows
            image, text, labels, groups = image[-self.size:], text[-self.size:], labels[-self.size:], groups[-self.size:]
        rows = (torch.arange(image.shape[0], device=image.device) + self.next_row) % self.size
        self.image[rows], self.text[rows] = image, text
        self.labels[rows], self.groups[rows] = labels, groups
        self.next_row = (self.next_row + image.shape[0]) % self.size
        self.filled = min(self.size, self.filled + image.shape[0])
        self.steps += 1

    def negatives(self):
        """``(image [M, D], text [M, D], labels [M], groups [M])`` or None before warm-up."""
        if self.filled == 0 or self.steps < max(1, self.warmup_steps):
            return None
        return self.image[: self.filled], self.text[: self.filled], self.labels[: self.filled], self.groups[: self.filled]

    def state_dict(self) -> dict:
        return {
            "size": self.size, "warmup_steps": self.warmup_steps, "next_row": self.next_row,
            "filled": self.filled, "steps": self.steps,
            "image": self.image, "text": self.text, "labels": self.labels, "groups": self.groups,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint memory holds {state['size']} rows, the config asks for {self.size}")
        for key in ("next_row", "filled", "steps", "image", "text", "labels", "groups"):
            setattr(self, key, state[key])
