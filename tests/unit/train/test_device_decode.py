"""data.decode=gpu on a CPU worker: JPEGs travel encoded with their crop, and the training process
decodes them into the pictures CPU decoding gives; anything else, and every bad row, as before."""

import io

import numpy as np
import pytest
import torch
from hostile_inputs import GOOD_ODD_IMAGES, png
from PIL import Image

from vcl_dist.data.images import ImageGeometry
from vcl_dist.data.preprocess import Preprocessor
from vcl_dist.data.tokenizer import train_wordpiece
from vcl_dist.train.device_decode import collate_decoding_on_device


def photo(width: int, height: int, seed: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    coarse.resize((width, height), Image.BICUBIC).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rows():
    """JPEGs (two EXIF orientations, one grey), a PNG, a CMYK JPEG, a JPEG whose body is
    corrupt (its header is fine), an undecodable cell."""
    corrupt = bytearray(photo(200, 150, 9))
    corrupt[700:] = np.random.default_rng(0).integers(0, 255, len(corrupt) - 700, dtype=np.uint8).tobytes()
    grey = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160), dtype=np.uint8)).save(grey, format="JPEG")
    images = [photo(240, 180, 0), photo(200, 260, 1, orientation=6), grey.getvalue(),
              png(Image.new("RGB", (90, 70), (10, 200, 30))), GOOD_ODD_IMAGES["cmyk_jpeg"](), bytes(corrupt), b"nothing"]
    n = len(images)
    return {"key": [f"k{i}" for i in range(n)], "image": images, "caption": [f"a picture {i}" for i in range(n)],
            "path": [f"shard-{i}" for i in range(n)]}


def preprocess(rows, **options):
    tokenizer = train_wordpiece(rows["caption"], 100)
    batch = {name: np.array(values, dtype=object) for name, values in rows.items()}
    return Preprocessor(tokenizer, ImageGeometry(96), 8, augment=True, seed=(3, 1), **options)(batch)


def test_jpegs_travel_encoded_with_their_crop_and_the_rest_decoded(rows):
    out = preprocess(rows, fast_decode=True, device_decode=True)
    assert out["orientation"].tolist() == [1, 6, 1, 0, 0, 1, 0]  # the CMYK JPEG and the PNG are decoded here
    assert [bool(len(b)) for b in out["jpeg"]] == [True, True, True, False, False, True, False]
    assert not out["image"][[0, 1, 2, 5]].any() and out["image"][3].any()
    assert out["valid"].tolist() == [1, 1, 1, 1, 1, 1, 0]  # a corrupt body shows only when decoded
    left, top, width, height, out_w, out_h = out["crop"][1]
    assert (out_w, out_h) == (96, 96) and left + width <= 260 and top + height <= 200  # upright: 260 wide


def test_the_device_gives_cpu_decodings_pictures_and_counts_a_corrupt_body_as_bad(rows):
    on_cpu = preprocess(rows, fast_decode=True)
    shipped = preprocess(rows, fast_decode=True, device_decode=True)
    batch = collate_decoding_on_device(shipped, ImageGeometry(96), torch.device("cpu"))
    images = batch["image"].numpy()
    for i in (0, 1, 2):  # under twice 96 px a side: no reduced-scale decode on the CPU either
        assert np.abs(images[i].astype(int) - on_cpu["image"][i].astype(int)).max() <= 2, i
    assert np.array_equal(images[3:5], on_cpu["image"][3:5])
    assert batch["valid"].tolist() == [1, 1, 1, 1, 1, 0, 0] == on_cpu["valid"].tolist()
    assert sorted(batch["bad_shards"]) == ["shard-5", "shard-6"]
    assert [k for k in batch] == [k for k in collate_decoding_on_device(shipped, ImageGeometry(96), torch.device("cpu"))]


def test_one_bad_jpeg_does_not_cost_the_batch_its_other_pictures(monkeypatch):
    from vcl_dist.train import device_decode

    good = torch.frombuffer(bytearray(photo(64, 48, 2)), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\0" * 50), dtype=torch.uint8)
    pictures = device_decode.decode_jpegs([good, bad, good], torch.device("cpu"))
    assert pictures[1] is None and pictures[0].shape == pictures[2].shape == (3, 48, 64)


def test_without_torchcodec_torchvisions_decoder_gives_the_same_pictures(rows, monkeypatch):
    import sys

    shipped = preprocess(rows, fast_decode=True, device_decode=True)
    with_torchcodec = collate_decoding_on_device(shipped, ImageGeometry(96), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # an import of it now fails
    without = collate_decoding_on_device(shipped, ImageGeometry(96), torch.device("cpu"))
    assert torch.equal(with_torchcodec["image"], without["image"])
    assert without["valid"].tolist() == with_torchcodec["valid"].tolist()
