"""Test inputs built in memory: photos with EXIF GPS, other image formats, clip containers."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import ExifTags, Image

GPS = {1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 1.0)}


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A noisy gradient: compresses like a real photo (not like a flat test card)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))


def jpeg(im: Image.Image | None = None, gps: bool = True, orientation: int | None = None, quality: int = 85) -> bytes:
    im = im or photo()
    exif = Image.Exif()
    exif[0x010F] = "ACME DoorCam"
    exif[0xA431] = "SERIAL-0042"  # BodySerialNumber
    if gps:
        exif[ExifTags.IFD.GPSInfo] = GPS
    if orientation:
        exif[0x0112] = orientation
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif, quality=quality, comment=b"front door, 52.52N 13.40E")
    return out.getvalue()


def png(im: Image.Image | None = None, gps: bool = True) -> bytes:
    im = im or photo(320, 240)
    exif = Image.Exif()
    if gps:
        exif[ExifTags.IFD.GPSInfo] = GPS
    out = io.BytesIO()
    im.save(out, "PNG", exif=exif)
    return out.getvalue()


def webp(im: Image.Image | None = None) -> bytes:
    out = io.BytesIO()
    (im or photo(320, 240)).save(out, "WEBP", quality=80)
    return out.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A tiny PNG that claims side x side pixels (1-bit, compresses to almost nothing)."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, "PNG", optimize=True)
    return out.getvalue()


MP4_HEAD = (24).to_bytes(4, "big") + b"ftypisom" + b"\x00\x00\x02\x00" + b"isomiso2"


def mp4(size: int) -> bytes:
    """An ftyp box then random bytes: enough for signature checks, incompressible like real video."""
    return MP4_HEAD + os.urandom(size - len(MP4_HEAD))


WEBM_HEAD = bytes.fromhex("1a45dfa3") + bytes.fromhex("9f4286810142f7810142f2810442f381084282847765626d42878102")
