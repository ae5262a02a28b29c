"""Contact sheets: the top-k retrieved images of a query as one PNG, with rank, score and caption."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..data.images import UnusableImageError, open_image

HIT = (46, 160, 67)
MISS = (207, 34, 46)
NEUTRAL = (200, 200, 200)


def contact_sheet(images: Sequence[bytes], captions: Sequence[str], *, title: str = "", hits: Sequence[bool] | None = None,
                  columns: int = 4, tile: int = 160) -> Image.Image:
    """A grid of ``images`` (encoded bytes; empty bytes draw a grey box) with a caption under
    each and ``title`` on top. ``hits``: frame each tile green (right) or red (wrong)."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default()
    line_height, caption_lines, pad = 12, 3, 6
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    cell_w, cell_h = tile + 2 * pad, tile + 2 * pad + caption_lines * line_height
    header = 2 * line_height + pad if title else 0
    sheet = Image.new("RGB", (columns * cell_w, header + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), _fit(title, columns * cell_w // 6), fill="black", font=font)
    for index, (data, caption) in enumerate(zip(images, captions)):
        x, y = (index % columns) * cell_w, header + (index // columns) * cell_h
        frame = NEUTRAL if hits is None else (HIT if hits[index] else MISS)
        draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + tile + 2 * pad - 2), outline=frame, width=3)
        picture = _open(data, tile)
        if picture is not None:
            sheet.paste(picture, (x + pad + (tile - picture.width) // 2, y + pad + (tile - picture.height) // 2))
        else:
            draw.rectangle((x + pad, y + pad, x + pad + tile, y + pad + tile), fill=NEUTRAL)
        for line_no, line in enumerate(textwrap.wrap(caption, width=max(8, cell_w // 6))[:caption_lines]):
            draw.text((x + pad, y + tile + 2 * pad + line_no * line_height), line, fill="black", font=font)
    return sheet


def _open(data: bytes, size: int) -> Image.Image | None:
    if not data:
        return None
    try:
        image = open_image(data)
    except UnusableImageError:
        return None
    # Thumbnails are small: scale up with nearest neighbour so that shapes stay crisp.
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
