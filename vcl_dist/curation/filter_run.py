"""A filter from start to end, resumable at every stage (``jobs/filter.py``).

The output folder holds the filtered shards and, under ``_filter/`` (which shard readers skip),
what the filter has done so far:

- ``plan.json``: the input shards with their rows and the scoring model's fingerprint; a rerun
  on other data or with another model is refused rather than mixed in;
- ``scores/<shard>.parquet``: every row's score, image hash and problem (:mod:`.scoring`),
  written shard by shard: a killed filter rescores only the shards it was in the middle of;
- ``duplicates.parquet``: the rows that are copies of a better-scored image (:mod:`.selection`);
- ``selection.json``: the criteria and the threshold they came to. A rerun with other criteria
  keeps the scores and duplicates and writes the shards anew.

``_filter.json`` is written last: its presence marks a complete filtered copy.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
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
    import ray

    started = time.perf_counter()
    in_fs, in_path = filesystem_for(data, s3)
    out_fs, out_path = filesystem_for(out, s3)
    kind = detect_format(in_fs, in_path)
    shards = list_input_shards(in_fs, in_path, kind)
    plan = _plan(display_uri(in_path, in_fs), kind, shards, scorer)
    prepare_out(out_fs, out_path, out, plan, overwrite)
    write_text_atomically(out_fs, _state(out_path, "plan.json"), json.dumps(plan))
    _remove_partial_files(out_fs, out_path)
    scores = _state(out_path, "scores")

    def score_path(shard: InputShard) -> str:
        return score_file(scores, shard.index)

    clock = time.perf_counter()
    stages: dict[str, float] = {}

    def stage_done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name], clock = now - clock, now

    todo = [s.index for s in shards if not exists(out_fs, score_path(s))]
    total = sum(s.rows for s in shards)
    if todo:
        rows = sum(shards[i].rows for i in todo)
        say(f"scoring {rows:,} rows of {len(todo)} shards ({len(shards) - len(todo)} scored before) of {data} "
            f"with {scorer.described} on {actors} {'GPU' if use_gpu else 'CPU'} actor{'s' if actors > 1 else ''}")
        dataset = scoring_dataset(in_fs, shards, todo, kind, scorer.model, ray.put(scorer.files), use_gpu=use_gpu,
                                  actors=actors, batch_size=batch_size)
        collect_scores(dataset, shards, todo, lambda index, table: write_score_file(out_fs, score_path(shards[index]), table),
                       _Progress("scored", len(todo), rows))
    files = [(s.index, score_path(s)) for s in shards]
    tallies = ray.get([ray.remote(num_cpus=1)(_tally).remote(out_fs, files[i:i + 64]) for i in range(0, len(files), 64)])
    problems = sum((t[1] for t in tallies), Counter())
    if sum(t[0] for t in tallies) != total:
        raise ValueError(f"the score files under {display_uri(scores, out_fs)} do not cover the input's {total} rows")
    stage_done("scoring")

    duplicates: dict[int, np.ndarray] = {}
    if criteria.dedup:
        saved = _state(out_path, "duplicates.parquet")
        if exists(out_fs, saved):
            duplicates = load_duplicates(out_fs, saved)
        else:
            say("finding exact duplicate images")
            duplicates = find_duplicates(out_fs, [path for _, path in files], total - sum(problems.values()))
            save_duplicates(out_fs, saved, duplicates)
    stage_done("duplicates")
    candidates, low, high = candidate_count(out_fs, files, duplicates)
    if criteria.keep_fraction is not None:
        wanted = min(candidates, max(1, round(criteria.keep_fraction * candidates)))
        threshold = kth_best_score(out_fs, files, duplicates, wanted, low, high) if candidates else math.inf
    else:
        threshold = criteria.min_score if criteria.min_score is not None else -math.inf

    selection = {"criteria": asdict(criteria), "threshold": threshold if math.isfinite(threshold) else None}
    selection_path = _state(out_path, "selection.json")
    if exists(out_fs, selection_path) and json.loads(read_text(out_fs, selection_path)) != selection:
        say("other criteria than the last run's: the scores stay, the shards are written anew")
        _remove_output_shards(out_fs, out_path)
    write_text_atomically(out_fs, selection_path, json.dumps(selection))
    stage_done("selection")

    root = input_root(in_path, shards)
    task = ray.remote(num_cpus=1)(_write_filtered)
    pending = {task.remote(in_fs, out_fs, s, kind, score_path(s), duplicates.get(s.index, NO_ROWS), threshold,
                           f"{out_path}/{output_name(s, root)}"): s for s in shards}
    kept, written, progress = 0, 0, _Progress("wrote", len(shards), total)
    write_started, rows_done = time.perf_counter(), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        count = ray.get(ready[0])
        kept, written, rows_done = kept + count, written + (count > 0), rows_done + pending.pop(ready[0]).rows
        progress(len(shards) - len(pending), rows_done, time.perf_counter() - write_started)
    stage_done("writing")
    classes = f"{root}/{CLASSES_FILE}"
    if exists(in_fs, classes):
        write_text_atomically(out_fs, f"{out_path}/{CLASSES_FILE}", read_text(in_fs, classes))
    report = FilterReport(len(shards), total, dict(problems), sum(len(r) for r in duplicates.values()), candidates,
                          selection["threshold"], kept, written, len(todo), time.perf_counter() - started, asdict(criteria),
                          stages)
    write_text_atomically(out_fs, f"{out_path}/{SUMMARY_FILE}",
                          json.dumps({**asdict(report), "data": plan["data"], "model": scorer.described}, indent=2))
    return report
