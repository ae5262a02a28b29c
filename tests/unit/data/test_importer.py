"""jobs/prepare_data.py on a folder of images + a CSV with corrupt and missing images."""

import csv
import io
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture(scope="module")
def joining(local_ray):
    """The environment of an import that joins this module's Ray (``RAY_ADDRESS``) rather than
    starting one of its own: a second each, not ten. The first test imports as a laptop user does,
    on a Ray of its own."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def write_collection(root):
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(30):
        name = f"img{i:02d}.jpg"
        if i % 10 == 3:
            (images / name).write_bytes(b"\xff\xd8 this is no jpeg")  # corrupt
        elif i % 10 == 7:
            pass  # listed in the CSV, missing on disk
        else:
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 8, 0, 0)).save(buffer, format="JPEG")
            (images / name).write_bytes(buffer.getvalue())
        # Two captions per image; one of them empty for image 5.
        for c in range(2):
            caption = "" if (i == 5 and c == 1) else f"a picture number {i} caption {c}"
            rows.append({"image": name, "caption": caption, "label": CLASSES[i % 3]})
    with open(root / "captions.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return images


def test_importer_keeps_good_rows_and_counts_bad_ones(tmp_path, repo_root):
    images = write_collection(tmp_path)
    out = tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(images), "--captions",
         str(tmp_path / "captions.csv"), "--out", str(out), "--val-fraction", "0.3", "--rows-per-shard", "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 30 images x 2 captions = 60 rows; 3 corrupt and 3 missing images lose 12 rows, one empty caption 1.
    assert "left out 13 rows: 6 undecodable image, 6 missing image, 1 empty caption" in proc.stdout
    train = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    val = pq.read_table(sorted((out / "val").glob("*.parquet"))).to_pydict()
    assert len(train["key"]) + len(val["key"]) == 47
    assert len(val["key"]) > 0 and len(train["key"]) > 0
    assert not set(train["image_id"]) & set(val["image_id"])  # all captions of an image in one split
    assert (out / "val" / "classes.txt").read_text().splitlines() == CLASSES
    for table in (train, val):
        for image_id, label in zip(table["image_id"], table["label"]):
            assert CLASSES[label] == CLASSES[int(image_id[3:5]) % 3]  # names became the right ids
        for data in table["image"]:
            Image.open(io.BytesIO(data)).load()  # every kept image decodes
    assert max(pq.ParquetFile(f).metadata.num_rows for f in (out / "train").glob("*.parquet")) <= 10


def test_importer_missing_inputs_are_one_line_errors(tmp_path, repo_root):
    proc = subprocess.run(
        [sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(tmp_path / "nope"), "--captions",
         str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"vcl-dist: error: --images: no folder at {tmp_path / 'nope'}"
    (tmp_path / "images").mkdir()
    for empty in ("empty.csv", "blank.jsonl"):
        (tmp_path / empty).write_text("" if empty.endswith(".csv") else "\n \n")
        proc = subprocess.run(
            [sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(tmp_path / "images"), "--captions",
             str(tmp_path / empty), "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1 and not (tmp_path / "out").exists()
        assert proc.stderr.strip().splitlines()[-1] == (
            f"vcl-dist: error: --captions {tmp_path / empty} is empty: it needs a row per caption (image, caption[, label])")


def test_importer_converts_webdataset_tars(tmp_path, repo_root, joining):
    import json
    import tarfile

    tars = tmp_path / "wds"
    tars.mkdir()
    with tarfile.open(tars / "shard-00000.tar", "w") as tar:
        for i in range(12):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (0, i * 20, 0)).save(buffer, format="PNG")
            members = {"png": buffer.getvalue() if i != 4 else b"broken", "txt": f"green square {i}".encode(),
                       "json": json.dumps({"label": i % 2}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"sample{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--webdataset", str(tars), "--out", str(out),
                           "--val-fraction", "0"], capture_output=True, text=True, env=joining, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out 1 row: 1 undecodable image" in proc.stdout
    table = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    assert sorted(table["key"]) == [f"sample{i:03d}" for i in range(12) if i != 4]
    assert all(label == int(key[-3:]) % 2 for key, label in zip(table["key"], table["label"]))


def test_importer_reads_nothing_outside_the_image_folder_and_counts_hostile_rows(tmp_path, repo_root, joining):
    from hostile_inputs import BAD_CAPTIONS, GOOD_ODD_IMAGES, decompression_bomb_png, eps_document, jpeg

    images = tmp_path / "images"
    images.mkdir()
    secret = tmp_path / "secret.jpg"  # a readable image just outside the folder
    secret.write_bytes(jpeg(Image.new("RGB", (8, 8), (1, 2, 3))))
    (images / "link.jpg").symlink_to(secret)
    rows = []
    for i in range(20):
        (images / f"ok{i}.jpg").write_bytes(jpeg(Image.new("RGB", (8, 8), (i * 10, 0, 0))))
        rows.append((f"ok{i}.jpg", f"picture {i}".encode(), str(i % 3)))
    for name, make in GOOD_ODD_IMAGES.items():  # odd but good: kept
        (images / f"{name}.img").write_bytes(make())
        rows.append((f"{name}.img", f"odd {name}".encode(), "1"))
    (images / "bomb.png").write_bytes(decompression_bomb_png())
    (images / "doc.eps").write_bytes(eps_document())
    rows += [("bomb.png", b"a bomb", "0"), ("doc.eps", b"a document", "0")]
    rows += [(path, b"a secret", "0") for path in ("../secret.jpg", str(secret), "link.jpg", "../../../../etc/passwd")]
    rows += [("ok0.jpg", f"label {label}".encode(), label) for label in ("nan", "inf", "1e30", "-5", "3.5", "Infinity")]
    rows += [("ok1.jpg", caption, "1") for caption in BAD_CAPTIONS]
    rows += [("ok\x002.jpg", b"a NUL byte in the path", "1"), ("ok3.jpg", b"x" * (2**20 + 10), "1")]  # 1 MiB caption
    with open(tmp_path / "captions.csv", "wb") as stream:
        stream.write(b"image,caption,label\n")
        for path, caption, label in rows:
            stream.write(b",".join([path.encode(), b'"' + caption + b'"', label.encode()]) + b"\n")

    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(images), "--captions",
                           str(tmp_path / "captions.csv"), "--out", str(out), "--val-fraction", "0"],
                          capture_output=True, text=True, env=joining, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("left out"))
    counts = dict((reason, int(n)) for n, reason in (part.split(" ", 1) for part in summary.split(": ", 1)[1].split(", ")))
    assert counts == {"outside the image folder": 4, "bad label": 6, "undecodable image": 1, "image too large": 1,
                      "caption is not UTF-8 text": 1, "empty caption": 1, "control character in image path": 1,
                      "caption too long": 1}
    table = pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pydict()
    assert len(table["key"]) == 20 + len(GOOD_ODD_IMAGES)
    assert secret.read_bytes() not in table["image"]
    assert {caption for caption in table["caption"] if caption.startswith("odd")} == {f"odd {n}" for n in GOOD_ODD_IMAGES}


def test_importer_reads_a_karpathy_coco_file_with_its_own_splits(tmp_path, repo_root, joining):
    import json

    images = tmp_path / "coco"
    entries = []
    for i, split in enumerate(["train", "train", "restval", "val", "test", "test", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        (images / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{folder}_{i:012d}.jpg"
        if i == 5:
            (images / folder / name).write_bytes(b"\xff\xd8 no jpeg")  # corrupt: its 5 captions are left out
        else:
            buffer = io.BytesIO()
            Image.new("RGB", (20, 14), (30 * i, 10, 0)).save(buffer, format="JPEG")
            (images / folder / name).write_bytes(buffer.getvalue())
        sentences = [{"tokens": [], "raw": f"picture {i} caption {c}", "imgid": i, "sentid": 5 * i + c} for c in range(5)]
        if i == 1:
            sentences[0]["raw"] = None  # not text: a bad row, counted
        entries.append({"filepath": folder, "filename": name, "imgid": i, "split": split, "sentences": sentences,
                        "sentids": [5 * i + c for c in range(5)], "cocoid": 1000 + i})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--karpathy", str(path), "--images",
                           str(images), "--out", str(out)], capture_output=True, text=True, env=joining, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 14 train, 5 val and 10 test rows" in proc.stdout, proc.stdout
    assert "left out 6 rows: 5 undecodable image, 1 empty caption" in proc.stdout, proc.stdout
    splits = {s: pq.read_table(sorted((out / s).glob("*.parquet"))).to_pydict() for s in ("train", "val", "test")}
    assert sorted(set(splits["train"]["image_id"])) == ["1000", "1001", "1002"]  # restval trained on
    assert set(splits["val"]["image_id"]) == {"1003"} and set(splits["test"]["image_id"]) == {"1004", "1006"}
    assert sorted(splits["test"]["caption"])[:2] == ["picture 4 caption 0", "picture 4 caption 1"]
    assert not (out / "test" / "folds.json").exists()  # three test images fill no 1K fold
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}')
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--karpathy", str(bad), "--images",
                           str(images), "--out", str(out)], capture_output=True, text=True, env=joining, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("vcl-dist: error: bad.json: images[0]")


def test_importer_refuses_hostile_class_names_and_replaces_an_earlier_import_whole(tmp_path, repo_root, joining):
    import json

    images = write_collection(tmp_path)
    out = tmp_path / "shards"

    def prepare(table, *extra):
        return subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(images), "--captions",
                               str(table), "--out", str(out), "--val-fraction", "0.3", *extra],
                              capture_output=True, text=True, env=joining, timeout=300)

    hostile = tmp_path / "hostile.jsonl"
    names = ["cat", "dog", "cat\nfish", "dog"]  # the third row's name would split classes.txt
    hostile.write_text("".join(json.dumps({"image": f"img{i:02d}.jpg", "caption": f"c {i}", "label": name}) + "\n"
                               for i, name in enumerate(names)))
    proc = prepare(hostile)
    assert proc.returncode == 1 and not out.exists(), proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("vcl-dist: error: row 3 of the captions table: the class name 'cat\\nfish' holds a control character "
                    "(a newline, a tab, …): class names are one line each in classes.txt")
    header_only = tmp_path / "header.csv"
    header_only.write_text("image,caption,label\n")
    proc = prepare(header_only)
    assert proc.returncode == 1 and not out.exists(), proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vcl-dist: error: --captions {header_only} has no rows: it needs a row per caption (image, caption[, label])")

    assert prepare(tmp_path / "captions.csv").returncode == 0
    first = {f.name for f in (out / "train").iterdir()}
    (out / "train" / "stale-00000.parquet").write_bytes((out / "train" / sorted(first)[0]).read_bytes())
    proc = prepare(tmp_path / "captions.csv")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        f"vcl-dist: error: --out {out} is not empty: pass --overwrite to replace it")
    assert prepare(tmp_path / "captions.csv", "--overwrite").returncode == 0
    assert {f.name for f in (out / "train").iterdir()} == first  # the earlier import's files are gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shards")) == ["shards"]  # no staging left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    proc = subprocess.run([sys.executable, str(repo_root / "jobs/prepare_data.py"), "--images", str(images), "--captions",
                           str(tmp_path / "captions.csv"), "--out", str(notes), "--overwrite"],
                          capture_output=True, text=True, env=joining, timeout=120)
    assert proc.returncode == 1 and "holds no imported dataset" in proc.stderr
    assert (notes / "thesis.txt").read_text() == "years of work"
