"""jobs/filter.py's stages on a local Ray: scores against the model's own embeddings, exact
duplicates, the kept fraction, re-selection from saved scores, resuming, WebDataset input, refusals."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from job_modules import load_job
from pretrained_models import save_tiny_clip
from webdataset_tars import write_webdataset

from vcl_dist.curation.filter_run import Criteria, prepare_out, run_filter
from vcl_dist.curation.scorer_model import pretrained_scorer
from vcl_dist.curation.selection import duplicates_in_block, kth_best_score

SHARD_ROWS = 128
COPIES = [(0, 130, 300), (5, 6)]  # rows showing one image each
BAD = {7: "unusable image", 200: "empty caption", 400: "label is no class id"}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, local_ray):
    return pretrained_scorer(str(save_tiny_clip(tmp_path_factory.mktemp("clip"))))


@pytest.fixture(scope="module")
def dataset(shapes, tmp_path_factory) -> tuple[Path, dict]:
    """512 rows in 4 Parquet shards, with copied images and bad rows planted."""
    table = pq.read_table(sorted((shapes / "train").glob("*.parquet"))).slice(0, 4 * SHARD_ROWS)
    rows = {name: table.column(name).to_pylist() for name in table.column_names}
    for first, *others in COPIES:
        for other in others:
            rows["image"][other] = rows["image"][first]
    rows["image"][7], rows["caption"][200], rows["label"][400] = b"no picture", "  ", -5
    root = tmp_path_factory.mktemp("filter-data") / "shards"
    root.mkdir()
    for shard in range(4):
        part = {name: values[shard * SHARD_ROWS:(shard + 1) * SHARD_ROWS] for name, values in rows.items()}
        pq.write_table(pa.table(part, schema=table.schema), root / f"part-{shard:03d}.parquet")
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(30)) + "\n")
    return root, rows


def reference_scores(scorer, rows: dict) -> np.ndarray:
    """Each good row's cosine from the model's own encoders, in float64; NaN for bad rows."""
    model = scorer.model
    scores = np.full(len(rows["key"]), np.nan)
    good = [i for i in range(len(scores)) if i not in BAD]
    with torch.no_grad():
        images = model.encode_images([rows["image"][i] for i in good]).double()
        texts = model.encode_texts([rows["caption"][i] for i in good]).double()
    scores[good] = torch.nn.functional.cosine_similarity(images, texts, dim=1).numpy()
    return scores


def saved_scores(out: Path) -> np.ndarray:
    table = pq.read_table(sorted((out / "_filter" / "scores").glob("*.parquet")))
    return table.column("score").to_numpy()  # shards in order, rows in order


def kept_keys(out: Path) -> set[str]:
    files = sorted(p for p in out.rglob("*.parquet") if "_filter" not in p.parts)
    return {key for file in files for key in pq.read_table(file).column("key").to_pylist()}


def expected_keep(scores: np.ndarray, fraction: float | None = None, min_score: float | None = None) -> set[int]:
    """The rows a filter must keep, from the saved scores: the best-scored copy of each image,
    then the best ``fraction`` of those (ties kept) or those at ``min_score`` and above."""
    candidates = {i for i in range(len(scores)) if math.isfinite(scores[i])}
    for copies in COPIES:
        best = max(copies, key=lambda i: (scores[i], -i))
        candidates -= set(copies) - {best}
    if fraction is not None:
        k = max(1, round(fraction * len(candidates)))
        min_score = sorted((scores[i] for i in candidates), reverse=True)[k - 1]
    return {i for i in candidates if scores[i] >= min_score}


@pytest.fixture(scope="module")
def filtered(scorer, dataset, tmp_path_factory):
    """The dataset filtered to its best 40 %: the output folder and the report."""
    out = tmp_path_factory.mktemp("filtered") / "kept"
    return out, run_filter(str(dataset[0]), str(out), scorer, Criteria(keep_fraction=0.4), actors=2, batch_size=48)


def test_a_filter_keeps_the_best_fraction_of_distinct_good_pairs_as_shards(scorer, dataset, filtered):
    root, rows = dataset
    out, report = filtered

    scores = saved_scores(out)
    reference = reference_scores(scorer, rows)
    np.testing.assert_allclose(scores, reference, atol=2e-6)  # NaN where the row is bad, in both
    keep = expected_keep(scores, fraction=0.4)
    assert kept_keys(out) == {rows["key"][i] for i in keep}
    assert report.kept == len(keep) and report.rows == 512 and report.scored_now == 4
    assert report.bad_rows == {"unusable image": 1, "empty caption": 1, "label is no class id": 1}
    assert report.duplicates == 3 and report.candidates == 512 - 3 - 3
    # The shards keep their own columns and rows, under the input's names, beside its class names.
    first = pq.read_table(out / "part-000.parquet")
    assert first.schema == pq.read_schema(root / "part-000.parquet")
    for row in first.to_pylist():
        i = rows["key"].index(row["key"])
        assert row == {name: rows[name][i] for name in row}
    assert (out / "classes.txt").read_text() == (root / "classes.txt").read_text()
    summary = json.loads((out / "_filter.json").read_text())
    assert summary["kept"] == len(keep) and summary["threshold"] == pytest.approx(min(scores[i] for i in keep))



def test_tars_filter_to_the_same_rows_as_parquet(scorer, dataset, filtered, tmp_path):
    root, rows = dataset
    tars = tmp_path / "tars"
    write_webdataset({**rows, "image_id": [None] * 512}, tars, per_tar=SHARD_ROWS)
    run_filter(str(tars), str(tmp_path / "from-tars"), scorer, Criteria(keep_fraction=0.4), actors=2)
    assert kept_keys(tmp_path / "from-tars") == kept_keys(filtered[0])
    table = pq.read_table(tmp_path / "from-tars" / "shard-00000.parquet")
    assert table.schema.names == ["key", "image", "caption", "label", "image_id"]
    i = rows["key"].index(table.column("key")[0].as_py())
    assert table.slice(0, 1).to_pylist()[0] == {"key": rows["key"][i], "image": rows["image"][i],
                                                "caption": rows["caption"][i].strip(), "label": rows["label"][i],
                                                "image_id": None}


def test_other_criteria_reuse_the_scores_and_write_the_shards_anew(scorer, dataset, filtered):
    root, rows = dataset
    out = filtered[0]
    scores = saved_scores(out)
    report = run_filter(str(root), str(out), scorer, Criteria(min_score=0.05, dedup=False), actors=2)
    assert report.scored_now == 0 and report.duplicates == 0
    assert kept_keys(out) == {rows["key"][i] for i in range(512) if scores[i] >= 0.05}


def test_a_killed_filter_rescores_only_unfinished_shards_and_ends_as_an_uninterrupted_one(scorer, dataset, filtered,
                                                                                          tmp_path):
    root, rows = dataset
    out = tmp_path / "kept"
    shutil.copytree(filtered[0], out)
    whole = saved_scores(out)
    # As a filter killed while scoring leaves it: two shards scored, one half-written file, no shards yet.
    for name in ("_filter/scores/000001.parquet", "_filter/scores/000003.parquet", "_filter/duplicates.parquet",
                 "_filter/selection.json", "_filter.json"):
        (out / name).unlink()
    for shard in out.glob("part-*.parquet"):
        shard.unlink()
    (out / "part-002.parquet.tmp-4242").write_bytes(b"half a shard")
    report = run_filter(str(root), str(out), scorer, Criteria(keep_fraction=0.4), actors=2)
    assert report.scored_now == 2
    np.testing.assert_array_equal(saved_scores(out), whole)
    assert kept_keys(out) == {rows["key"][i] for i in expected_keep(whole, fraction=0.4)}
    assert not list(out.rglob("*.tmp-*"))


def test_an_out_folder_of_something_else_or_another_filter_is_refused(scorer, dataset, filtered, tmp_path, capsys):
    root, _ = dataset
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds no filter output"):
            run_filter(str(root), str(mine), scorer, Criteria(), actors=1, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"

    out = tmp_path / "kept"
    shutil.copytree(filtered[0], out)
    other = pretrained_scorer(str(save_tiny_clip(tmp_path / "other-clip", seed=1)))
    with pytest.raises(FileExistsError, match="holds a filter of another model: pass --overwrite"):
        run_filter(str(root), str(out), other, Criteria(min_score=0.0), actors=1)
    assert (out / "_filter.json").exists()
    fs = pafs.LocalFileSystem()
    plan = json.loads((out / "_filter" / "plan.json").read_text())
    prepare_out(fs, str(out), str(out), {**plan, "model_fingerprint": other.fingerprint}, overwrite=True)
    assert not list(out.iterdir())  # an earlier filter's folder, emptied for the new one

    for criteria, message in (({"min_score": 0.1, "keep_fraction": 0.5}, "not both"),
                              ({"keep_fraction": 0.0}, r"must be in \(0, 1\]"), ({"min_score": math.nan}, "finite")):
        with pytest.raises(ValueError, match=message):
            Criteria(**criteria)
    filter_job = load_job("filter")
    capsys.readouterr()
    for scorer_args, code, message in ((["--model", str(tmp_path / "no-run")], 1, "vcl-dist: error: "),
                                       (["--init", str(tmp_path / "no-clip")], 2, "vcl-dist: config error: model.init")):
        assert filter_job.main(["--data", str(root), "--out", str(tmp_path / "x"), *scorer_args]) == code
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(message)
    with pytest.raises(SystemExit) as stopped:
        filter_job.main(["--data", str(root), "--out", str(tmp_path / "x"), "--init", "a", "--model", "b"])
    assert stopped.value.code == 2


def test_duplicates_in_a_block_are_every_copy_but_the_best_scored():
    rng = np.random.default_rng(3)
    n = 400
    image = rng.integers(0, 120, n)  # ~120 distinct images, most of them copied
    digests = [int(i).to_bytes(32, "big") for i in image]
    scores = np.round(rng.normal(size=n), 1).astype(np.float32)  # ties in score too
    block = pa.table({"shard": pa.array(np.arange(n) // 100, pa.int32()), "row": pa.array(np.arange(n) % 100, pa.int64()),
                      "score": scores, "image_sha256": pa.array(digests, pa.binary(32))})
    found = duplicates_in_block(block)
    dropped = set(zip(found.column("shard").to_pylist(), found.column("row").to_pylist()))
    expected = set()
    for value in np.unique(image):
        rows = np.flatnonzero(image == value)
        best = min(rows, key=lambda i: (-scores[i], i))
        expected |= {(int(i) // 100, int(i) % 100) for i in rows if i != best}
    assert dropped == expected


def test_the_kth_best_score_is_exact_across_score_files(local_ray, tmp_path):
    rng = np.random.default_rng(5)
    files, every = [], []
    for index in range(5):
        scores = rng.normal(0.2, 0.1, 300).astype(np.float32)
        scores[:40] = scores[40]  # a run of ties
        problem = [None] * 300
        problem[7] = "empty caption"
        path = tmp_path / f"{index:06d}.parquet"
        pq.write_table(pa.table({"row": np.arange(300), "score": scores, "problem": pa.array(problem, pa.string())}), path)
        files.append((index, str(path)))
        duplicates = np.array([3, 11]) if index == 2 else np.zeros(0, np.int64)
        keep = np.ones(300, bool)
        keep[[7, *duplicates]] = False
        every.append(scores[keep].astype(np.float64))
    every = np.sort(np.concatenate(every))[::-1]
    dups = {2: np.array([3, 11])}
    fs = pafs.LocalFileSystem()
    for k in (1, 2, 37, 700, len(every)):
        assert kth_best_score(fs, files, dups, k, float(every.min()), float(every.max())) == every[k - 1]
    assert ray.is_initialized()
