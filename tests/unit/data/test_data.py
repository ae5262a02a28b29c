"""The built-in shapes dataset and the map_batches preprocessing."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vcl_dist.data.preprocess import Preprocessor, stable_id
from vcl_dist.data.shapes import CLASS_NAMES, COLOURS, SHAPES, ensure_shapes_dataset
from vcl_dist.data.shard_format import caption_problem, caption_text, parse_label
from vcl_dist.data.tokenizer import train_wordpiece


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("cache"), 40, 16, 32, 2, seed=3)


def read_split(root, split):
    return pq.read_table(sorted((root / split).glob("*.parquet"))).to_pydict()


def test_shapes_is_deterministic_and_in_the_shard_format(shapes, tmp_path):
    again = ensure_shapes_dataset(tmp_path, 40, 16, 32, 2, seed=3)
    assert again.name == shapes.name
    assert read_split(again, "train") == read_split(shapes, "train")
    other = ensure_shapes_dataset(tmp_path, 40, 16, 32, 2, seed=4)
    assert read_split(other, "train")["image"] != read_split(shapes, "train")["image"]

    train, val = read_split(shapes, "train"), read_split(shapes, "val")
    assert set(train) == {"key", "image", "caption", "label", "image_id"}
    assert len(train["key"]) == 40 and len(set(train["key"])) == 40
    assert len(val["key"]) == 32 and len(set(val["image_id"])) == 16  # two captions per val image
    assert (shapes / "classes.txt").read_text().splitlines() == CLASS_NAMES
    assert all(0 <= label < len(CLASS_NAMES) for label in train["label"])
    image = Image.open(io.BytesIO(train["image"][0]))
    assert image.size == (32, 32) and image.format == "PNG"
    # The class is named in the caption through one of its synonyms.
    for caption, label in zip(train["caption"], train["label"]):
        colour, shape = CLASS_NAMES[label].split()
        assert any(word in caption.lower() for word in COLOURS[colour][1]), caption
        assert any(word in caption.lower() for word in SHAPES[shape]), caption


def test_preprocessor_outputs_model_ready_columns(shapes):
    rows = read_split(shapes, "val")
    tokenizer = train_wordpiece(rows["caption"], vocab_size=200)
    batch = {name: np.array(values, dtype=object) for name, values in rows.items()}
    batch["label"][1] = None  # an unlabeled row
    out = Preprocessor(tokenizer, image_size=24, max_text_length=16, augment=True, seed=0)(batch)
    n = len(rows["key"])
    assert out["image"].shape == (n, 3, 24, 24) and out["image"].dtype == np.uint8
    assert out["input_ids"].shape == out["attention_mask"].shape == (n, 16)
    assert out["label"][1] == -1 and out["label"][0] == rows["label"][0]
    # Rows of one image share a group id; the id is stable across processes.
    assert out["group"][0] == out["group"][1] == stable_id(rows["image_id"][0])
    assert out["group"][0] != out["group"][2]

    # Augmentation is a function of (seed, row key): a row is cropped alike in any batch, by any
    # task or worker, and anew under another seed (training passes (train.seed, epoch)).
    alone = Preprocessor(tokenizer, image_size=24, max_text_length=16, augment=True, seed=0)(
        {name: values[5:6] for name, values in batch.items()})
    assert np.array_equal(alone["image"][0], out["image"][5])
    epochs = [Preprocessor(tokenizer, 24, 16, augment=True, seed=(0, epoch))(batch)["image"] for epoch in (0, 1, 0)]
    assert np.array_equal(epochs[0], epochs[2]) and not np.array_equal(epochs[0], epochs[1])
    plain = Preprocessor(tokenizer, 24, 16, augment=False)(batch)["image"]
    assert not np.array_equal(plain, epochs[0])


def test_rows_without_image_id_are_their_own_group(shapes):
    rows = read_split(shapes, "train")
    tokenizer = train_wordpiece(rows["caption"], vocab_size=200)
    batch = {name: np.array(values, dtype=object) for name, values in rows.items() if name != "image_id"}
    out = Preprocessor(tokenizer, 16, 8, augment=False)(batch)
    assert len(set(out["group"].tolist())) == len(rows["key"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30, -5, 3.5, "3.5", "nan", "inf", "Infinity",
                                   "1e30", "-5", "cat", True, b"\xff\xfe", 2**40, "99999999999999999999", [1]])
def test_hostile_labels_are_no_class_and_never_raise(value):
    assert parse_label(value) is None


@pytest.mark.parametrize("value, expected", [(None, -1), ("", -1), ("  ", -1), (-1, -1), ("-1", -1), (0, 0), (7, 7), (7.0, 7),
                                             ("7", 7), (" 12 ", 12), (b"3", 3), (np.int64(5), 5), (np.float32(2.0), 2)])
def test_labels_that_are_class_ids_or_unlabeled(value, expected):
    assert parse_label(value) == expected


def test_a_label_outside_the_class_list_is_no_class():
    assert parse_label(29, num_classes=30) == 29
    assert parse_label(30, num_classes=30) is None and parse_label("30", num_classes=30) is None
    assert parse_label(None, num_classes=30) == -1


def test_captions_must_be_utf8_text():
    assert caption_text(b" a red circle ") == "a red circle" and caption_text("a disc") == "a disc"
    assert caption_text("caf\u00e9".encode()) == "caf\u00e9"
    assert caption_text(b"\xff\xfe caption") is None and caption_problem(b"\xff\xfe caption") == "caption is not UTF-8 text"
    for blank in (None, "", "  \n", b"  "):
        assert caption_text(blank) is None and caption_problem(blank) == "empty caption"


def test_preprocessor_flags_hostile_rows_as_bad_and_keeps_odd_images(shapes):
    from hostile_inputs import BAD_CAPTIONS, BAD_IMAGES, BAD_LABELS, GOOD_ODD_IMAGES

    rows = read_split(shapes, "train")
    tokenizer = train_wordpiece(rows["caption"], vocab_size=200)
    n = len(rows["key"])
    images = list(rows["image"])
    captions: list = list(rows["caption"])
    labels: list = [str(label) for label in rows["label"]]
    odd = {i: make() for i, make in enumerate(GOOD_ODD_IMAGES.values())}
    images[: len(odd)] = odd.values()
    bad = [make() for make, _ in BAD_IMAGES.values()]
    first = len(odd)
    images[first : first + len(bad)] = bad
    at = first + len(bad)
    labels[at : at + len(BAD_LABELS)] = BAD_LABELS
    at += len(BAD_LABELS)
    captions[at : at + len(BAD_CAPTIONS)] = BAD_CAPTIONS
    planted = len(bad) + len(BAD_LABELS) + len(BAD_CAPTIONS)
    assert at + len(BAD_CAPTIONS) < n
    batch = {"key": np.array(rows["key"], dtype=object), "image": np.array(images + [None], dtype=object)[:-1],
             "caption": np.array(captions + [None], dtype=object)[:-1], "label": np.array(labels, dtype=object)}
    out = Preprocessor(tokenizer, 24, 16, augment=False, num_classes=len(CLASS_NAMES))(batch)
    assert (out["valid"] == 0).sum() == planted
    assert out["valid"][: len(odd)].all()  # odd but good images decode
    assert not out["valid"][first : first + planted].any()
    assert out["image"][: len(odd)].reshape(len(odd), -1).max(axis=1).min() > 0  # no blank picture


def test_fetch_first_ahead_yields_everything_in_order_and_raises_in_the_consumer():
    from vcl_dist.runtime.prefetch import fetch_first_ahead

    assert list(fetch_first_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(fetch_first_ahead(iter([]))) == []

    def broken():
        raise OSError("shard unreadable")
        yield

    batches = fetch_first_ahead(broken())  # the error happens in the thread, now
    with pytest.raises(OSError, match="shard unreadable"):
        next(batches)


def test_parquet_read_units_pack_whole_row_groups_read_in_file_order(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs

    from vcl_dist.data.parquet_source import PreprocessedParquet, plan_read_units

    rng = np.random.default_rng(0)
    for f in range(3):
        table = pa.table({"key": [f"{f}-{i}" for i in range(100)], "image": [rng.bytes(1000) for _ in range(100)]})
        pq.write_table(table, tmp_path / f"part-{f}.parquet", row_group_size=20, compression="none")  # 5 groups of ~20 kB
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    units = plan_read_units(pafs.LocalFileSystem(), files, unit_bytes=45_000)
    assert [u.row_groups for u in units] == [(0, 1), (2, 3), (4,)] * 3  # two groups fit under 45 kB, three do not
    assert sum(u.rows for u in units) == 300 and [u.path for u in units[:3]] == [files[0]] * 3

    tasks = PreprocessedParquet(pafs.LocalFileSystem(), units, 16, dict).get_read_tasks(1)
    assert [(t.read_fn.args[1].path, t.read_fn.args[1].row_groups) for t in tasks] == [(u.path, u.row_groups) for u in units]



def test_a_training_read_reads_only_the_row_groups_that_hold_its_rows(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.fs as pafs

    from vcl_dist.data.parquet_source import plan_read_units
    from vcl_dist.data.train_stream import TrainUnit, read_unit_rows

    keys = [f"k{i}" for i in range(100)]
    pq.write_table(pa.table({"key": keys, "image": [b"x"] * 100, "caption": keys}), tmp_path / "part.parquet",
                   row_group_size=20)
    [planned] = plan_read_units(pafs.LocalFileSystem(), [str(tmp_path / "part.parquet")], unit_bytes=10**9)
    assert planned.row_groups == (0, 1, 2, 3, 4) and planned.group_rows == (20,) * 5
    unit = TrainUnit("parquet", planned.path, planned.rows, planned.row_groups, group_rows=planned.group_rows)
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **kw: read.append(groups) or original(self, groups, **kw))
    for rows in ([3, 7, 55, 99], [41, 42], list(range(100))):
        columns = read_unit_rows(pafs.LocalFileSystem(), unit, np.array(rows))
        assert list(columns["key"]) == [keys[r] for r in rows]
    assert read == [[0, 2, 4], [2], [0, 1, 2, 3, 4]]
