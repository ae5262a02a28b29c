"""A worker's input: its shares of each epoch's rows as collated batches (one share, or more
when an elastic group keeps the planned global batch: `.global_batch`), the first epoch's
started while the model is built, and the optional log of which rows each step trained on."""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np
import torch

from ..config import Config
from ..data.epoch_plan import fresh_ranges
from ..runtime.prefetch import fetch_first_ahead
from .device_decode import collate_decoding_on_device
from .step import collate_rows, pinned_collate_rows
from .trained_rows import TrainedRowsLog


class InputStream:
    """This worker's batches of the training split (``data``: the driver's plan of it): each step,
    one local batch from each of ``own`` of the epoch's ``shares`` shares, in that order."""

    def __init__(self, cfg: Config, data, own: list[int], shares: int, local_batch: int, device: torch.device,
                 fresh_start: bool):
        self.cfg, self.data, self.own, self.shares, self.local_batch = cfg, data, own, shares, local_batch
        on_gpu = device.type == "cuda"
        self.collate = pinned_collate_rows if on_gpu else collate_rows
        if data.decode == "gpu":  # the batch's JPEGs are decoded on the device as it is collated
            self.collate = functools.partial(collate_decoding_on_device, geometry=data.image_size, device=device,
                                             pin_memory=on_gpu)
        self.rows_log = TrainedRowsLog(cfg.run.trained_rows_log, own[0]) if cfg.run.trained_rows_log else None
        # A run that starts from scratch knows its first epoch's rows now: their reads start
        # while the model is built, rather than after (the first step waits for less).
        self.early = None
        if fresh_start:
            ranges = fresh_ranges(data.rows, shares)
            self.early = (0, ranges, fetch_first_ahead(self.epoch_batches(0, ranges)))

    def epoch_batches(self, epoch: int, ranges: list) -> Iterator:
        """This worker's batches of ``epoch`` over its shares of ``ranges`` (every share's), collated."""
        streams = [self.data.batches(epoch, ranges[share], self.local_batch, self.cfg.data.prefetch_batches)
                   for share in self.own]
        rows = streams[0] if len(streams) == 1 else (joined(parts) for parts in zip(*streams))
        if self.rows_log is None:
            return (self.collate(batch) for batch in rows)
        return ({**self.collate(batch), "keys": batch["key"], "keys_valid": batch["valid"]} for batch in rows)

    def started(self, epoch: int, ranges: list) -> Iterator | None:
        """The batches started while the model was built, if they are ``epoch``'s over ``ranges``
        (a run from scratch); None otherwise."""
        started, self.early = self.early, None
        if started is not None and started[:2] == (epoch, ranges):
            return started[2]
        return None

    def next_epoch_ahead(self, epoch: int) -> Iterator:
        """``epoch``'s batches from its start, the first fetched from now on."""
        return fetch_first_ahead(self.epoch_batches(epoch, fresh_ranges(self.data.rows, self.shares)))

    def record_trained_rows(self, batch: dict, epoch: int, step: int) -> None:
        """Log the keys of the rows that step ``step`` trains on and of those it skips as bad
        (``run.trained_rows_log``)."""
        if self.rows_log is not None:
            keys, valid = batch.pop("keys"), np.asarray(batch.pop("keys_valid"), dtype=bool)
            self.rows_log.write(epoch, step, self.shares, keys[valid], keys[~valid])


def joined(parts: tuple[dict, ...]) -> dict:
    """Batches of rows (column -> array) one after the other, as one batch."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
