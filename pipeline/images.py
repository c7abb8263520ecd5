"""Reading images safely: confined paths, size checked from the header before decoding, clear errors."""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 40_000 * 40_000
NPY_MAGIC = b"\x93NUMPY"


class ImageError(ValueError):
    """The image cannot be used: missing, refused, not an image, damaged, or too large."""


def allowed_roots_from_env(value: str | None = None) -> list[Path]:
    """Roots from TILEREC_ALLOWED_ROOTS (os.pathsep-separated), resolved."""
    value = os.environ.get("TILEREC_ALLOWED_ROOTS", "") if value is None else value
    return [Path(part).resolve() for part in value.split(os.pathsep) if part.strip()]


def confine(path: str, roots: Sequence[Path]) -> Path:
    """The real path of `path` if it lies inside one of `roots` (after resolving `..` and symlinks)."""
    if not roots:
        raise ImageError(
            f"reading files is disabled: {path!r} is not inside any allowed root (set TILEREC_ALLOWED_ROOTS)"
        )
    real = Path(path).resolve()
    if not any(real == root or root in real.parents for root in roots):
        shown = os.pathsep.join(str(r) for r in roots)
        raise ImageError(f"{path!r} is outside the allowed roots ({shown}); refusing to read it")
    return real


@contextmanager
def file_errors(path: str) -> Iterator[None]:
    """OS errors while reading an image file, as ImageErrors in words a user understands."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"image file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{path!r} is a directory, not an image file") from None
    except OSError as error:
        raise ImageError(f"cannot read image file {path!r}: {error.strerror}") from None


def read_file(path: str, roots: Sequence[Path]) -> bytes:
    real = confine(path, roots)
    with file_errors(path):
        return real.read_bytes()


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("the PNG header is damaged")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ImageError("the JPEG header is damaged")
        marker = data[position + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            position += 2 if marker != 0xFF else 1
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if position + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    raise ImageError("the JPEG file ends before its frame header: it is truncated or damaged")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise ImageError("the BMP header is damaged")
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the header of a PNG, JPEG or BMP; None for other formats."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"BM"):
        return _bmp_size(data)
    return None


def check_complete(data: bytes) -> None:
    """OpenCV decodes a truncated PNG or JPEG into a half-grey picture without complaint; refuse it instead.
    `data`: the file, or its first and last 32 bytes joined."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" not in data[-32:]:
        raise ImageError("the PNG file is truncated (no IEND chunk at its end)")
    if data.startswith(b"\xff\xd8") and b"\xff\xd9" not in data[-16:]:
        raise ImageError("the JPEG file is truncated (no end-of-image marker)")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(TILEREC_MAX_PIXELS); refusing to decode it"
        )


def normalize(image: np.ndarray) -> np.ndarray:
    """8-bit, 1 or 3 channels (BGR): what every recognizer accepts. 16-bit is scaled, alpha is dropped."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {image.dtype}; use 8- or 16-bit images")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageError(f"unsupported image shape {image.shape}; expected grey, BGR or BGRA")
    return np.ascontiguousarray(image)


def _load_npy(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise ImageError(f"the stored array cannot be read: {error}") from None
    if array.ndim not in (2, 3):
        raise ImageError(f"the stored array has shape {array.shape}; expected (height, width[, channels])")
    check_pixels(array.shape[1], array.shape[0], max_pixels)
    return normalize(array)


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (or a stored .npy array) into an 8-bit grey or BGR array."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if data.startswith(NPY_MAGIC):
        return _load_npy(data, max_pixels)
    size = header_size(data)
    if size is not None:
        check_pixels(*size, max_pixels)
        check_complete(data)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"the data is not an image OpenCV can decode ({len(data)} bytes starting {data[:8]!r})")
    check_pixels(image.shape[1], image.shape[0], max_pixels)
    return normalize(image)


def encode_array(image: np.ndarray) -> bytes:
    """An array as .npy bytes: lossless, no codec cost, and `decode` reads it back."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()
