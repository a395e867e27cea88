"""Test inputs built in memory: photos with EXIF GPS, other image formats, clip containers."""

from __future__ import annotations

import io
import os
import struct

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


def box(kind: bytes, payload: bytes) -> bytes:
    """One ISO BMFF box (32-bit size)."""
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def mvhd(timescale: int = 1000, duration: int = 10_000) -> bytes:
    """A version-0 movie header box (100-byte payload: times, rate, volume, matrix, next track id)."""
    matrix = b"".join(v.to_bytes(4, "big") for v in (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000))
    payload = (b"\x00" * 12 + timescale.to_bytes(4, "big") + duration.to_bytes(4, "big") + b"\x00\x01\x00\x00"
               + b"\x01\x00" + b"\x00" * 10 + matrix + b"\x00" * 24 + (2).to_bytes(4, "big"))
    return box(b"mvhd", payload)


def moov(timescale: int = 1000, duration: int = 10_000) -> bytes:
    """A movie box with its header and one (minimal) track."""
    tkhd = box(b"tkhd", b"\x00\x00\x00\x03" + b"\x00" * 80)
    return box(b"moov", mvhd(timescale, duration) + box(b"trak", tkhd))


def mp4(size: int, moov_first: bool = True) -> bytes:
    """A structurally valid MP4 of exactly ``size`` bytes: ftyp, moov (mvhd + trak) and an mdat of random
    bytes (incompressible, like real video). ``moov_first=False``: the moov after the media, as cameras write it."""
    head = moov()
    payload = os.urandom(size - len(MP4_HEAD) - len(head) - 8)
    mdat = box(b"mdat", payload)
    return MP4_HEAD + (head + mdat if moov_first else mdat + head)


def ebml(ident: int, payload: bytes, unknown_size: bool = False) -> bytes:
    """One EBML element with an 8-byte size field (or the unknown size, as live recorders write)."""
    size = b"\x01\xff\xff\xff\xff\xff\xff\xff" if unknown_size else (0x01 << 56 | len(payload)).to_bytes(8, "big")
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + size + payload


WEBM_HEAD = bytes.fromhex("1a45dfa3") + bytes.fromhex(
    "9f4286810142f7810142f2810442f381084282847765626d4287810242858102")


def webm(size: int, duration_ms: float | None = 10_000.0, live: bool = False) -> bytes:
    """A structurally valid WebM of exactly ``size`` bytes: EBML header, Segment with Info, Tracks and one
    Cluster whose SimpleBlock holds random bytes. ``live``: Segment and Cluster of unknown size, no Duration
    (what a browser's MediaRecorder streams)."""
    info = ebml(0x2AD7B1, (1_000_000).to_bytes(3, "big"))
    if duration_ms is not None:
        info += ebml(0x4489, struct.pack(">d", duration_ms))
    track = ebml(0xAE, ebml(0xD7, b"\x01") + ebml(0x83, b"\x01") + ebml(0x86, b"V_VP8"))
    head = ebml(0x1549A966, info) + ebml(0x1654AE6B, track)
    cluster_head = ebml(0xE7, b"\x00")
    overhead = len(WEBM_HEAD) + 12 + len(head) + 12 + len(cluster_head) + 9 + 4
    block = ebml(0xA3, b"\x81\x00\x00\x80" + os.urandom(size - overhead))
    cluster = ebml(0x1F43B675, cluster_head + block, unknown_size=live)
    return WEBM_HEAD + ebml(0x18538067, head + cluster, unknown_size=live)
