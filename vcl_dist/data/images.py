"""Untrusted image bytes -> an RGB picture: the one decoder every reader of images uses.

Training, evaluation, the importer, embedding and serving all read images that come from
outside (a crawl, a user's folder, an HTTP request), so decoding is locked down in one place:

- Only JPEG, PNG, WebP, GIF, BMP and TIFF are opened (``Image.open(formats=…)``): no other of
  Pillow's decoders (EPS, which runs Ghostscript; PSD; ICNS; …) ever sees the bytes.
- The pixel count is checked from the header before anything is decoded: a decompression
  bomb (a few KB of PNG that inflate to gigabytes) is refused, not allocated. Large JPEGs are
  decoded with Pillow's draft mode, which lets libjpeg scale by 1/2–1/8 while decoding, so a
  50-megapixel photo costs what a small one does when the tower wants 224 px.
- What a photo means is what is shown: the EXIF orientation is applied, transparency is laid
  on white (not on the black that dropping the alpha channel gives), CMYK and palette images
  become RGB, 16-bit images are scaled to 8 bits (not clipped to white).

A file that cannot be decoded (truncated, not an image, another format) raises
`UnusableImageError` with the reason; callers count the row as bad.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..runtime.console import one_line

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Pixels an image may have once decoded (after JPEG draft scaling): 64 MP, an 8K x 8K picture,
# 192 MiB as RGB. Pillow's own bomb check fires only past ~179 MP and merely warns above ~89 MP.
MAX_DECODED_PIXELS = 64 * 2**20
WHITE = (255, 255, 255)


class UnusableImageError(ValueError):
    """The bytes are no image vcl-dist accepts. ``reason``: a short category to count rows by
    (``missing image``, ``image too large``, ``undecodable image``); ``str(err)``: the reason with its detail, one line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def _too_large(width: int, height: int, max_pixels: int) -> UnusableImageError:
    return UnusableImageError("image too large", f"{width}x{height} pixels, at most {max_pixels}")


def image_size(data: bytes | bytearray | memoryview, max_pixels: int = MAX_DECODED_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header alone, nothing decoded: the check a server makes
    before it spends memory on an upload.

    Raises:
        UnusableImageError: not one of the accepted formats, unreadable, or over ``max_pixels``.
    """
    if not data:
        raise UnusableImageError("missing image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        raise UnusableImageError("image too large", one_line(err, 120)) from None
    except Image.UnidentifiedImageError:
        raise UnusableImageError("undecodable image", f"not one of the accepted formats {', '.join(ACCEPTED_FORMATS)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise UnusableImageError("undecodable image", one_line(err, 120)) from None
    if width * height > max_pixels:
        raise _too_large(width, height, max_pixels)
    return width, height


def open_image(data: bytes | bytearray | memoryview | None, min_side: int | None = None,
               max_pixels: int = MAX_DECODED_PIXELS) -> Image.Image:
    """Decode untrusted bytes into an RGB ``PIL.Image`` (loaded: no file handle stays open).

    ``min_side``: the smallest side the caller will resize to; a large JPEG is then decoded at
    a reduced scale that still covers it (draft mode). ``max_pixels``: the most pixels the
    decoded picture may have, checked from the header before decoding.

    Raises:
        UnusableImageError: missing, another format, too many pixels, truncated or corrupt.
    """
    if data is None or (isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0):
        raise UnusableImageError("missing image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnusableImageError("undecodable image", f"the image cell holds {type(data).__name__}, not bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap is stricter than the DecompressionBombWarning it would print.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS) as image:
                if min_side and image.format == "JPEG":
                    image.draft("RGB", (min_side, min_side))  # only ever scales down, never below the request
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_large(width, height, max_pixels)
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except UnusableImageError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit, met while reading the header
        raise UnusableImageError("image too large", one_line(err, 120)) from None
    except Image.UnidentifiedImageError:
        # Garbage and images of other formats alike: no decoder but the accepted ones looked.
        raise UnusableImageError("undecodable image", f"not one of the accepted formats {', '.join(ACCEPTED_FORMATS)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # Truncated files, bad headers, broken EXIF, Pillow's own bomb error.
        raise UnusableImageError("undecodable image", one_line(err, 120)) from None


def _grey_to_8bit(image: Image.Image) -> np.ndarray:
    """A 16- or 32-bit greyscale picture scaled to ``uint8``, read from Pillow a band of rows
    (about 256 K pixels) at a time: the only full-size array is the 1-byte result. 16-bit values
    in exact integer arithmetic, others in float32."""
    sixteen = image.mode.startswith("I;16")
    top = 65535 if sixteen or image.getextrema()[1] > 255 else 255
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    band = max(1, 2**18 // max(1, width))
    for start in range(0, height, band):
        rows = np.asarray(image.crop((0, start, width, min(height, start + band))))
        if sixteen:  # round(v · 255 / 65535) exactly: v · 255 never lands on a half
            scaled = rows.astype(np.uint32)
            scaled *= 255
            scaled += 32767
            scaled //= 65535
        else:
            scaled = np.rint(np.clip(rows.astype(np.float32) * np.float32(255.0 / top), 0, 255))
        out[start:start + band] = scaled
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, as the picture looks: alpha over white, 16-bit scaled to 8."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) greyscale: convert("L") would clip every value above 255 to white.
        return Image.fromarray(_grey_to_8bit(image), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageGeometry:
    """How a picture becomes the tower's square input: ``squash`` resizes the whole picture to
    ``size``²; ``shorter_side`` resizes its shorter side to ``resize_side`` (the longer in
    proportion, rounded down) and keeps the centre ``size``² (CLIP's preprocessing, as Hugging
    Face's PIL image processor and OpenAI's own do it)."""

    size: int
    resize: str = "squash"
    resize_side: int | None = None
    interpolation: str = "bilinear"
    crop_offset: str = "floor"  # or "round": torchvision's CenterCrop (OpenCLIP), half a pixel apart on odd margins

    @classmethod
    def of(cls, data_cfg) -> "ImageGeometry":
        """The geometry a ``DataConfig`` (or a model's saved one) describes."""
        return cls(data_cfg.image_size, data_cfg.resize, data_cfg.resize_side, data_cfg.interpolation, data_cfg.crop_offset)

    def apply(self, image: Image.Image) -> Image.Image:
        resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
        if self.resize == "squash":
            return image.resize((self.size, self.size), resample)
        side = self.resize_side or self.size
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(side * long / short)
        new_w, new_h = (side, new_long) if w <= h else (new_long, side)
        image = image.resize((new_w, new_h), resample)
        if self.crop_offset == "round":
            left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        else:
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    @property
    def decode_side(self) -> int:
        """The smallest side the decoder may scale a large JPEG down to."""
        return max(self.size, self.resize_side or 0)


def decode_image(data, geometry: int | ImageGeometry, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded bytes -> ``uint8 [3, S, S]`` as ``geometry`` (or a side: squashed to it) says;
    with ``rng``, a light random crop first.

    Raises:
        UnusableImageError: see `open_image`.
    """
    if isinstance(geometry, int):
        geometry = ImageGeometry(geometry)
    image = open_image(data, min_side=geometry.decode_side)
    if rng is not None:
        # Keep at least 85% of each side: captions name positions, so no flips and no crops
        # that could move an object into another third of the frame.
        w, h = image.size
        scale = rng.uniform(0.85, 1.0)
        cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.crop((x0, y0, x0 + cw, y0 + ch))
    image = geometry.apply(image)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
