"""How training turns image bytes into the tower's input, as fast as the CPU allows.

Decoding is the cost of every CLIP run's input, and training reads every picture once per
epoch, so its JPEGs (nearly all of a crawl) take a faster way than `.images.decode_image`:

- libjpeg-turbo through ``simplejpeg``, straight into a numpy array (no Pillow image, no copy),
  at 1/2, 1/4 or 1/8 scale whenever the crop still covers the tower's input at that scale:
  libjpeg skips most of the inverse DCT, so a 512 px photo for a 224 px tower costs what a
  256 px one does (other factors than powers of two decode slower than the full size);
- the random crop taken as a view of that array, and one antialiased resize by torch's uint8
  kernel (the same filter as Pillow's, several times faster: it vectorises over the pixels).

The pixel count is still checked from the header before anything is decoded, EXIF orientation
is still applied, and every picture the fast way does not cover (another format, CMYK, a header
``simplejpeg`` refuses) goes through `.images.decode_image`; the crop is drawn alike both
ways. Pictures differ from Pillow's by at most a grey level or two (rounding in the resize).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from .images import ACCEPTED_FORMATS, MAX_DECODED_PIXELS, ImageGeometry, decode_image

# EXIF orientation -> views of an [H, W, C] array that show the picture upright (Pillow's
# ``exif_transpose``: 2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise,
# 7 transverse, 8 quarter turn anticlockwise).
ORIENTATION = 0x0112
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def draw_crop(width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """``(left, top, width, height)`` of the training crop of an upright ``width × height``
    picture: at least 85 % of each side, anywhere (captions name positions, so no flips and no
    crops that could move an object into another third of the frame); the whole picture
    without ``rng``."""
    if rng is None:
        return 0, 0, width, height
    scale = rng.uniform(0.85, 1.0)
    cw, ch = max(1, int(width * scale)), max(1, int(height * scale))
    return int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch


def target_size(geometry: ImageGeometry, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` a ``width × height`` crop is resized to before the centre crop
    (``squash``: the tower's input itself)."""
    if geometry.resize == "squash":
        return geometry.size, geometry.size
    side = geometry.resize_side or geometry.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    return (side, new_long) if width <= height else (new_long, side)


def dct_factor(width: int, height: int, need_width: int, need_height: int) -> int:
    """The largest of 1, 2, 4, 8 by which a ``width × height`` region can shrink in decoding and
    still be at least ``need_width × need_height`` (so the resize only ever scales down)."""
    factor = 1
    while factor < 8 and width // (factor * 2) >= need_width and height // (factor * 2) >= need_height:
        factor *= 2
    return factor


def _upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resize_to_geometry(picture, geometry: ImageGeometry, width: int, height: int):
    """A ``uint8 [3, h, w]`` tensor (on any device) resized to ``width × height`` with the
    antialiased filter of ``geometry.interpolation``, then centre-cropped to ``S × S`` unless
    ``geometry`` squashes."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.BICUBIC if geometry.interpolation == "bicubic" else InterpolationMode.BILINEAR
    out = F.resize(picture, [height, width], interpolation=mode, antialias=True)
    if geometry.resize != "squash":
        if geometry.crop_offset == "round":
            left, top = int(round((width - geometry.size) / 2.0)), int(round((height - geometry.size) / 2.0))
        else:
            left, top = (width - geometry.size) // 2, (height - geometry.size) // 2
        out = out[:, top:top + geometry.size, left:left + geometry.size]
    return out


def training_crop(width: int, height: int, orientation: int, geometry: ImageGeometry,
                  rng: np.random.Generator | None) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The crop ``(left, top, width, height)`` of a stored ``width × height`` JPEG, in the
    upright picture's pixels, and the size it is resized to: drawn from the header alone, so
    the same whether the picture is decoded here or on the training device."""
    up_width, up_height = _upright_size(width, height, orientation)
    box = draw_crop(up_width, up_height, rng)
    return box, target_size(geometry, box[2], box[3])


def decode_for_training(data, geometry: ImageGeometry, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded bytes -> ``uint8 [3, S, S]``: `.images.decode_image`'s picture (the same
    crop distribution, the same geometry), JPEGs the fast way.

    Raises:
        UnusableImageError: as `.images.decode_image`.
    """
    header = jpeg_header(data)
    if header is None:
        return decode_image(data, geometry, rng)
    width, height, orientation = header
    import simplejpeg
    import torch

    (left, top, crop_w, crop_h), (out_w, out_h) = training_crop(width, height, orientation, geometry, rng)
    factor = dct_factor(crop_w, crop_h, out_w, out_h)
    try:
        pixels = simplejpeg.decode_jpeg(bytes(data), colorspace="RGB", min_factor=factor,
                                        min_height=-(-height // factor), min_width=-(-width // factor))
    except ValueError:
        return decode_image(data, geometry, rng)  # libjpeg's strict checks (e.g. a truncated file): Pillow says why
    pixels = _UPRIGHT.get(orientation, lambda a: a)(pixels)
    # The crop, scaled to the decoded size (libjpeg rounds a scaled side up).
    up_width, up_height = _upright_size(width, height, orientation)
    scale_x, scale_y = pixels.shape[1] / up_width, pixels.shape[0] / up_height
    x0, y0 = int(left * scale_x), int(top * scale_y)
    x1 = max(x0 + 1, min(pixels.shape[1], int(round((left + crop_w) * scale_x))))
    y1 = max(y0 + 1, min(pixels.shape[0], int(round((top + crop_h) * scale_y))))
    # A channels-last view: torch's vectorised uint8 kernel reads it without a copy; the result
    # keeps those strides, and the caller's assignment into [3, S, S] is the one copy.
    region = torch.from_numpy(np.ascontiguousarray(pixels[y0:y1, x0:x1])).permute(2, 0, 1)
    return resize_to_geometry(region, geometry, out_w, out_h).numpy()


def jpeg_header(data, max_pixels: int = MAX_DECODED_PIXELS) -> tuple[int, int, int] | None:
    """``(width, height, EXIF orientation)`` of a JPEG the fast way decodes (RGB or grey,
    within ``max_pixels``); None for anything else, which takes Pillow's way (where a picture
    over the pixel cap is refused with the reason)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    data = bytes(data)
    if b"Exif\0\0" not in data:  # a search at memory speed; a chance match only costs Pillow's header read
        # No EXIF block (img2dataset's re-encoded JPEGs have none): libjpeg's header reader
        # gives the size and colours, and the picture is upright.
        return _plain_jpeg_header(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:  # the header only
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                width, height = image.size
                orientation = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever Pillow refuses, decode_image refuses with the reason
        return None
    if width * height > max_pixels or orientation not in range(1, 9):
        return None
    return width, height, int(orientation)


def _plain_jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    import simplejpeg

    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in ("YCbCr", "Gray", "RGB") or width * height > max_pixels:
        return None
    return width, height, 1
