"""Odd and hostile inputs that real collections hold, made here so every reader is tested on
the same bytes: images that must decode right, images that must be refused, labels and
captions that must be counted as bad rows."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (220, 30, 40)


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, **options)
    return out.getvalue()


def png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def cmyk_jpeg() -> bytes:
    """A red square in a CMYK JPEG (print workflows write these)."""
    return jpeg(Image.new("RGB", (32, 32), RED).convert("CMYK"))


def png_16bit_grey(level: int = 40000) -> bytes:
    """A 16-bit greyscale PNG of one level (of 65535): 8-bit ``level >> 8``, not white."""
    return png(Image.fromarray(np.full((32, 32), level, dtype=np.uint16)))


def palette_png_with_transparency() -> bytes:
    """Palette image: left half transparent (index 0), right half red (index 1)."""
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (16, 0, 32, 32))
    return png(image, transparency=0)


def rgba_png() -> bytes:
    """Fully transparent left half (black underneath), opaque red right half."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((*RED, 255), (16, 0, 32, 32))
    return png(image)


def exif_rotated_jpeg() -> bytes:
    """Stored 48 wide x 24 high, red on the left; EXIF orientation 6 (rotate 90° clockwise to
    show): shown 24 wide x 48 high, red on top."""
    image = Image.new("RGB", (48, 24), (255, 255, 255))
    image.paste(RED, (0, 0, 24, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(image, exif=exif.tobytes())


def large_jpeg(side: int = 3000) -> bytes:
    return jpeg(Image.new("RGB", (side, side), RED))


def truncated_png() -> bytes:
    return png(Image.new("RGB", (32, 32), RED))[:60]


def decompression_bomb_png(side: int = 20_000) -> bytes:
    """A valid PNG header announcing ``side x side`` pixels (400 MP at 20,000): a few hundred
    bytes that a decoder would inflate into gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * 64)  # far too little data: the size alone must stop it
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def moderate_bomb_png(side: int = 9_000) -> bytes:
    """A real, complete 81-megapixel PNG of a few dozen KB: under Pillow's own bomb limit, over ours."""
    return png(Image.new("L", (side, side), 128), optimize=False, compress_level=9)


def ppm_image() -> bytes:
    """A well-formed image in a format vcl-dist does not accept (Pillow would decode it)."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), RED).save(out, format="PPM")
    return out.getvalue()


def eps_document() -> bytes:
    """An EPS file: Pillow hands these to Ghostscript, so they must never reach a decoder."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n"


# Images that must decode (a good row) and images that must be refused (a bad row, and why).
GOOD_ODD_IMAGES = {
    "cmyk_jpeg": cmyk_jpeg,
    "png_16bit": png_16bit_grey,
    "palette_transparency": palette_png_with_transparency,
    "rgba": rgba_png,
    "exif_rotated": exif_rotated_jpeg,
}
BAD_IMAGES = {
    "not_an_image": (lambda: b"this is no image at all", "undecodable image"),
    "truncated": (truncated_png, "undecodable image"),
    "bomb": (decompression_bomb_png, "image too large"),
    "ppm": (ppm_image, "undecodable image"),
    "eps": (eps_document, "undecodable image"),
}
# Label cells that are no class id (with 30 classes), as text so one column holds them all.
BAD_LABELS = ["nan", "inf", "1e30", "-5", "3.5", "Infinity", "30", "cat"]
# Caption cells that are no caption: not UTF-8, blank.
BAD_CAPTIONS = [b"\xff\xfe\xfa caption in no encoding", b"   \n\t "]


def plant_hostile_rows(table: dict, rows: list[int]) -> None:
    """Make ``rows`` of a shard's columns bad, one kind each in turn (16 kinds): broken and
    hostile images, a missing one, labels that are no class id, captions that are no text."""
    kinds = ([("image", make()) for make, _ in BAD_IMAGES.values()] + [("image", None)]
             + [("label", label) for label in BAD_LABELS] + [("caption", caption) for caption in BAD_CAPTIONS])
    for n, i in enumerate(rows):
        column, value = kinds[n % len(kinds)]
        table[column][i] = value
