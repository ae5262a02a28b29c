"""Training's fast JPEG way gives Pillow's picture (within a grey level), and hands everything it
does not cover to the one decoder, which refuses it with the same reason."""

import io

import numpy as np
import pytest
from hostile_inputs import BAD_IMAGES, GOOD_ODD_IMAGES, large_jpeg
from PIL import Image

from vcl_dist.data import train_decode
from vcl_dist.data.images import ImageGeometry, UnusableImageError, decode_image
from vcl_dist.data.train_decode import dct_factor, decode_for_training, jpeg_header

GEOMETRIES = [ImageGeometry(224), ImageGeometry(100, "shorter_side", 128, "bicubic", "round"), ImageGeometry(64)]


def photo(width: int, height: int, seed: int = 0, **save) -> bytes:
    """A JPEG with texture in every region (so that a wrong crop, turn or scale shows)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((width, height), Image.BICUBIC).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def assert_close(fast: np.ndarray, slow: np.ndarray, levels: int = 1) -> None:
    """Equal within ``levels`` grey levels (torch and Pillow round the same filter apart)."""
    assert fast.shape == slow.shape and fast.dtype == slow.dtype == np.uint8
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= levels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_shows_the_picture_as_pillow_does(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = photo(480, 320, exif=exif.tobytes())
    assert jpeg_header(data) == (480, 320, orientation)
    for geometry in GEOMETRIES:
        assert_close(decode_for_training(data, geometry), decode_image(data, geometry))


@pytest.mark.parametrize("seed", range(4))
def test_the_training_crop_is_drawn_alike_both_ways(seed):
    data = photo(400, 300, seed)
    # 300 px is under twice either side asked for: no reduced-scale decode either way, the same draws, the same crop.
    for geometry in (ImageGeometry(224), ImageGeometry(160, "shorter_side", 200, "bicubic", "round")):
        fast = decode_for_training(data, geometry, np.random.default_rng(seed))
        assert_close(fast, decode_image(data, geometry, np.random.default_rng(seed)), levels=2)
        assert np.abs(fast.astype(int) - decode_image(data, geometry, np.random.default_rng(seed + 10)).astype(int)).mean() > 5


def test_large_jpegs_decode_at_the_smallest_dct_scale_that_covers_the_crop(monkeypatch):
    assert dct_factor(512, 384, 224, 224) == 1  # 384 / 2 < 224
    assert dct_factor(480, 480, 224, 224) == 2
    assert dct_factor(3000, 3000, 48, 48) == 8
    import simplejpeg

    shapes = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: shapes.append(decode(*a, **k).shape) or decode(*a, **k))
    data = photo(960, 640)
    assert_close(decode_for_training(data, ImageGeometry(100)), decode_image(data, ImageGeometry(100)), levels=2)
    assert shapes == [(160, 240, 3)]  # 1/4 scale: 640 / 4 = 160 still covers 100 px
    assert decode_for_training(large_jpeg(3000), ImageGeometry(48)).shape == (3, 48, 48)


@pytest.mark.parametrize("kind", sorted(GOOD_ODD_IMAGES))
def test_what_the_fast_way_does_not_cover_decodes_as_pillow_does(kind):
    data = GOOD_ODD_IMAGES[kind]()
    assert np.array_equal(decode_for_training(data, ImageGeometry(32)), decode_image(data, ImageGeometry(32))) or kind == "exif_rotated"
    assert_close(decode_for_training(data, ImageGeometry(32)), decode_image(data, ImageGeometry(32)))


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_hostile_images_are_refused_with_the_one_decoders_reason(kind):
    make, reason = BAD_IMAGES[kind]
    with pytest.raises(UnusableImageError) as err:
        decode_for_training(make(), ImageGeometry(32))
    assert err.value.reason == reason


def test_a_truncated_or_oversized_jpeg_is_refused_not_half_decoded():
    data = photo(320, 240)
    with pytest.raises(UnusableImageError, match="undecodable image"):
        decode_for_training(data[: len(data) // 2], ImageGeometry(32))
    assert jpeg_header(data, max_pixels=320 * 240 - 1) is None  # left to the one decoder, which refuses it
    assert jpeg_header(b"\xff\xd8\xff" + b"\0" * 20) is None


def test_cmyk_jpegs_take_pillows_way(monkeypatch):
    monkeypatch.setattr(train_decode, "resize_to_geometry", lambda *a: pytest.fail("the fast way decoded a CMYK JPEG"))
    data = GOOD_ODD_IMAGES["cmyk_jpeg"]()
    assert jpeg_header(data) is None
    assert decode_for_training(data, ImageGeometry(32)).shape == (3, 32, 32)
