"""Data at scale, with real components: an S3-compatible server (moto) on loopback, WebDataset
tars, bad rows, and the split of every epoch across workers."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hostile_inputs import plant_hostile_rows
from job_modules import load_job
from s3_server import s3_filesystem
from webdataset_tars import write_webdataset

from vcl_dist.config import load_config
from vcl_dist.data.datasets import build_split, build_train_split, resolve_source
from vcl_dist.data.epoch_plan import fresh_ranges, resume_ranges
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.train.fatal import RunEndedByFatalError
from vcl_dist.train.runner import run_training


def test_unreachable_bucket_is_a_one_line_error(s3_endpoint, repo_root):
    cfg = load_config(repo_root / "jobs/configs/default.yaml", [
        f"s3.endpoint_url={s3_endpoint}", "data.source=parquet",
        "data.train_path=s3://no-such-bucket/train", "data.val_path=s3://no-such-bucket/val",
    ])
    with pytest.raises(FileNotFoundError) as err:
        resolve_source(cfg.data, cfg.s3)
    assert "\n" not in str(err.value) and "no-such-bucket" in str(err.value)


def test_an_index_is_built_beside_a_corpus_in_s3_and_answers_from_there(s3_endpoint, s3_local_ray, tmp_path):
    """``jobs/index.py`` on an ``s3://`` corpus: the index lands in the bucket beside it, loads
    from there (a local copy for the process) and answers as the exact scan of that corpus."""
    import boto3
    import torch

    from corpora import clustered, write_corpus
    from vcl_dist.config import S3Config
    from vcl_dist.evaluate import similarity
    from vcl_dist.retrieval.ann_index import LoadedIndex
    from vcl_dist.retrieval.search import Corpus

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="vcl-corpus")
    rng = np.random.default_rng(3)
    images, texts = clustered(rng, 1500, 16, 12), clustered(rng, 1500, 16, 12)
    local = write_corpus(tmp_path / "corpus", images, texts, normalized=True)
    fs = s3_filesystem(s3_endpoint)
    pafs.copy_files(str(local), "vcl-corpus/val", destination_filesystem=fs)

    uri = "s3://vcl-corpus/val"
    assert load_job("index").main(["--corpus", uri, "--kind", "flat", f"s3.endpoint_url={s3_endpoint}"]) == 0
    stored = {info.base_name for info in fs.get_file_info(pafs.FileSelector("vcl-corpus/val/_index/image"))}
    assert {"index.faiss", "index.json"} <= stored, stored

    corpus = Corpus(uri, S3Config(endpoint_url=s3_endpoint))
    index = LoadedIndex(corpus, "image")

    def rank(queries, items):
        return similarity(queries, items, True)

    for query in torch.from_numpy(texts[:10]):
        assert [h.key for h in corpus.search(query, rank, k=5, index=index)] == [h.key for h in corpus.search(query, rank, k=5)]


def test_webdataset_row_count_uses_img2dataset_stats_when_every_tar_has_them(tmp_path):
    from vcl_dist.data.webdataset import webdataset_row_count

    rows = {"key": [f"s{i:03d}" for i in range(25)], "image": [b"not decoded here"] * 25, "caption": ["a red circle"] * 25,
            "label": [1] * 25, "image_id": [f"s{i:03d}" for i in range(25)]}
    folder = tmp_path / "wds"
    write_webdataset(rows, folder, per_tar=10)  # 3 tars: 10, 10, 5
    fs = pafs.LocalFileSystem()
    assert webdataset_row_count(fs, str(folder)) == 25
    for name, successes in (("shard-00000", 10), ("shard-00001", 10)):
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": 12, "successes": successes}))
    assert webdataset_row_count(fs, str(folder)) == 25  # one tar without stats: all are read
    # With stats for every tar, the count comes from them (4, not 5: the tars are not read).
    (folder / "shard-00002_stats.json").write_text(json.dumps({"count": 6, "successes": 4}))
    assert webdataset_row_count(fs, str(folder)) == 24


def test_webdataset_samples_are_read_by_index_with_a_sample_without_image_counted(tmp_path):
    from vcl_dist.data.webdataset import read_tar_rows, webdataset_tar_rows

    rows = {"key": [f"s{i:03d}" for i in range(12)], "image": [f"png {i}".encode() for i in range(12)],
            "caption": [f"caption {i}" for i in range(12)], "label": [1] * 12, "image_id": [f"s{i:03d}" for i in range(12)]}
    rows["image"][4] = None  # a sample of caption, class and json only: a row (a bad one), not a gap
    write_webdataset(rows, tmp_path / "wds", per_tar=6)
    fs = pafs.LocalFileSystem()
    tars = webdataset_tar_rows(fs, str(tmp_path / "wds"))
    assert [n for _, n in tars] == [6, 6]
    columns = read_tar_rows(fs, tars[0][0], [1, 4, 5])
    assert list(columns["__key__"]) == ["s001", "s004", "s005"]
    assert list(columns["png"]) == [b"png 1", None, b"png 5"] and list(columns["txt"]) == [b"caption 1", b"caption 4", b"caption 5"]
    with pytest.raises(ValueError, match="shard-00001.tar: ends before its sample 8, which the training plan counted"):
        read_tar_rows(fs, tars[1][0], [2, 7])


def test_shard_paths_may_be_folders_globs_or_files_and_bookkeeping_is_no_shard(tmp_path):
    from vcl_dist.storage import list_files

    for name in ("a/part-0.parquet", "a/part-1.parquet", "a/classes.txt", "b/part-0.parquet", "b/deeper/part-9.parquet",
                 "a/_filter/scores/000000.parquet", "a/.staging/part-0.parquet", "a/_part-2.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    assert list_files(fs, f"{root}/a", "parquet") == [f"{root}/a/part-0.parquet", f"{root}/a/part-1.parquet"]
    assert list_files(fs, f"{root}/b", "parquet") == [f"{root}/b/deeper/part-9.parquet", f"{root}/b/part-0.parquet"]
    assert list_files(fs, f"{root}/*/part-0.parquet", "parquet") == [f"{root}/a/part-0.parquet", f"{root}/b/part-0.parquet"]
    assert list_files(fs, f"{root}/a/part-[1].parquet", "parquet") == [f"{root}/a/part-1.parquet"]
    assert list_files(fs, f"{root}/a/part-1.parquet", "parquet") == [f"{root}/a/part-1.parquet"]
    for missing in (f"{root}/c", f"{root}/*/none-*.parquet", f"{root}/a/classes.txt.parquet"):
        with pytest.raises(FileNotFoundError, match="no .parquet files at") as err:
            list_files(fs, missing, "parquet")
        assert "\n" not in str(err.value)


def preprocessed_by_key(source, path, cfg, tokenizer):
    rows = build_split(source, path, cfg.data, tokenizer, num_classes=30).take_all()
    return {row["key"]: row for row in rows}


def test_webdataset_shards_give_the_same_rows_as_parquet(s3_local_ray, shapes, tiny_shapes_overrides, repo_root, tmp_path):
    val = pq.read_table(sorted((shapes / "val").glob("*.parquet"))).to_pydict()
    tokenizer = train_wordpiece(val["caption"], vocab_size=300)
    # The same hostile rows in both formats (captions as bytes: one is not UTF-8).
    val["label"] = [str(label) for label in val["label"]]
    val["caption"] = [caption.encode() for caption in val["caption"]]
    plant_hostile_rows(val, list(range(3, 128, 8)))
    write_webdataset(val, tmp_path / "wds")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table(val), tmp_path / "pq" / "val.parquet")
    base = [*tiny_shapes_overrides, f"data.val_path={shapes / 'val'}"]
    parquet_cfg = load_config(None, [*base, "data.source=parquet", f"data.train_path={tmp_path / 'pq'}"])
    wds_cfg = load_config(None, [*base, "data.source=webdataset", f"data.train_path={tmp_path / 'wds'}"])
    parquet_source, wds_source = resolve_source(parquet_cfg.data), resolve_source(wds_cfg.data)
    from_parquet = preprocessed_by_key(parquet_source, parquet_source.train, parquet_cfg, tokenizer)
    from_tars = preprocessed_by_key(wds_source, wds_source.train, wds_cfg, tokenizer)
    assert from_parquet.keys() == from_tars.keys() and len(from_tars) == 128
    assert sum(not row["valid"] for row in from_tars.values()) == 16  # every planted row, none else
    for key, row in from_parquet.items():
        other = from_tars[key]
        for column in ("image", "input_ids", "attention_mask", "label", "group", "valid"):
            assert np.array_equal(row[column], other[column]), (key, column)


def corrupt_copy(shapes: Path, out: Path) -> dict:
    """The shapes splits with hostile rows planted (and odd images that must decode), labels
    as text and captions as bytes so that one column can hold every kind; the train split in
    two shards, one with more bad rows. Returns how many bad rows each shard got."""
    from hostile_inputs import GOOD_ODD_IMAGES

    planted = {}
    for split in ("train", "val"):
        table = pq.read_table(sorted((shapes / split).glob("*.parquet"))).to_pydict()
        table["label"] = [str(label) for label in table["label"]]
        table["caption"] = [caption.encode() for caption in table["caption"]]
        for i, make in enumerate(GOOD_ODD_IMAGES.values()):
            table["image"][1 + 2 * i] = make()
        n = len(table["key"])
        (out / split).mkdir(parents=True)
        if split == "train":  # "train-worst": a bad row in 20; "train-fewer": one in 40
            parts = {"train-worst": (0, n // 2, 20), "train-fewer": (n // 2, n, 40)}
        else:
            parts = {"val-bad": (0, n, 30)}
        for name, (start, stop, every) in parts.items():
            part = {column: values[start:stop] for column, values in table.items()}
            bad = list(range(0, stop - start, every))
            plant_hostile_rows(part, bad)
            schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.binary()), ("label", pa.string()),
                                ("image_id", pa.string())])
            pq.write_table(pa.table(part, schema=schema), out / split / f"{name}.parquet")
            planted[name] = len(bad)
    (out / "val" / "classes.txt").write_text((shapes / "classes.txt").read_text())
    return planted


def test_bad_rows_are_skipped_counted_and_fatal_past_the_limit(s3_local_ray, shapes, tiny_shapes_overrides, repo_root, tmp_path):
    planted = corrupt_copy(shapes, tmp_path / "data")
    base = [*tiny_shapes_overrides, "data.source=parquet", f"data.train_path={tmp_path / 'data/train'}",
            f"data.val_path={tmp_path / 'data/val'}", f"run.storage_path={tmp_path / 'runs'}"]
    cfg = load_config(repo_root / "jobs/configs/default.yaml", [*base, "train.epochs=1", "data.max_bad_fraction=0.05", "run.name=ok"])
    outcome = run_training(cfg)
    metrics = outcome.history[-1]
    # Every planted train row is counted once (the equal split and full batches see all 512
    # rows); the odd images (CMYK, 16-bit, palette, RGBA, EXIF-rotated) are good rows.
    assert planted == {"train-worst": 13, "train-fewer": 7, "val-bad": 5}
    assert metrics["bad_rows"] == 20
    assert metrics["val_bad_rows"] == 5
    assert metrics["val_num_captions"] == 128 - 5
    result = json.loads((tmp_path / "runs" / "ok" / "result.json").read_text())
    worst = [(Path(s["shard"]).name, s["bad_rows"]) for s in result["throughput"]["bad_rows_worst_shards"]]
    assert worst == [("train-worst.parquet", 13), ("train-fewer.parquet", 7)]
    assert [(Path(s["shard"]).name, s["bad_rows"]) for s in result["throughput"]["val_bad_rows_worst_shards"]] == [("val-bad.parquet", 5)]

    # Past the limit: one line naming the worst shard over all workers, and no retry although
    # the run allows restarts (the same rows would stop it again).
    strict = load_config(repo_root / "jobs/configs/default.yaml",
                         [*base, "train.epochs=1", "data.max_bad_fraction=0.01", "train.max_failures=3", "run.name=strict"])
    with pytest.raises(RunEndedByFatalError) as err:
        run_training(strict)
    message = str(err.value)  # what jobs/train.py prints after "vcl-dist: training failed: "
    assert "\n" not in message and message.startswith("BadDataError: ")
    assert "data.max_bad_fraction=0.01" in message and "most in shard" in message and "train-worst.parquet (13 rows)" in message


def test_training_rows_are_seeded_and_resume_exactly_on_the_built_in_data_parquet_and_webdataset(
        s3_local_ray, shapes, tiny_shapes_overrides, tmp_path):
    """What every worker reads is a function of (seed, epoch, its share of the stream): read
    twice, the same rows in the same order with the same augmentation; a share continued after
    a checkpoint gives exactly the rows that followed. The same key is augmented alike in every
    format (its crop is drawn from (seed, epoch, key))."""
    write_webdataset(pq.read_table(sorted((shapes / "train").glob("*.parquet"))).to_pydict(), tmp_path / "wds")
    tokenizer = train_wordpiece(["a red circle"] * 4, vocab_size=64)
    all_keys = sorted(pq.read_table(sorted((shapes / "train").glob("*.parquet")), columns=["key"]).column(0).to_pylist())
    formats = {
        "shapes": [],
        "parquet": ["data.source=parquet", f"data.train_path={shapes / 'train'}", f"data.val_path={shapes / 'val'}"],
        "webdataset": ["data.source=webdataset", f"data.train_path={tmp_path / 'wds'}", f"data.val_path={shapes / 'val'}"],
    }

    def read(split, epoch, share) -> list[tuple[str, bytes]]:
        return [(str(key), image.tobytes()) for batch in split.batches(epoch, share, 32, 1)
                for key, image in zip(batch["key"], batch["image"])]

    images_by_format = []
    for name, overrides in formats.items():
        cfg = load_config(None, [*tiny_shapes_overrides, *overrides, "data.shuffle_buffer=100"])
        source = resolve_source(cfg.data)
        split = build_train_split(source, source.train, cfg.data, tokenizer, seed=1)
        shares = fresh_ranges(split.rows, 2)
        epoch0 = [read(split, 0, share) for share in shares]
        assert sorted(key for rows in epoch0 for key, _ in rows) == all_keys, name  # every row once
        assert read(split, 0, shares[0]) == epoch0[0], name  # same rows, order and augmentation
        epoch1 = read(split, 1, shares[0])
        assert [k for k, _ in epoch1] != [k for k, _ in epoch0[0]], name  # a new order every epoch
        assert dict(epoch1) != {k: v for k, v in epoch0[0] + epoch0[1] if k in dict(epoch1)}, name  # new crops
        # Two batches of 32 trained on each worker, then a restart: worker 1 goes on with its 65th row.
        assert read(split, 0, resume_ranges(shares, [64, 64], 2)[1]) == epoch0[1][64:], name
        images_by_format.append(dict(epoch0[0] + epoch0[1]))
    assert images_by_format[0] == images_by_format[1] == images_by_format[2]


def test_weighted_sources_one_local_one_in_s3_draw_their_shares_and_resume_exactly(
        s3_endpoint, s3_local_ray, shapes, tiny_shapes_overrides, repo_root, tmp_path):
    """data.sources: the shapes training rows as two sources — 384 rows in a local folder and
    128 in a bucket, weights 1 and 3 — every epoch of 512 rows draws 128 from the big one and
    384 from the small one (upsampled, with replacement); workers read exactly those rows, a resumed share goes on
    with the rows that followed, and the run reports the mixture of every epoch."""
    import boto3

    table = pq.read_table(sorted((shapes / "train").glob("*.parquet")))
    (tmp_path / "big").mkdir()
    pq.write_table(table.slice(0, 384), tmp_path / "big" / "part-0.parquet", row_group_size=100)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="vcl-small")
    pq.write_table(table.slice(384), "vcl-small/train/part-0.parquet", filesystem=s3_filesystem(s3_endpoint))
    small_keys = set(table.slice(384).column("key").to_pylist())
    overrides = [*tiny_shapes_overrides, "data.source=parquet", f"data.val_path={shapes / 'val'}",
                 f"s3.endpoint_url={s3_endpoint}", "data.epoch_rows=512", "data.shuffle_buffer=100",
                 f"data.sources=[{{path: {tmp_path / 'big'}, weight: 1}}, "
                 "{path: 's3://vcl-small/train', weight: 3, replacement: true, name: small}]"]
    cfg = load_config(repo_root / "jobs/configs/default.yaml", overrides)
    from vcl_dist.train.run_inputs import prepare_inputs

    inputs = prepare_inputs(cfg)
    split = build_train_split(inputs.source, inputs.train_units, cfg.data, inputs.tokenizer, seed=1,
                              sources=inputs.train_sources)
    assert split.rows == 512 and split.drawn_rows(0) == {"big": 128, "small": 384}

    def read(epoch, share):
        return [str(key) for batch in split.batches(epoch, share, 32, 1) for key in batch["key"]]

    shares = fresh_ranges(split.rows, 2)
    epoch0 = [read(0, share) for share in shares]
    keys = [k for rows in epoch0 for k in rows]
    assert len(keys) == 512 and sum(k in small_keys for k in keys) == 384  # to the row
    assert len(set(keys) - small_keys) == 128  # the big source without replacement: no row twice
    assert read(0, resume_ranges(shares, [64, 64], 2)[1]) == epoch0[1][64:]
    later = {k for k in read(1, shares[0]) + read(1, shares[1]) if k not in small_keys}
    assert not later & set(keys)  # the next epoch goes on with the big source's rows not drawn yet

    outcome = run_training(load_config(repo_root / "jobs/configs/default.yaml",
                                       [*overrides, "train.epochs=2", f"run.storage_path={tmp_path / 'runs'}"]))
    assert [epoch["source_rows"] for epoch in outcome.history] == [{"big": 128, "small": 384}] * 2


def test_a_shard_garbled_after_planning_gives_bad_rows_and_the_others_read_on(s3_local_ray, shapes, tiny_shapes_overrides,
                                                                               tmp_path):
    """A shard overwritten mid-run (its footer was read when the split was planned): its rows come
    back as bad rows named by shard and row, every other row as it was."""
    import shutil

    shutil.copytree(shapes, tmp_path / "data")
    table = pq.read_table(sorted((tmp_path / "data/train").glob("*.parquet")))
    for path in (tmp_path / "data/train").glob("*.parquet"):
        path.unlink()
    for i in range(4):  # four shards of 128 rows
        pq.write_table(table.slice(128 * i, 128), tmp_path / f"data/train/part-{i}.parquet")
    cfg = load_config(None, [*tiny_shapes_overrides, "data.source=parquet", f"data.train_path={tmp_path / 'data/train'}",
                             f"data.val_path={tmp_path / 'data/val'}"])
    source = resolve_source(cfg.data)
    split = build_train_split(source, source.train, cfg.data, train_wordpiece(["a red circle"] * 4, 64), seed=1)
    garbled = tmp_path / "data/train/part-2.parquet"
    garbled.write_bytes(np.random.default_rng(0).bytes(garbled.stat().st_size))

    batches = list(split.batches(0, fresh_ranges(split.rows, 1)[0], 64, 1))
    keys = np.concatenate([b["key"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    assert len(keys) == 512
    shard_keys = set(table.slice(256, 128).column("key").to_pylist())
    assert sorted(keys[valid]) == sorted(set(table.column("key").to_pylist()) - shard_keys)
    assert sorted(keys[~valid]) == sorted(f"{garbled}#{row}" for row in range(128))
    assert all(p == str(garbled) for b in batches for p, ok in zip(b["shard"], b["valid"]) if not ok)


def test_a_read_waits_for_storage_that_does_not_answer_and_fails_past_the_limit(tmp_path):
    from ports import free_port

    from vcl_dist.config import S3Config
    from vcl_dist.data import unreadable_shards
    from vcl_dist.storage import filesystem_for

    unreachable, _ = filesystem_for("s3://bucket/x", S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}"), attempts=1)
    rows = np.arange(5)
    slept: list[float] = []

    def read():
        if len(slept) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject")
        return {"key": np.array(["a"] * 5, dtype=object)}

    # The storage is down for three tries, then the read succeeds: no row is counted bad.
    out = unreadable_shards.read_or_mark_unreadable(read, unreachable, "bucket/x/part.parquet", rows, sleep=slept.append)
    assert list(out["key"]) == ["a"] * 5 and slept == [1.0, 2.0, 4.0]

    slept.clear()

    def never():
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject")

    with pytest.raises(OSError, match="its storage has not answered for 12[0-9] s"):
        unreadable_shards.read_or_mark_unreadable(never, unreachable, "bucket/x/part.parquet", rows, sleep=slept.append)
    assert sum(slept) >= unreadable_shards.WAIT_FOR_STORAGE_S and max(slept) == 16.0

    # Storage that answers while the shard does not parse: the rows are bad rows, after one more try.
    local = tmp_path / "part.parquet"
    local.write_bytes(b"not parquet")
    tries = []

    def garbled():
        tries.append(1)
        pq.ParquetFile(str(local))

    out = unreadable_shards.read_or_mark_unreadable(garbled, pafs.LocalFileSystem(), str(local), rows, sleep=slept.append)
    assert len(tries) == 2 and list(out["key"]) == [f"{local}#{r}" for r in rows] and set(out["caption"]) == {None}


def test_the_runs_storage_keeps_its_tries_when_sent_to_ray_workers():
    """pyarrow's S3 filesystem pickles without its retry strategy (back to 3 tries): the run's
    storage rides out an outage only if the workers and Ray Train's controller get its count."""
    import pickle

    import cloudpickle

    from vcl_dist.config import S3Config
    from vcl_dist.storage import filesystem_for

    storage, path = filesystem_for("s3://bucket/runs", S3Config(endpoint_url="http://127.0.0.1:9000"), attempts=8)
    for sent in (pickle.loads(pickle.dumps(storage)), cloudpickle.loads(cloudpickle.dumps(storage))):
        assert isinstance(sent, pafs.S3FileSystem) and sent.attempts == 8 and sent == storage
    assert path == "bucket/runs" and filesystem_for("s3://bucket/runs")[0].attempts == 3
