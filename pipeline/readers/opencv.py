"""WebP, BMP, PNM/PFM, Radiance HDR, Sun raster and JPEG 2000, decoded whole by OpenCV, and .npy arrays by NumPy.

libvips as the pyvips-binary wheel ships it reads none of these formats but WebP, whose frame it decodes whole
before its first band anyway, in 1.9x OpenCV's time (docs/performance.md). Each one's size is read from its header
(`formats.dimensions`; an array's from the .npy header) and checked against the pixel limit before it is decoded.
A WebP read in row order is a `DeferredSource`: decoded at its first window, so a tiling task publishes the job's
batches first and decodes it after (`sources.open_source`).
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from pipeline.readers import inputs
from pipeline.readers.images import ImageError, check_pixels, normalize
from pipeline.readers.inputs import Input
from pipeline.tiling import Window

DEFERRED = ("webp",)  # always colour (RGB or RGBA): its channels are known before it is decoded


def decode(data: bytes, kind: str, max_pixels: int) -> np.ndarray:
    """The image as 8-bit grey or BGR (`images.normalize`).

    Args:
        data: the whole file.
        kind: its format (`formats.kind_of`): one of `formats.OPENCV_FORMATS`, or "npy".
        max_pixels: the most pixels decoded.
    """
    if kind == "npy":
        return _load_npy(data)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"the {kind.upper()} image cannot be decoded ({len(data)} bytes): it is damaged or cut short")
    check_pixels(image.shape[1], image.shape[0], max_pixels)
    return normalize(image)


def _load_npy(data: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise ImageError(f"the stored array cannot be read: {error}") from None
    return normalize(array)


class DeferredSource:
    """An image OpenCV (or NumPy) decodes whole, sized from its header and decoded at its first window (or by
    `whole`): a tiling task that streams a WebP's tiles (one of DEFERRED) opens it before it publishes the job's
    batches, and decodes it only after; the other formats are decoded as they are opened (`sources.open_source`)."""

    windowed = False  # decoded once, by the process that opened it
    levels = 1
    level = 0
    downsample = 1.0
    spatial = None
    reader = "array"
    channels = 3  # of one of DEFERRED (a WebP is RGB or RGBA, given as BGR): the others are decoded before use

    def __init__(self, found: Input, max_pixels: int) -> None:
        """`found`, in one of `formats.OPENCV_FORMATS` or .npy, sized from its header; `max_pixels`: the most pixels
        its decoding may give."""
        assert found.kind is not None and found.dimensions is not None  # what `inputs.identify` gives of these formats
        self.found, self.kind, self.max_pixels = found, found.kind, max_pixels
        self.width, self.height = found.dimensions
        self.pixels: np.ndarray | None = None

    def whole(self) -> np.ndarray:
        """The image decoded (once) as 8-bit grey or BGR."""
        if self.pixels is None:
            self.pixels = decode(inputs.data(self.found), self.kind, self.max_pixels)
        return self.pixels

    def read(self, window: Window) -> np.ndarray:
        return self.whole()[window.y : window.y2, window.x : window.x2]

    def close(self) -> None:
        self.pixels = None
