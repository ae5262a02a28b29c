"""Training's tar reads by byte range: the same samples as a stream, locally and in S3, for
tars with long names, directories, samples without an image, rewritten tars and compressed ones."""

import gzip
import io
import tarfile

import numpy as np
import pyarrow.fs as pafs
import pytest
from s3_server import s3_filesystem
from webdataset_tars import write_webdataset

from vcl_dist.data import tar_index
from vcl_dist.data.webdataset import _samples, read_tar_rows


@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tar_index, "INDEX_DIR", tmp_path / "index")
    return tmp_path / "index"


def rows_of(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    keys = [f"s{i:04d}" for i in range(n)]
    keys[3] = "k" * 140  # longer than a ustar name: a PAX header precedes its members
    images = [rng.bytes(int(rng.integers(100, 3000))) for _ in range(n)]
    images[5] = None  # a sample without an image
    return {"key": keys, "image": images, "caption": [f"caption {i}" for i in range(n)], "label": [i % 3 for i in range(n)],
            "image_id": [None] * n}


def _directory(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def streamed(fs, path: str) -> dict[int, tuple]:
    return {index: (key, payloads) for index, key, payloads in _samples(fs, path, payloads=True)}


def check_rows(fs, path: str, rows: list[int], reference: dict) -> None:
    columns = read_tar_rows(fs, path, rows)
    assert list(columns["__key__"]) == [reference[r][0] for r in rows]
    for ext in ("png", "txt", "cls", "json"):
        assert list(columns[ext]) == [reference[r][1].get(ext) for r in rows], ext


def test_ranged_reads_give_the_streamed_samples(tmp_path, index_dir, monkeypatch):
    write_webdataset(rows_of(300), tmp_path / "wds", per_tar=300)
    path = str(tmp_path / "with-dir.tar")
    with tarfile.open(tmp_path / "wds" / "shard-00000.tar") as source, tarfile.open(path, "w") as tar:
        for n, member in enumerate(source.getmembers()):
            if n == 40:  # a directory member between two samples, as some writers leave
                tar.addfile(_directory("images"))
            tar.addfile(member, source.extractfile(member))
    fs = pafs.LocalFileSystem()
    reference = streamed(fs, path)
    streams = []  # (first row wanted, the sample streaming started at)
    real_resume_point = tar_index.resume_point

    def recorded(rows, known):
        point = real_resume_point(rows, known)
        streams.append((rows[0], point[0]))
        return point

    monkeypatch.setattr(tar_index, "resume_point", recorded)
    check_rows(fs, path, list(range(10, 51)), reference)  # streamed from the start to sample 51's header
    check_rows(fs, path, [3, 20, 30, 50], reference)  # all known: by byte range
    check_rows(fs, path, list(range(60, 101, 3)), reference)  # streamed on from sample 51, not from the start
    assert streams == [(10, 0), (60, 51)]
    check_rows(fs, path, list(range(250, 300)), reference)  # to the end: the index is complete
    assert len(list(index_dir.glob("*.npz"))) == 1

    def no_stream(*args, **kwargs):
        raise AssertionError("streamed a tar whose index this node has")

    monkeypatch.setattr(tar_index, "stream_samples", no_stream)
    rng = np.random.default_rng(1)
    for rows in ([0], [3, 4, 5], [299], sorted(rng.choice(300, 120, replace=False).tolist()), list(range(300))):
        check_rows(fs, path, rows, reference)
    with pytest.raises(ValueError, match="ends before its sample 301"):
        read_tar_rows(fs, path, [299, 300])


def test_a_rewritten_tar_is_streamed_again_and_a_compressed_one_always(tmp_path, index_dir):
    fs = pafs.LocalFileSystem()
    write_webdataset(rows_of(50), tmp_path / "a", per_tar=50)
    path = str(tmp_path / "a" / "shard-00000.tar")
    check_rows(fs, path, [2, 40], streamed(fs, path))
    write_webdataset(rows_of(60, seed=7), tmp_path / "b", per_tar=60)
    (tmp_path / "b" / "shard-00000.tar").replace(path)  # new bytes, size and time under the same name
    check_rows(fs, path, [2, 40, 59], streamed(fs, path))

    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress((tmp_path / "a" / "shard-00000.tar").read_bytes()))
    before = set(index_dir.glob("*.npz"))
    check_rows(fs, str(packed), [1, 30], streamed(fs, str(packed)))
    check_rows(fs, str(packed), [1, 30], streamed(fs, str(packed)))
    assert set(index_dir.glob("*.npz")) == before  # no offsets into a compressed stream


def test_ranged_reads_from_s3(s3_endpoint, tmp_path, index_dir):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="tars")
    write_webdataset(rows_of(400), tmp_path / "wds", per_tar=400)
    fs = s3_filesystem(s3_endpoint)
    pafs.copy_files(str(tmp_path / "wds"), "tars/wds", destination_filesystem=fs)
    path = "tars/wds/shard-00000.tar"
    reference = streamed(pafs.LocalFileSystem(), str(tmp_path / "wds" / "shard-00000.tar"))
    rows = sorted(np.random.default_rng(2).choice(400, 90, replace=False).tolist())
    check_rows(fs, path, rows, reference)
    assert len(list(index_dir.glob("*.npz"))) == 1
    check_rows(fs, path, rows, reference)  # by byte ranges, several at once
    check_rows(fs, path, [0, 399], reference)


def test_a_sample_is_parsed_from_its_bytes_alone():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("x.jpg", b"picture"), ("x.txt", b"words")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    end = data.index(b"words") + 512 - (data.index(b"words") % 512)
    assert tar_index._parse_sample(7, data[:end]) == (7, "x", {"jpg": b"picture", "txt": b"words"})
