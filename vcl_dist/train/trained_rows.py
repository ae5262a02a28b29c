"""An audit of what the model saw: the keys of the rows of every step each worker trained on,
and of the rows it skipped as bad (``run.trained_rows_log``), as JSON lines in a local folder,
one file per worker process.

A restarted worker group trains again the steps after its checkpoint; its lines carry the
``group`` (rank 0's start time, the same on every rank of a group), so the steps a later group
trained supersede an earlier group's lines for the same step (`trained_rows`).
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

    def write(self, epoch: int, step: int, shares: int, keys, skipped=()) -> None:
        """``keys``: the rows this rank trained on at ``step``, from the epoch's ``shares`` shares;
        ``skipped``: the rows of its batch that were bad (an unusable image, an unreadable shard)."""
        line = {"group": self.group, "epoch": epoch, "step": step, "rank": self.rank, "shares": shares,
                "keys": [str(k) for k in keys], "skipped": [str(k) for k in skipped]}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")


def trained_rows(folder: str | Path, field: str = "keys") -> dict[int, list[str]]:
    """``{epoch: keys}`` the run trained on (``field="skipped"``: the rows it skipped as bad):
    for every step, the lines of the last group that trained it (every rank's), in step and rank order."""
    epochs: dict[int, list[str]] = defaultdict(list)
    for line in final_lines(folder):
        epochs[line["epoch"]].extend(line.get(field, []))
    return dict(epochs)


def final_lines(folder: str | Path) -> list[dict]:
    """Every step's lines from the last group that trained it, in step and rank order. A line
    cut short at a file's end (its worker was killed while writing it) is not a step trained."""
    by_step: dict[int, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in Path(folder).glob("*.jsonl"):
        texts = path.read_text().split("\n")
        for number, text in enumerate(texts):
            if not text:
                continue
            try:
                line = json.loads(text)
            except ValueError:
                if number == len(texts) - 1:  # no newline after it: the write was cut short
                    continue
                raise ValueError(f"{path}: line {number + 1} is not a trained-rows record") from None
            by_step[line["step"]][line["group"]].append(line)
    return [line for step in sorted(by_step)
            for line in sorted(by_step[step][max(by_step[step])], key=lambda line: line["rank"])]
