"""WebP, BMP, PNM/PFM, Radiance HDR, Sun raster and JPEG 2000, decoded whole by OpenCV, and .npy arrays by NumPy.

libvips as the pyvips-binary wheel ships it reads none of these formats but WebP, whose frame it decodes whole
before its first band anyway, in 1.9x OpenCV's time (docs/performance.md). Each one's size is read from its header
(`formats.opencv_size`; an array's from the .npy header) and checked against the pixel limit before it is decoded.
A WebP read in row order is a `DeferredSource`: decoded at its first window, so a tiling task publishes the job's
batches first and decodes it after (`sources.open_source`).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np

from pipeline.readers import formats
from pipeline.readers.images import ImageError, check_pixels, normalize
from pipeline.tiling import Window

DEFERRED = ("webp",)  # always colour (RGB or RGBA): its channels are known before it is decoded


def decode(data: bytes, kind: str, max_pixels: int) -> np.ndarray:
    """The image as 8-bit grey or BGR (`images.normalize`).

    Args:
        data: the whole file.
        kind: its format (`formats.sniff`): one of `formats.OPENCV_FORMATS`, or "npy".
        max_pixels: the most pixels decoded.
    """
    check_pixels(*size(kind, data[: formats.HEAD_BYTES]), max_pixels)
    if kind == "npy":
        return _load_npy(data)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"the {kind.upper()} image cannot be decoded ({len(data)} bytes): it is damaged or cut short")
    check_pixels(image.shape[1], image.shape[0], max_pixels)
    return normalize(image)


def size(kind: str, head: bytes) -> tuple[int, int]:
    """(width, height) of an image in one of `formats.OPENCV_FORMATS` or of a .npy array, from its header (`head`:
    the file's first `formats.HEAD_BYTES`)."""
    if kind != "npy":
        return formats.opencv_size(kind, head)
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


def _load_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise ImageError(f"the stored array cannot be read: {error}") from None
    return normalize(array)


class DeferredSource:
    """An image in one of DEFERRED, sized from its header and decoded whole at its first window: a tiling task that
    streams its tiles opens it before it publishes the job's batches, and decodes it only after."""

    windowed = False  # decoded once, by the process that opened it
    levels = 1
    level = 0
    downsample = 1.0
    spatial = None
    reader = "array"
    channels = 3  # a WebP is RGB or RGBA, given as BGR

    def __init__(self, load: Callable[[], bytes], kind: str, size: tuple[int, int], max_pixels: int) -> None:
        """`load` gives the whole file, of format `kind` and (width, height) `size` (from its header, checked)."""
        self.load, self.kind, self.max_pixels = load, kind, max_pixels
        self.width, self.height = size
        self.pixels: np.ndarray | None = None

    def read(self, window: Window) -> np.ndarray:
        if self.pixels is None:
            self.pixels = decode(self.load(), self.kind, self.max_pixels)
        return self.pixels[window.y : window.y2, window.x : window.x2]

    def close(self) -> None:
        self.pixels = None
