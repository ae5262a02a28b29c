"""The one image decoder: odd images decode as they look, hostile ones are refused with a reason."""

import numpy as np
import pytest
from hostile_inputs import (
    BAD_IMAGES,
    RED,
    cmyk_jpeg,
    exif_rotated_jpeg,
    large_jpeg,
    moderate_bomb_png,
    palette_png_with_transparency,
    png_16bit_grey,
    rgba_png,
)

from vcl_dist.data.images import MAX_DECODED_PIXELS, UnusableImageError, _grey_to_8bit, decode_image, image_size, open_image


def close(pixel, colour, tolerance=12):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour))


def test_cmyk_jpeg_becomes_the_right_rgb():
    image = open_image(cmyk_jpeg())
    assert image.mode == "RGB" and close(image.getpixel((16, 16)), RED, tolerance=20)


def test_16_bit_png_is_scaled_not_clipped_to_white():
    image = open_image(png_16bit_grey(40000))
    assert image.mode == "RGB" and close(image.getpixel((5, 5)), (156, 156, 156), tolerance=1)  # 40000/65535*255


@pytest.mark.parametrize("mode, dtype, top", [("I;16", np.uint16, 65535), ("I", np.int32, 65535), ("I", np.int32, 255),
                                               ("F", np.float32, 65535)])
def test_deep_greyscale_scales_to_8_bits_as_a_float64_reference(mode, dtype, top):
    from PIL import Image

    rng = np.random.default_rng(1)
    values = rng.integers(0, top + 1, (1500, 900)).astype(dtype)  # several bands of rows
    values[0, :4] = [0, top, top // 2, 1]
    image = Image.frombuffer(mode, (900, 1500), values.tobytes(), "raw", mode, 0, 1) if mode == "I;16" else \
        Image.fromarray(values, mode=mode)
    reference = np.clip(values.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_grey_to_8bit(image), reference)


def test_a_16_bit_picture_becomes_8_bits_without_a_full_size_float_copy():
    import tracemalloc

    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (3000, 2000)).astype(np.uint16))
    tracemalloc.start()
    _grey_to_8bit(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The uint8 result (1 B/px) and one band of rows: a float64 copy alone would be 8 B/px.
    assert peak < 1.6 * image.width * image.height, peak / (image.width * image.height)


def test_image_size_reads_the_header_and_refuses_before_decoding():
    assert image_size(png_16bit_grey()) == (32, 32)
    with pytest.raises(UnusableImageError, match=r"image too large \(32x32 pixels, at most 1000\)"):
        image_size(png_16bit_grey(), max_pixels=1000)
    with pytest.raises(UnusableImageError, match="image too large"):
        image_size(moderate_bomb_png(), max_pixels=25_000_000)
    with pytest.raises(UnusableImageError, match="undecodable image"):
        image_size(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(UnusableImageError, match="too large"):
        open_image(png_16bit_grey(), max_pixels=1000)


@pytest.mark.parametrize("make", [palette_png_with_transparency, rgba_png], ids=["palette", "rgba"])
def test_transparency_lies_on_white(make):
    image = open_image(make())
    assert image.mode == "RGB"
    assert image.getpixel((4, 16)) == (255, 255, 255)  # transparent: white, not the black underneath
    assert close(image.getpixel((28, 16)), RED, tolerance=0)


def test_exif_orientation_is_applied():
    image = open_image(exif_rotated_jpeg())
    assert image.size == (24, 48)  # stored 48 x 24, shown upright
    assert close(image.getpixel((12, 6)), RED, tolerance=30) and close(image.getpixel((12, 42)), (255, 255, 255), 30)


def test_large_jpegs_decode_in_draft_mode_at_reduced_scale():
    data = large_jpeg(3000)
    assert open_image(data).size == (3000, 3000)
    small = open_image(data, min_side=48)
    assert small.size == (375, 375)  # libjpeg's 1/8 scale, still above the 48 px asked for
    assert decode_image(data, 48).shape == (3, 48, 48)


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_hostile_images_are_refused_with_their_reason(kind):
    make, reason = BAD_IMAGES[kind]
    with pytest.raises(UnusableImageError) as err:
        decode_image(make(), 32)
    assert err.value.reason == reason and "\n" not in str(err.value)


def test_other_formats_never_reach_their_decoders():
    from hostile_inputs import ppm_image
    from PIL import Image

    Image.open(__import__("io").BytesIO(ppm_image())).load()  # Pillow alone would decode it
    with pytest.raises(UnusableImageError, match="not one of the accepted formats"):
        open_image(ppm_image())


def test_a_complete_image_over_the_pixel_cap_is_refused_before_decoding():
    data = moderate_bomb_png()
    assert 9000 * 9000 > MAX_DECODED_PIXELS and len(data) < 1_000_000
    with pytest.raises(UnusableImageError, match="image too large"):
        open_image(data)


def test_missing_bytes_are_a_missing_image():
    for data in (None, b""):
        with pytest.raises(UnusableImageError) as err:
            open_image(data)
        assert err.value.reason == "missing image"


def test_a_cell_that_holds_no_bytes_is_undecodable():
    with pytest.raises(UnusableImageError) as err:
        open_image("images/cat.jpg")
    assert err.value.reason == "undecodable image" and "str" in str(err.value)


def test_augmented_decode_keeps_shape_and_dtype():
    out = decode_image(rgba_png(), 24, np.random.default_rng(0))
    assert out.shape == (3, 24, 24) and out.dtype == np.uint8
