"""A filter from start to end, resumable at every stage (``jobs/filter.py``).

The output folder holds the filtered shards and, under ``_filter/`` (which shard readers skip),
what the filter has done so far:

- ``plan.json``: the input shards with their rows and the scoring model's fingerprint; a rerun
  on other data or with another model is refused rather than mixed in;
- ``scores/<shard>.parquet``: every row's score, image hash and problem (`.scoring`),
  written shard by shard: a killed filter rescores only the shards it was in the middle of;
- ``duplicates.parquet``: the rows that are copies of a better-scored image (`.selection`);
- ``selection.json``: the criteria and the threshold they came to. A rerun with other criteria
  keeps the scores and duplicates and writes the shards anew.

``_filter.json`` is written last: its presence marks a complete filtered copy.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs

from ..class_names import CLASSES_FILE
from ..config import S3Config
from ..runtime.console import say
from ..storage import display_uri, exists, filesystem_for, is_empty_folder, list_files, read_text, write_text_atomically
from .scorer_model import ScorerModel
from .scoring import collect_scores, score_file, scoring_dataset, write_score_file
from .selection import (
    NO_ROWS,
    candidate_count,
    candidate_mask,
    find_duplicates,
    kth_best_score,
    load_duplicates,
    read_scores,
    save_duplicates,
)
from .shards import InputShard, detect_format, input_root, kept_rows_table, list_input_shards, output_name, write_shard

STATE_DIR = "_filter"
SUMMARY_FILE = "_filter.json"
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Criteria:
    """What a filter keeps: rows scoring at least ``min_score``, or the best ``keep_fraction`` of
    the candidates (neither: every candidate); ``dedup``: one row per distinct image."""

    min_score: float | None = None
    keep_fraction: float | None = None
    dedup: bool = True

    def __post_init__(self):
        if self.min_score is not None and self.keep_fraction is not None:
            raise ValueError("give --min-score or --keep-fraction, not both")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ValueError(f"--min-score must be a finite number, got {self.min_score}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError(f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")


@dataclass
class FilterReport:
    shards: int
    rows: int
    bad_rows: dict[str, int]
    duplicates: int
    candidates: int
    threshold: float | None
    kept: int
    shards_written: int
    scored_now: int  # shards this run scored (the rest were scored before it)
    seconds: float = 0.0
    criteria: dict = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # scoring, duplicates, selection, writing


def _state(out: str, name: str) -> str:
    return f"{out}/{STATE_DIR}/{name}"


def _plan(data: str, kind: str, shards: list[InputShard], scorer: ScorerModel) -> dict:
    return {"data": data, "format": kind, "model": scorer.described, "model_fingerprint": scorer.fingerprint,
            "shards": [[s.path, s.rows] for s in shards]}


def prepare_out(filesystem: pafs.FileSystem, out: str, shown: str, plan: dict, overwrite: bool) -> None:
    """Make ``out`` ready: new, or an earlier filter of the same data and model (resumed), or
    (``overwrite``) an earlier filter's of other data or another model, emptied.

    Raises:
        FileExistsError: ``out`` holds something else, or another filter without ``overwrite`` (one line).
    """
    if is_empty_folder(filesystem, out):
        return
    plan_path = _state(out, "plan.json")
    if not exists(filesystem, plan_path):
        raise FileExistsError(f"{shown} is not empty and holds no filter output (no {STATE_DIR}/plan.json): "
                              "choose another --out")
    earlier = json.loads(read_text(filesystem, plan_path))
    if earlier == plan:
        return
    if not overwrite:
        what = "other data" if earlier.get("shards") != plan["shards"] else "another model"
        raise FileExistsError(f"{shown} holds a filter of {what}: pass --overwrite to replace it, or choose another --out")
    filesystem.delete_dir_contents(out)


def _remove_output_shards(filesystem: pafs.FileSystem, out: str) -> None:
    try:
        stale = list_files(filesystem, out, "parquet")
    except FileNotFoundError:
        stale = []
    for path in stale:
        filesystem.delete_file(path)
    if exists(filesystem, f"{out}/{SUMMARY_FILE}"):
        filesystem.delete_file(f"{out}/{SUMMARY_FILE}")


def _remove_partial_files(filesystem: pafs.FileSystem, out: str) -> None:
    """Files a killed filter left half-written (``….tmp-<pid>``, never read as shards)."""
    for info in filesystem.get_file_info(pafs.FileSelector(out, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
            filesystem.delete_file(info.path)


class _Progress:
    """One line every ``PROGRESS_EVERY_S`` seconds, and at the end."""

    def __init__(self, verb: str, shards: int, rows: int):
        self.verb, self.shards, self.rows, self.last = verb, shards, rows, 0.0

    def __call__(self, shards_done: int, rows_done: int, seconds: float) -> None:
        if seconds - self.last < PROGRESS_EVERY_S and shards_done < self.shards:
            return
        self.last = seconds
        rate = rows_done / max(seconds, 1e-9)
        left = (self.rows - rows_done) / rate if rate > 0 else math.inf
        eta = f", about {left / 60:.0f} min left" if shards_done < self.shards and math.isfinite(left) else ""
        say(f"{self.verb} {shards_done}/{self.shards} shards, {rows_done:,} of {self.rows:,} rows, {rate:,.0f} rows/s{eta}")


def _tally(filesystem, group: list[tuple[int, str]]) -> tuple[int, Counter]:
    rows, problems = 0, Counter()
    for _, path in group:
        table = read_scores(filesystem, path, ["problem"])
        rows += table.num_rows
        problems.update(p for p in table.column("problem").to_pylist() if p is not None)
    return rows, problems


def _write_filtered(filesystem, out_filesystem, shard: InputShard, kind: str, scores_path: str, duplicates: np.ndarray,
                    threshold: float, target: str) -> int:
    """One output shard (a Ray task): the shard's kept rows, written unless already there; its kept rows."""
    table = read_scores(filesystem=out_filesystem, path=scores_path, columns=["row", "score", "problem"])
    keep = candidate_mask(table, duplicates) & (table.column("score").to_numpy().astype(np.float64) >= threshold)
    kept = table.column("row").to_numpy()[keep]
    if len(kept) and not exists(out_filesystem, target):
        write_shard(out_filesystem, target, kept_rows_table(filesystem, shard, kind, np.sort(kept)))
    return int(len(kept))


def run_filter(data: str, out: str, scorer: ScorerModel, criteria: Criteria, *, s3: S3Config | None = None,
               use_gpu: bool = False, actors: int = 1, batch_size: int = 256, overwrite: bool = False) -> FilterReport:
    """Score, deduplicate, select and write (see the module docstring); Ray must be connected.

    Raises:
        FileNotFoundError: no shards at ``data``. FileExistsError: ``out`` is not this filter's.
        ValueError: a shard changed while being filtered, or the model gives non-finite scores.
    """
    started = time.perf_counter()
    in_fs, in_path = filesystem_for(data, s3)
    out_fs, out_path = filesystem_for(out, s3)
    kind = detect_format(in_fs, in_path)
    shards = list_input_shards(in_fs, in_path, kind)
    plan = _plan(display_uri(in_path, in_fs), kind, shards, scorer)
    prepare_out(out_fs, out_path, out, plan, overwrite)
    write_text_atomically(out_fs, _state(out_path, "plan.json"), json.dumps(plan))
    _remove_partial_files(out_fs, out_path)
    job = _Job(in_fs, out_fs, out_path, kind, shards)
    stages = _Stages()

    scored_now = job.score_missing(scorer, data, use_gpu=use_gpu, actors=actors, batch_size=batch_size)
    problems = job.problems()
    stages.done("scoring")
    duplicates = job.duplicates(sum(s.rows for s in shards) - sum(problems.values())) if criteria.dedup else {}
    stages.done("duplicates")
    candidates, threshold = job.select(criteria, duplicates)
    stages.done("selection")
    root = input_root(in_path, shards)
    kept, written = job.write(root, duplicates, threshold)
    stages.done("writing")
    classes = f"{root}/{CLASSES_FILE}"
    if exists(in_fs, classes):
        write_text_atomically(out_fs, f"{out_path}/{CLASSES_FILE}", read_text(in_fs, classes))
    report = FilterReport(len(shards), sum(s.rows for s in shards), dict(problems), sum(len(r) for r in duplicates.values()),
                          candidates, threshold if math.isfinite(threshold) else None, kept, written, scored_now,
                          time.perf_counter() - started, asdict(criteria), stages.seconds)
    write_text_atomically(out_fs, f"{out_path}/{SUMMARY_FILE}",
                          json.dumps({**asdict(report), "data": plan["data"], "model": scorer.described}, indent=2))
    return report


class _Stages:
    """Each stage's seconds, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.clock = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self.clock = now - self.clock, now


@dataclass
class _Job:
    """One filter's input shards and output folder, and its stages."""

    in_fs: pafs.FileSystem
    out_fs: pafs.FileSystem
    out: str
    kind: str
    shards: list[InputShard]

    def score_path(self, shard: InputShard) -> str:
        return score_file(_state(self.out, "scores"), shard.index)

    @property
    def score_files(self) -> list[tuple[int, str]]:
        return [(s.index, self.score_path(s)) for s in self.shards]

    def score_missing(self, scorer: ScorerModel, data: str, *, use_gpu: bool, actors: int, batch_size: int) -> int:
        """Score the shards without a score file; how many there were."""
        import ray

        todo = [s.index for s in self.shards if not exists(self.out_fs, self.score_path(s))]
        if not todo:
            return 0
        rows = sum(self.shards[i].rows for i in todo)
        say(f"scoring {rows:,} rows of {len(todo)} shards ({len(self.shards) - len(todo)} scored before) of {data} "
            f"with {scorer.described} on {actors} {'GPU' if use_gpu else 'CPU'} actor{'s' if actors > 1 else ''}")
        dataset = scoring_dataset(self.in_fs, self.shards, todo, self.kind, scorer.model, ray.put(scorer.files),
                                  use_gpu=use_gpu, actors=actors, batch_size=batch_size)
        collect_scores(dataset, self.shards, todo,
                       lambda index, table: write_score_file(self.out_fs, self.score_path(self.shards[index]), table),
                       _Progress("scored", len(todo), rows))
        return len(todo)

    def problems(self) -> Counter:
        """Bad rows by reason, from the score files (which must cover every input row).

        Raises:
            ValueError: they do not.
        """
        import ray

        files, total = self.score_files, sum(s.rows for s in self.shards)
        tallies = ray.get([ray.remote(num_cpus=1)(_tally).remote(self.out_fs, files[i:i + 64])
                           for i in range(0, len(files), 64)])
        if sum(t[0] for t in tallies) != total:
            raise ValueError(f"the score files under {display_uri(_state(self.out, 'scores'), self.out_fs)} do not "
                             f"cover the input's {total} rows")
        return sum((t[1] for t in tallies), Counter())

    def duplicates(self, good_rows: int) -> dict[int, np.ndarray]:
        """The rows that are copies of a better-scored image: found once, then read back."""
        saved = _state(self.out, "duplicates.parquet")
        if exists(self.out_fs, saved):
            return load_duplicates(self.out_fs, saved)
        say("finding exact duplicate images")
        found = find_duplicates(self.out_fs, [path for _, path in self.score_files], good_rows)
        save_duplicates(self.out_fs, saved, found)
        return found

    def select(self, criteria: Criteria, duplicates: dict[int, np.ndarray]) -> tuple[int, float]:
        """``(candidates, threshold)``; the shards of other criteria's earlier run are removed."""
        files = self.score_files
        candidates, low, high = candidate_count(self.out_fs, files, duplicates)
        if criteria.keep_fraction is not None:
            wanted = min(candidates, max(1, round(criteria.keep_fraction * candidates)))
            threshold = kth_best_score(self.out_fs, files, duplicates, wanted, low, high) if candidates else math.inf
        else:
            threshold = criteria.min_score if criteria.min_score is not None else -math.inf
        selection = {"criteria": asdict(criteria), "threshold": threshold if math.isfinite(threshold) else None}
        path = _state(self.out, "selection.json")
        if exists(self.out_fs, path) and json.loads(read_text(self.out_fs, path)) != selection:
            say("other criteria than the last run's: the scores stay, the shards are written anew")
            _remove_output_shards(self.out_fs, self.out)
        write_text_atomically(self.out_fs, path, json.dumps(selection))
        return candidates, threshold

    def write(self, root: str, duplicates: dict[int, np.ndarray], threshold: float) -> tuple[int, int]:
        """Every shard's kept rows (Ray tasks, a bounded number at a time); ``(rows kept, shards written)``."""
        import ray

        task = ray.remote(num_cpus=1)(_write_filtered)
        in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        waiting, pending = deque(self.shards), {}
        kept, written, rows_done = 0, 0, 0
        progress, started = _Progress("wrote", len(self.shards), sum(s.rows for s in self.shards)), time.perf_counter()
        while waiting or pending:
            while waiting and len(pending) < in_flight:
                shard = waiting.popleft()
                ref = task.remote(self.in_fs, self.out_fs, shard, self.kind, self.score_path(shard),
                                  duplicates.get(shard.index, NO_ROWS), threshold, f"{self.out}/{output_name(shard, root)}")
                pending[ref] = shard
            ready, _ = ray.wait(list(pending), num_returns=1)
            count = ray.get(ready[0])
            kept, written, rows_done = kept + count, written + (count > 0), rows_done + pending.pop(ready[0]).rows
            progress(len(self.shards) - len(waiting) - len(pending), rows_done, time.perf_counter() - started)
        return kept, written
