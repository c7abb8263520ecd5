"""What an image file is, from its first bytes: its format, for the formats OpenCV decodes its size, and from its
ends whether it is cut short.

Every input is identified here before anything else reads it, so a file that is no image format tilerec reads (a
video, an archive, 4 GB of zeros) is refused after its first HEAD_BYTES, whatever its size. The formats libvips
reads give their size from libvips' own header read (`readers.vips`); the others (`OPENCV_FORMATS`) from the
header parsed here or by Pillow (BMP, JPEG 2000), which reads headers without decoding; either way the pixel
limit is checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np

from pipeline.readers.images import NPY_MAGIC, ImageError

HEAD_BYTES = 64 * 1024  # enough for every header read here, barring a huge comment before a PNM's size
VIPS_FORMATS = ("jpeg", "png", "gif", "heif", "tiff")
# WebP too: libvips decodes a WebP frame whole before its first band anyway, and took 1.9x OpenCV's time doing it
OPENCV_FORMATS = ("webp", "bmp", "pnm", "pfm", "hdr", "sun", "jp2")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"mif1", b"msf1", b"avif", b"avis")
READ = "a JPEG, PNG, WebP, TIFF, GIF, HEIF/AVIF, BMP, PNM/PFM, HDR, Sun raster, JPEG 2000 or .npy file"  # what to give
_HDR_SIZE = re.compile(rb"\n\n([-+][XY]) (\d+) ([-+][XY]) (\d+)\n")


def kind_of(head: bytes) -> str | None:
    """The format whose signature `head` starts with.

    Args:
        head: the file's first bytes (at least 16 where the file has them).

    Returns:
        One of VIPS_FORMATS, OPENCV_FORMATS or "npy"; None where no format tilerec decodes starts this way.
    """
    signatures = (
        ("png", head.startswith(b"\x89PNG\r\n\x1a\n")),
        ("jpeg", head.startswith(b"\xff\xd8\xff")),
        ("webp", head[:4] == b"RIFF" and head[8:12] == b"WEBP"),
        ("gif", head[:6] in (b"GIF87a", b"GIF89a")),
        ("heif", head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS),
        ("tiff", head[:4] in TIFF_MAGIC),
        ("npy", head.startswith(NPY_MAGIC)),
        ("bmp", head[:2] == b"BM"),
        ("pnm", len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()),
        ("pfm", head[:2] in (b"PF", b"Pf") and head[2:3].isspace()),
        ("hdr", head.startswith((b"#?RADIANCE", b"#?RGBE"))),
        ("sun", head[:4] == b"\x59\xa6\x6a\x95"),
        ("jp2", head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"))),
    )
    return next((name for name, matches in signatures if matches), None)


def dimensions(kind: str | None, head: bytes) -> tuple[int, int] | None:
    """(width, height) of an image in one of OPENCV_FORMATS or of a .npy array, from its header (`head`: its first
    HEAD_BYTES); None for the other formats, whose readers read their own headers.

    Raises:
        ImageError: the header is damaged or cut short.
    """
    if kind == "npy":
        return _npy_size(head)
    if kind not in OPENCV_FORMATS:
        return None
    if kind == "hdr":
        found = _HDR_SIZE.search(head)
        if found is None:
            raise ImageError("the HDR (Radiance) header is damaged: no resolution line")
        sizes = {found.group(1)[1:]: int(found.group(2)), found.group(3)[1:]: int(found.group(4))}
        return sizes[b"X"], sizes[b"Y"]
    if kind == "webp":
        return _webp_size(head)
    if kind in ("pnm", "pfm"):
        fields = re.sub(rb"#[^\n]*", b" ", head[2:1024]).split()  # width and height follow the magic, after comments
        if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
            raise ImageError(f"the {kind.upper()} header is damaged: no width and height after its magic number")
        return int(fields[0]), int(fields[1])
    if kind == "sun":
        if len(head) < 12:
            raise ImageError("the Sun raster header is damaged")
        width, height = struct.unpack(">II", head[4:12])
        return width, height
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(head), formats=None) as image:  # Pillow reads the header only
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as error:
        raise ImageError(f"the {kind.upper()} header is damaged or cut short: {error}") from None


def _webp_size(head: bytes) -> tuple[int, int]:
    """The canvas of a WebP from its first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    chunk, body = head[12:16], head[20:40]
    if chunk == b"VP8X" and len(body) >= 10:
        return 1 + int.from_bytes(body[4:7], "little"), 1 + int.from_bytes(body[7:10], "little")
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        bits = int.from_bytes(body[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    raise ImageError("the WebP header is damaged or cut short: no VP8, VP8L or VP8X chunk first")


def truncation(kind: str | None, head: bytes, tail: bytes, size: int) -> str | None:
    """Why a file is cut short, from its ends (decoders fill a cut JPEG or PNG with grey without complaint); None
    where its ends tell no truncation.

    Args:
        kind: the format (`kind_of`).
        head, tail: the file's first bytes and its last 32 (or fewer).
        size: the file's length in bytes.
    """
    if kind == "png" and b"IEND" not in tail:
        return "the PNG file is truncated (no IEND chunk at its end)"
    if kind == "jpeg" and b"\xff\xd9" not in tail[-16:]:
        return "the JPEG file is truncated (no end-of-image marker)"
    if kind == "webp" and len(head) >= 8 and 8 + struct.unpack("<I", head[4:8])[0] > size:
        return "the WebP file is truncated (shorter than its RIFF header says)"
    return None


def _npy_size(head: bytes) -> tuple[int, int]:
    """(width, height) of a .npy array of shape (height, width[, channels]), from its header."""
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(stream)
    except ValueError as error:
        raise ImageError(f"the stored array cannot be read: {error}") from None
    if len(shape) not in (2, 3):
        raise ImageError(f"the stored array has shape {shape}; expected (height, width[, channels])")
    return shape[1], shape[0]
