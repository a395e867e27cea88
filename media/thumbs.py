"""Thumbnails (WebP, longest side 128 and 256 px) made at upload from the decoded, upright image.

Memory: Pillow's ``reduce``/``resize``/``convert`` of a whole image each make a full-size copy (an
RGBA image is first premultiplied into a second one), so a 50 MP RGBA upload used to cost three to
four times its decoded size. ``shrink`` works on bands of rows instead: the only full-size buffer is
the decoded image itself.
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["THUMB_SIZES", "THUMB_TYPE", "make_thumbnails", "shrink"]

THUMB_SIZES = (256, 128)  # largest first: each smaller one is cut from the previous, cheaper
THUMB_TYPE = "image/webp"
BAND_ROWS = 256  # rows per band in ``shrink``: at most ~7 MB of a 7,000-px-wide RGBA image at a time


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def shrink(image: Image.Image, side: int) -> Image.Image:
    """An RGB(A) copy whose longest side is between ``side`` and twice it (or the image's own, if smaller).

    Box-averaged by an integer factor (``Image.reduce``), one band of rows at a time, so no full-size
    copy is made whatever the mode; the caller may drop the full image as soon as this returns."""
    mode = "RGBA" if has_alpha(image) else "RGB"
    width, height = image.size
    factor = max(1, max(width, height) // side)
    if factor == 1:
        return image.convert(mode)
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    step = factor * max(1, BAND_ROWS // factor)  # a multiple of the factor: bands reduce edge to edge
    for top in range(0, height, step):
        band = image.crop((0, top, width, min(height, top + step))).convert(mode)
        out.paste(band.reduce(factor), (0, top // factor))
    return out


def make_thumbnails(image: Image.Image, sizes: tuple[int, ...] = THUMB_SIZES) -> dict[int, bytes]:
    """Return ``{size: webp bytes}``; thumbnails carry no metadata (nothing is passed to ``save``)."""
    work = shrink(image, max(sizes))
    work.info = {}
    out: dict[int, bytes] = {}
    for size in sorted(sizes, reverse=True):
        # Bilinear (antialiased, as every Pillow downscale): two thirds of bicubic's cost at these small
        # ratios (the preview is already at most twice the largest size), and no visible loss at 128-256 px.
        work.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        work.save(buf, "WEBP", quality=80, method=0)
        out[size] = buf.getvalue()
    return out
