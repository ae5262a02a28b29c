"""Negative memory: a FIFO of detached embeddings from past global batches (XBM / MoCo style).

Every worker enqueues the same *global* batch, in rank order, so the ring buffer is the same on
every worker (pytorch-metric-learning's cross-batch memory builds a differently ordered queue
on each rank: pytorch-metric-learning issue 639). Memory rows only ever serve as negatives, and carry no gradient.

Replicated (the default) every worker holds the whole ring. **Sharded** (``shard=True``,
``loss.memory_shard``) worker ``r`` of ``W`` holds only the ring rows ``g`` with
``g % W == r``, at its local slot ``g // W``: a 1M-row memory costs each of 8 workers 1/8 of it,
and the shards stay balanced while the ring fills. The losses then reduce over each shard and
combine the workers' results with small collectives (`.sharded_memory`).

A state (`NegativeMemory.state_dict`) is one shard: ``rank`` of ``world`` (a replicated
memory is shard 0 of 1). `NegativeMemory.load_state_dicts` takes all shards of a saved
memory, of any world size, and keeps the rows this worker owns now: a checkpoint restores at
another world size, and a replicated memory from a sharded one or the reverse.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .gather import distributed_world


class NegativeMemory:
    """A ring buffer of ``size`` rows of (image embedding, text embedding, label, group).

    ``warmup_steps``: the number of enqueued batches before the memory is used: early
    embeddings move too fast to be useful negatives later (XBM starts its memory late too).
    ``shard``: hold only this worker's share of the rows (see the module docstring); the
    worker's place is that of the default process group when the memory is first filled.
    """

    def __init__(self, size: int, warmup_steps: int = 0, shard: bool = False):
        if size < 1:
            raise ValueError(f"memory size must be positive, got {size}")
        self.size = size
        self.warmup_steps = warmup_steps
        self.sharded = shard
        self.rank, self.world = 0, 1
        self.placed = False
        self.image: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self.next_row = 0  # ring rows, over the whole memory (every shard)
        self.filled = 0
        self.steps = 0

    def _place(self) -> None:
        """Take this worker's place, once: a memory lives in one process of one worker group."""
        if not self.placed:
            self.rank, self.world = distributed_world() if self.sharded else (0, 1)
            self.placed = True

    def capacity(self) -> int:
        """Rows this worker holds once the memory is full."""
        return len(range(self.rank, self.size, self.world))

    def local_filled(self) -> int:
        """Rows this worker holds now (ring rows ``< filled`` that are its own)."""
        return len(range(self.rank, self.filled, self.world))

    def global_rows(self, count: int | None = None, device=None) -> torch.Tensor:
        """The ring rows of this worker's first ``count`` slots (default: the filled ones)."""
        count = self.local_filled() if count is None else count
        return torch.arange(count, device=device) * self.world + self.rank

    def _allocate(self, dim: int, dtype: torch.dtype, device, label_dtype: torch.dtype) -> None:
        rows = self.capacity()
        self.image = torch.zeros((rows, dim), dtype=dtype, device=device)
        self.text = torch.zeros((rows, dim), dtype=dtype, device=device)
        self.labels = torch.full((rows,), -1, dtype=label_dtype, device=device)
        self.groups = torch.zeros((rows,), dtype=label_dtype, device=device)

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        """Append a global batch ``[N, D]``, overwriting the oldest rows once full; a sharded
        memory keeps the rows that fall on its own ring rows."""
        if self.image is None or self.image.shape[1] != image.shape[1]:
            self._place()
            self._allocate(image.shape[1], image.dtype, image.device, labels.dtype)
        elif self.image.device != image.device or self.image.dtype != image.dtype:
            # A memory restored from a checkpoint arrives on the CPU: follow the embeddings.
            self.image, self.text = self.image.to(image), self.text.to(image)
            self.labels, self.groups = self.labels.to(labels.device), self.groups.to(labels.device)
        image, text = image.detach(), text.detach()
        if image.shape[0] >= self.size:  # a batch larger than the memory keeps its newest rows
            image, text, labels, groups = image[-self.size:], text[-self.size:], labels[-self.size:], groups[-self.size:]
        count = image.shape[0]  # before this worker keeps its own: the ring advances by all of them
        ring_rows = (torch.arange(image.shape[0], device=image.device) + self.next_row) % self.size
        if self.world > 1:
            mine = (ring_rows % self.world == self.rank).nonzero().squeeze(1)
            image, text = image.index_select(0, mine), text.index_select(0, mine)
            labels, groups = labels.index_select(0, mine), groups.index_select(0, mine)
            ring_rows = ring_rows.index_select(0, mine)
        slots = ring_rows // self.world
        self.image[slots], self.text[slots] = image, text
        self.labels[slots], self.groups[slots] = labels, groups
        self.next_row = (self.next_row + count) % self.size
        self.filled = min(self.size, self.filled + count)
        self.steps += 1

    def in_use(self) -> bool:
        """Whether the losses draw on the memory this step (the same answer on every worker)."""
        return self.filled > 0 and self.steps >= max(1, self.warmup_steps)

    def negatives(self):
        """``(image [M, D], text [M, D], labels [M], groups [M])`` of this worker's filled rows,
        in ring order (all of them unless sharded), or None before warm-up."""
        if not self.in_use():
            return None
        rows = self.local_filled()
        return self.image[:rows], self.text[:rows], self.labels[:rows], self.groups[:rows]

    def state_dict(self) -> dict:
        """The ring's rows and its position, for a checkpoint (tensors on the CPU)."""
        return {
            "size": self.size, "warmup_steps": self.warmup_steps, "next_row": self.next_row,
            "filled": self.filled, "steps": self.steps, "rank": self.rank, "world": self.world,
            "image": self.image, "text": self.text, "labels": self.labels, "groups": self.groups,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ring saved by `state_dict` (of any world size: see `load_state_dicts`)."""
        self.load_state_dicts([state])

    def load_state_dicts(self, states: Iterable[dict]) -> None:
        """Restore from every shard of a saved memory (one state, for a replicated one), read
        one at a time; keeps the rows that are this worker's at the current world size.

        Raises:
            ValueError: the shards disagree, miss one, or hold another memory size.
        """
        self._place()
        seen: set[int] = set()
        counters = None
        for state in states:
            if state["size"] != self.size:
                raise ValueError(f"checkpoint memory holds {state['size']} rows, the config asks for {self.size}")
            saved_rank, saved_world = state.get("rank", 0), state.get("world", 1)
            these = (state["next_row"], state["filled"], state["steps"], saved_world)
            if counters is not None and these != counters:
                raise ValueError(f"checkpoint memory shards disagree: {these} vs {counters} (next row, filled, steps, world)")
            counters = these
            seen.add(saved_rank)
            if state["image"] is None:
                continue
            if self.image is None:
                self._allocate(state["image"].shape[1], state["image"].dtype, "cpu", state["labels"].dtype)
            saved_slots = torch.arange(state["image"].shape[0])
            ring_rows = saved_slots * saved_world + saved_rank
            mine = (ring_rows % self.world == self.rank).nonzero().squeeze(1)
            slots = ring_rows.index_select(0, mine) // self.world
            for name in ("image", "text", "labels", "groups"):
                getattr(self, name)[slots] = state[name].index_select(0, mine).to(getattr(self, name))
        if counters is None:
            raise ValueError("the checkpoint holds no negative memory state")
        if seen != set(range(counters[3])):
            missing = sorted(set(range(counters[3])) - seen)
            raise ValueError(f"checkpoint memory shards {missing} of {counters[3]} are missing")
        self.next_row, self.filled, self.steps = counters[:3]
