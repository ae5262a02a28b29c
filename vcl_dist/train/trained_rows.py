"""An audit of what the model saw: the keys of the rows of every step each worker trained on
(``run.trained_rows_log``), as JSON lines in a local folder, one file per worker process.

A restarted worker group trains again the steps after its checkpoint; its lines carry the
``group`` (rank 0's start time, the same on every rank of a group), so the steps a later group
trained supersede an earlier group's lines for the same step (:func:`trained_rows`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


class TrainedRowsLog:
    def __init__(self, folder: str, rank: int):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / f"rank{rank:05d}-pid{os.getpid()}.jsonl"
        self.rank, self.group = rank, 0.0

    def write(self, epoch: int, step: int, shares: int, keys) -> None:
        """``keys``: the rows this rank trained on at ``step``, from the epoch's ``shares`` shares."""
        line = {"group": self.group, "epoch": epoch, "step": step, "rank": self.rank, "shares": shares,
                "keys": [str(k) for k in keys]}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")


def trained_rows(folder: str | Path) -> dict[int, list[str]]:
    """``{epoch: keys}`` the run trained on: for every step, the lines of the last group that
    trained it (every rank's), in step and rank order."""
    by_step: dict[int, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in Path(folder).glob("*.jsonl"):
        for text in path.read_text().splitlines():
            line = json.loads(text)
            by_step[line["step"]][line["group"]].append(line)
    epochs: dict[int, list[str]] = defaultdict(list)
    for step in sorted(by_step):
        lines = by_step[step][max(by_step[step])]
        for line in sorted(lines, key=lambda line: line["rank"]):
            epochs[line["epoch"]].extend(line["keys"])
    return dict(epochs)
