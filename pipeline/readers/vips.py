"""JPEG, PNG, GIF and HEIF/AVIF read through libvips: the header first, then the pixels top to bottom.

Opening reads the header only (the size, checked against the pixel limit before anything is decoded). The pixels
are then decoded band by band in sequential access: a window is cut from the bands that hold its rows, and the
bands above it are let go, so a caller that asks for windows in row order (the tiling task storing or streaming a
job's tiles) holds a few bands of the image, never the whole of it. A window above the bands held starts the
decoding again from the top (the formats are serial), which only callers out of row order pay.

Pixels come as libvips gives them (RGB order, 8 or 16 bits, with alpha where the file has it) and are turned into
exactly what OpenCV's `imdecode` gives for the same file, normalized (`images.normalize`): BGR or grey, 16-bit
scaled to 8, alpha dropped, grey with alpha as BGR, CMYK JPEGs by OpenCV's conversion, EXIF orientation ignored.
A caller that keeps only grey (a grey-only recognizer's tiles) opens it `grey`: each band is then converted to grey
once, RGB to grey directly, rather than to BGR and then window by window, overlaps twice (the same pixels as
`cv2.cvtColor(window, cv2.COLOR_BGR2GRAY)`, and a third of the bytes to cut and store).
pyvips with the pyvips-binary wheel (libvips and its codecs) is a dependency.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pyvips

from pipeline.readers.images import ImageError, normalize
from pipeline.tiling import Window

BAND_ROWS = 256  # rows decoded at a time: a 20000-pixel-wide RGB band is 15 MB
_DTYPES = {"uchar": np.uint8, "ushort": np.uint16}

pyvips.cache_set_max(0)  # libvips' operation cache would keep every decoded image: a worker reads many, once each


class _Reasons(logging.Handler):
    """The codec's own words for what is wrong with a file (libpng's "IDAT: incorrect data check", …), which libvips
    logs as warnings before it fails with a generic error: kept per thread for that error's message, and kept out
    of the worker's log, where a damaged file would write a line per strip."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().removeprefix("VIPS: ")
        if not message.startswith("error in tile") and not getattr(self.local, "first", None):
            self.local.first = message

    def clear(self) -> None:
        """Forget what was logged and libvips' error buffer (which keeps earlier files' messages) before a read."""
        self.local.first = None
        pyvips.vips_lib.vips_error_clear()

    def take(self) -> str | None:
        first, self.local.first = getattr(self.local, "first", None), None
        return first


_reasons = _Reasons()
logging.getLogger("pyvips").addHandler(_reasons)
logging.getLogger("pyvips").propagate = False


def _vips_error(what: str, error: pyvips.Error) -> ImageError:
    detail = " ".join(line.strip() for line in str(error.detail or error.message).splitlines() if line.strip())
    reason = _reasons.take()
    return ImageError(f"{what} is damaged or cut short: {reason + ' (' + detail + ')' if reason else detail}"[:400])


def cmyk_to_bgr(cmyk: np.ndarray) -> np.ndarray:
    """CMYK pixels as libvips gives them (0: no ink) converted as OpenCV converts a CMYK JPEG (Adobe's inverted
    values, each ink scaled by the black), so both read such a file alike."""
    raw = 255 - cmyk.astype(np.int32)
    black = raw[..., 3:4]
    bgr = black - (((255 - raw[..., 2::-1]) * black) >> 8)
    return bgr.astype(np.uint8)


class VipsSource:
    """An image libvips reads, decoded band by band from the top (see the module's docstring)."""

    windowed = False  # the image is decoded top to bottom, once, by the process that opened it
    levels = 1
    level = 0
    downsample = 1.0
    spatial = None
    reader = "vips"

    def __init__(self, target: Path | bytes, name: str, kind: str, grey: bool = False) -> None:
        """Open `target`, a file or its bytes in format `kind` (`formats.kind_of`), reading its header only; `grey`:
        give its pixels as grey."""
        self.target, self.name, self.kind = target, name, kind
        self.image = self._open()
        self.width, self.height = self.image.width, self.image.height
        self._cmyk = self.image.interpretation == "cmyk"
        self._grey = grey
        self.channels = 1 if grey or (self.image.bands == 1 and not self._cmyk) else 3
        if self.image.format not in _DTYPES:
            raise ImageError(f"{name}: unsupported pixel type {self.image.format}; use 8- or 16-bit images")
        self._bands: Iterator[np.ndarray] | None = None
        self._held: list[tuple[int, np.ndarray]] = []  # (first row, band), top to bottom, contiguous rows
        self._reached = 0  # rows decoded so far
        self._decoded = False  # `image` has been decoded (a sequential image decodes once)

    def _open(self) -> pyvips.Image:
        """The image with its header read (no pixels), in sequential access, failing on truncated pixel data."""
        _reasons.clear()
        try:
            if isinstance(self.target, bytes):
                return pyvips.Image.new_from_buffer(self.target, "", access="sequential", fail_on="truncated")
            return pyvips.Image.new_from_file(str(self.target), access="sequential", fail_on="truncated")
        except pyvips.Error as error:
            raise _vips_error(f"{self.name}: the {self.kind.upper()} header", error) from None

    def bands(self, rows: int = BAND_ROWS) -> Iterator[np.ndarray]:
        """The image's rows, top to bottom, `rows` at a time (the last band may be shorter), normalized (grey where
        opened `grey`)."""
        image = self._open() if self._decoded else self.image  # a second pass needs a decoder of its own
        self._decoded = True
        region = pyvips.Region.new(image)
        dtype = _DTYPES[image.format]
        for top in range(0, self.height, rows):
            count = min(rows, self.height - top)
            _reasons.clear()
            try:
                data = region.fetch(0, top, self.width, count)
            except pyvips.Error as error:
                raise _vips_error(self.name, error) from None
            yield self._pixels(np.frombuffer(data, dtype).reshape(count, self.width, image.bands))

    def _pixels(self, raw: np.ndarray) -> np.ndarray:
        if not self._grey:
            return self._to_bgr(raw)
        if raw.dtype == np.uint8 and raw.shape[2] in (3, 4) and not self._cmyk:
            return cv2.cvtColor(raw, cv2.COLOR_RGB2GRAY if raw.shape[2] == 3 else cv2.COLOR_RGBA2GRAY)
        pixels = self._to_bgr(raw)  # 16-bit, CMYK, grey with alpha: through BGR, as a window would be converted
        return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)

    def _to_bgr(self, raw: np.ndarray) -> np.ndarray:
        if self._cmyk:
            return cmyk_to_bgr(raw)
        if raw.shape[2] == 2:  # grey with alpha: OpenCV gives BGRA
            return normalize(cv2.cvtColor(np.ascontiguousarray(raw[:, :, 0]), cv2.COLOR_GRAY2BGR))
        if raw.shape[2] == 1:
            return normalize(raw[:, :, 0])
        return normalize(cv2.cvtColor(raw[:, :, :3], cv2.COLOR_RGB2BGR))

    def read(self, window: Window) -> np.ndarray:
        """The window's pixels, from the bands that hold its rows (decoded as far as its bottom row)."""
        if window.x < 0 or window.y < 0 or window.x2 > self.width or window.y2 > self.height or window.width <= 0:
            raise ImageError(f"window {window.to_list()[1:]} is not inside the {self.width}x{self.height} image")
        if self._bands is None or window.y < (self._held[0][0] if self._held else self._reached):
            self._bands, self._held, self._reached = self.bands(), [], 0
        self._held = [(top, band) for top, band in self._held if top + len(band) > window.y]
        while self._reached < window.y2:
            band = next(self._bands, None)
            if band is None:
                raise ImageError(f"{self.name} ends above row {window.y2}")
            self._held.append((self._reached, band))
            self._reached += len(band)
        return cut(self._held, window)

    def whole(self) -> np.ndarray:
        """The image decoded whole, into one array."""
        image, top = None, 0
        for band in self.bands():
            if image is None:
                image = np.empty((self.height, *band.shape[1:]), band.dtype)
            image[top : top + len(band)] = band
            top += len(band)
        assert image is not None  # an image has at least one row
        return image

    def close(self) -> None:
        self._bands, self._held = None, []


def cut(held: list[tuple[int, np.ndarray]], window: Window) -> np.ndarray:
    """The window's pixels from bands (first row, rows) that hold all its rows, in one copy."""
    first = held[0][1]
    tile = np.empty((window.y2 - window.y, window.x2 - window.x, *first.shape[2:]), first.dtype)
    for top, band in held:
        y, y2 = max(window.y, top), min(window.y2, top + len(band))
        if y < y2:
            tile[y - window.y : y2 - window.y] = band[y - top : y2 - top, window.x : window.x2]
    return tile
