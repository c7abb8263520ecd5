"""Reading images safely: confined paths, the pixel limit, 8-bit grey or BGR pixels, clear errors."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 40_000 * 40_000
NPY_MAGIC = b"\x93NUMPY"


class ImageError(ValueError):
    """The image cannot be used: missing, refused, not an image, damaged, or too large."""


def roots_from(value: str) -> list[Path]:
    """Folders from an os.pathsep-separated list (TILEREC_ALLOWED_ROOTS, TILEREC_MODEL_ROOTS), resolved.

    Args:
        value: the list, as the variable holds it; empty parts are left out.

    Returns:
        The folders' real paths, in the list's order."""
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


def check_pixels(width: int, height: int, max_pixels: int, verb: str = "decode") -> None:
    """Refuse an image that would decode (or, by windows, read: `verb`) more than `max_pixels` pixels, before any
    pixel is read."""
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            f"(TILEREC_MAX_PIXELS); refusing to {verb} it"
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


def encode_array(image: np.ndarray) -> bytes:
    """An array as .npy bytes: lossless, no codec cost, and `sources.decode` reads it back."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(image), allow_pickle=False)
    return buffer.getvalue()
