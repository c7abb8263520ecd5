"""Tiled and stripped TIFFs (BigTIFF and pyramids too) read window by window through tifffile.

Opening reads the header (the image file directories) only. `read(window)` decodes only the TIFF tiles or strips
that the window touches, each with its own offset, by tifffile's codecs; an uncompressed, contiguous image is read
row by row (a view, for bytes in memory). A TIFF stored as one compressed strip cannot be read by window: it is
decoded whole. Opened `grey` (a grey-only recognizer's windows), an 8-bit RGB TIFF's tiles or strips are converted
to grey once each as decoded and windows assembled from them, instead of each window converted to BGR and then to
grey (overlapping windows share tiles): the same pixels.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.model import Spatial
from pipeline.readers import remote
from pipeline.readers.images import ImageError, normalize
from pipeline.readers.inputs import Input
from pipeline.readers.remote import RemoteObject
from pipeline.tiling import Window

GEO_TAGS = (33550, 33922, 34264, 34735)  # ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory
SEGMENT_CACHE_BYTES = 64 * 2**20  # decoded TIFF tiles kept per open file: neighbouring windows share tiles


@dataclass(frozen=True)
class _Layout:
    """Where a TIFF page's pixels are: a grid of segments (tiles, or strips as full-width tiles)."""

    segment_h: int
    segment_w: int
    across: int  # segments per row of the grid
    down: int  # rows of segments
    planes: int  # 1 (samples interleaved) or samples per pixel (planar configuration "separate")


def _tiff_error(name: str, error: Exception) -> ImageError:
    return ImageError(f"{name} is not a readable TIFF: {type(error).__name__}: {error}")


class TiffSource:
    """One pyramid level of the first image series of a TIFF, read window by window.

    Opening reads the header (the image file directories) only. Tiles and strips are read with their own offsets
    and decoded by tifffile; an uncompressed, contiguous image is read row by row (a view, for bytes in memory).
    """

    reader = "tiff"

    def __init__(self, tiff: Any, name: str, level: int = 0, data: bytes | None = None, grey: bool = False) -> None:
        self.tiff, self.name, self.level, self.grey = tiff, name, level, grey
        series = tiff.series[0]
        self.levels = len(series.levels)
        if not 0 <= level < self.levels:
            raise ImageError(f"{name} has {self.levels} pyramid level(s) (0 to {self.levels - 1}); level {level} asked")
        page = series.levels[level].pages[0]
        self.page = page.aspage() if hasattr(page, "aspage") else page
        self.width, self.height = int(self.page.imagewidth), int(self.page.imagelength)
        self.downsample = int(series.levels[0].pages[0].imagewidth) / max(self.width, 1)
        self._photometric, samples = self._check_pixels_supported()
        self.channels = 1 if grey or samples < 3 else 3
        self._samples = samples
        # tiles or strips turned grey as decoded, where that gives the pixels a BGR window turned grey would
        interleaved_rgb8 = self._photometric == "RGB" and np.dtype(self.page.dtype) == np.uint8
        self._grey_segments = grey and interleaved_rgb8 and int(self.page.shaped[0]) == 1
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._data = data
        self._mapped: np.ndarray | None = None  # contiguous pixels: a view of the bytes, or None for a file
        self._contiguous: tuple[int, np.dtype, tuple[int, ...]] | None = None  # (offset, dtype, shaped)
        self._layout: _Layout | None = None
        self.size: int | None = None  # of a file object (an object in storage), whose handle has no path
        self.spatial: Spatial | None = None
        self.windowed = self._mappable() or self.page.is_tiled or self._strip_bytes() <= SEGMENT_CACHE_BYTES

    def validate(self) -> TiffSource:
        """Check where the header says the pixels are against the file (enough segments, none past its end) and
        prepare to read them. Separate from opening so that a size limit is applied before anything else."""
        file_size = (
            len(self._data) if self._data is not None else self.size or os.path.getsize(self.tiff.filehandle.path)
        )
        if self._mappable():
            self._contiguous = self._locate(file_size)
            if self._data is not None:
                offset, dtype, shape = self._contiguous
                self._mapped = np.frombuffer(self._data, dtype, int(np.prod(shape)), offset).reshape(shape)
        elif self.windowed:
            self._layout = self._segment_layout(file_size)
        return self

    def _mappable(self) -> bool:
        page = self.page
        return not page.is_tiled and page.is_contiguous and page.is_final and len(page.dataoffsets) > 0

    def _strip_bytes(self) -> int:
        rows = min(int(self.page.rowsperstrip or self.height), self.height)
        return rows * self.width * self._samples * np.dtype(self.page.dtype).itemsize

    def _check_pixels_supported(self) -> tuple[str, int]:
        page = self.page
        photometric = getattr(page.photometric, "name", str(page.photometric))
        samples = int(page.samplesperpixel)
        bilevel = page.dtype is not None and np.dtype(page.dtype) == np.dtype(bool) and samples == 1
        if not bilevel and (
            page.dtype is None or np.dtype(page.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16))
        ):
            raise ImageError(
                f"{self.name}: unsupported TIFF pixel type {page.dtype}; use 1-bit grey, 8- or 16-bit images"
            )
        self._check_codec()
        if int(getattr(page, "imagedepth", 1)) != 1:
            raise ImageError(f"{self.name}: volumetric TIFFs (image depth > 1) are not supported")
        if photometric in ("MINISBLACK", "MINISWHITE") and samples <= 2:
            return photometric, samples
        if photometric in ("RGB", "YCBCR") and samples in (3, 4):
            return "RGB", samples  # tifffile's JPEG decoder gives RGB for YCbCr
        raise ImageError(
            f"{self.name}: unsupported TIFF colour layout ({photometric}, {samples} samples per pixel); "
            "use grey, RGB or RGBA"
        )

    def _check_codec(self) -> None:
        """Refuse, when opening, a compression this installation cannot decode (rather than failing every tile)."""
        from tifffile import TIFF

        compression = int(self.page.compression)
        if compression == 1:
            return
        try:
            TIFF.DECOMPRESSORS[compression]
        except KeyError as error:
            reason = str(error.args[0]) if error.args else f"compression {compression} is unknown"
            hint = " (pip install 'tilerec[tiff-codecs]')" if "imagecodecs" in reason else ""
            raise ImageError(f"{self.name}: cannot decode this TIFF: {reason}{hint}") from None

    def _locate(self, file_size: int) -> tuple[int, np.dtype, tuple[int, ...]]:
        """Where an uncompressed, contiguous image's pixels are: (offset, dtype in the file's byte order, shape)."""
        page = self.page
        dtype = np.dtype(page.dtype).newbyteorder("<" if self.tiff.byteorder == "<" else ">")
        offset = int(page.dataoffsets[0])
        shape = tuple(int(v) for v in page.shaped)  # (planes, depth, height, width, samples)
        if offset + int(np.prod(shape)) * dtype.itemsize > file_size:
            raise ImageError(f"{self.name} is truncated: its pixels reach past the end of the file")
        return offset, dtype, shape

    def _rows(self, window: Window) -> np.ndarray:
        """The window's part of each row of a contiguous, uncompressed image, read straight from the file.

        Not memory-mapped: mapped pages count as the process's own memory, so a tile process would in the end
        appear to hold the whole file."""
        offset, dtype, (planes, _, height, width, samples) = self._contiguous  # type: ignore[misc]
        out = np.empty((planes, window.height, window.width * samples), dtype)
        handle, row_bytes = self.tiff.filehandle, window.width * samples * dtype.itemsize
        for plane in range(planes):
            for row in range(window.height):
                handle.seek(offset + ((plane * height + window.y + row) * width + window.x) * samples * dtype.itemsize)
                data = handle.read(row_bytes)
                if len(data) != row_bytes:
                    raise ImageError(f"{self.name} is truncated: row {window.y + row} is cut short")
                out[plane, row] = np.frombuffer(data, dtype)
        return out.reshape(planes, window.height, window.width, samples)

    @staticmethod
    def _interleave(raw: np.ndarray) -> np.ndarray:
        """(planes, rows, columns, samples) to (rows, columns, channels)."""
        return np.moveaxis(raw[..., 0], 0, -1) if raw.shape[0] > 1 else raw[0]

    def _segment_layout(self, file_size: int) -> _Layout:
        page = self.page
        planes = int(page.shaped[0])
        if page.is_tiled:
            h, w = int(page.tilelength), int(page.tilewidth)
        else:
            h, w = min(int(page.rowsperstrip or self.height), self.height), self.width
        across, down = -(-self.width // w), -(-self.height // h)
        if len(page.dataoffsets) < planes * across * down:
            raise ImageError(
                f"{self.name} is damaged: it has {len(page.dataoffsets)} data segments where its "
                f"{self.width}x{self.height} size needs {planes * across * down}"
            )
        ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, dtype=np.int64)
        if len(ends) and int(ends.max()) > file_size:
            raise ImageError(
                f"{self.name} is truncated: its data reaches byte {int(ends.max()):,} of a {file_size:,}-byte file"
            )
        return _Layout(h, w, across, down, planes)

    def read(self, window: Window) -> np.ndarray:
        """The window's pixels as 8-bit grey or BGR, decoding only the TIFF segments it touches."""
        if window.x < 0 or window.y < 0 or window.x2 > self.width or window.y2 > self.height or window.width <= 0:
            raise ImageError(f"window {window.to_list()[1:]} is not inside the {self.width}x{self.height} image")
        if self.windowed and self._layout is None and self._contiguous is None:
            self.validate()
        if self._mapped is not None:
            raw = self._interleave(self._mapped[:, 0, window.y : window.y2, window.x : window.x2, :])
        elif self._contiguous is not None:
            raw = self._interleave(self._rows(window))
        elif self._layout is not None:
            raw = self._assemble(window, self._layout)
            if self._grey_segments:
                return raw[:, :, 0]
        else:
            raw = self._decoded()[window.y : window.y2, window.x : window.x2]
        return self._normalized(raw)

    def whole(self) -> np.ndarray:
        """The level decoded whole as 8-bit grey or BGR (a TIFF that cannot be read by window)."""
        return self._normalized(self._decoded())

    def _decoded(self) -> np.ndarray:
        """The level decoded whole, as stored."""
        try:
            pixels = np.asarray(self.page.asarray())
        except Exception as error:
            raise _tiff_error(self.name, error) from None
        if int(self.page.shaped[0]) > 1:  # planar configuration "separate": samples come first
            pixels = np.moveaxis(pixels.reshape(-1, self.height, self.width), 0, -1)
        return pixels.reshape(self.height, self.width, -1)

    def _assemble(self, window: Window, layout: _Layout) -> np.ndarray:
        samples = 1 if self._grey_segments else self._samples
        out = np.zeros((window.height, window.width, samples), dtype=self.page.dtype)
        for index, top, left in self._segments(window, layout):
            segment = self._segment(index)
            if segment is None:
                continue  # a sparse TIFF leaves empty tiles out: they read as zeros
            y0, x0 = max(top, window.y), max(left, window.x)
            y1 = min(top + segment.shape[0], window.y2)
            x1 = min(left + segment.shape[1], window.x2)
            plane = index // (layout.across * layout.down)
            target = slice(plane, plane + 1) if layout.planes > 1 else slice(None)
            out[y0 - window.y : y1 - window.y, x0 - window.x : x1 - window.x, target] = segment[
                y0 - top : y1 - top, x0 - left : x1 - left
            ]
        return out

    @staticmethod
    def _segments(window: Window, layout: _Layout) -> Iterator[tuple[int, int, int]]:
        """(segment index, top, left) of every segment the window touches, in every sample plane."""
        rows = range(window.y // layout.segment_h, (window.y2 - 1) // layout.segment_h + 1)
        columns = range(window.x // layout.segment_w, (window.x2 - 1) // layout.segment_w + 1)
        per_plane = layout.across * layout.down
        for plane in range(layout.planes):
            for row in rows:
                for column in columns:
                    index = plane * per_plane + row * layout.across + column
                    yield index, row * layout.segment_h, column * layout.segment_w

    def _segment(self, index: int) -> np.ndarray | None:
        """One decoded tile or strip as (rows, columns, samples), from a small LRU cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        page = self.page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if offset == 0 or count == 0:
            return None
        handle = self.tiff.filehandle
        try:
            handle.seek(offset)
            data = handle.read(count)
            if len(data) != count:
                raise ImageError(f"segment {index} is cut short ({len(data)} of {count} bytes)")
            decoded, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        except ImageError as error:
            raise ImageError(f"{self.name} is damaged: {error}") from None
        except Exception as error:
            raise ImageError(
                f"{self.name} is damaged or uses an unsupported codec: segment {index} cannot be decoded "
                f"({type(error).__name__}: {error})"
            ) from None
        segment = np.asarray(decoded).reshape(shape[1], shape[2], -1)
        if self._grey_segments:
            segment = cv2.cvtColor(np.ascontiguousarray(segment[:, :, :3]), cv2.COLOR_RGB2GRAY)[:, :, None]
        self._remember(index, segment)
        return segment

    def _remember(self, index: int, segment: np.ndarray) -> None:
        self._cache[index] = segment
        self._cached_bytes += segment.nbytes
        while self._cached_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes

    def _normalized(self, raw: np.ndarray) -> np.ndarray:
        """8-bit grey or BGR pixels from the TIFF's samples; grey where opened `grey`."""
        pixels = self._to_bgr(raw)
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY) if self.grey and pixels.ndim == 3 else pixels

    def _to_bgr(self, raw: np.ndarray) -> np.ndarray:
        if raw.ndim == 2:
            raw = raw[:, :, None]
        if raw.dtype == bool:  # a 1-bit scan (fax, bilevel document): set bits are white in MINISBLACK
            raw = raw.astype(np.uint8) * np.uint8(255)
        if not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        if self._photometric == "RGB":
            pixels = cv2.cvtColor(np.ascontiguousarray(raw[:, :, :3]), cv2.COLOR_RGB2BGR)
        else:
            pixels = raw[:, :, 0]
        pixels = normalize(np.ascontiguousarray(pixels))
        return 255 - pixels if self._photometric == "MINISWHITE" else pixels

    def close(self) -> None:
        self._cache.clear()
        self._mapped = self._data = None
        self.tiff.close()


def tiff_source(tiff: Any, found: Input, level: int, grey: bool = False) -> TiffSource:
    """A TiffSource of `found`, open as `tiff` (closed if it cannot be one); `grey`: its windows as grey."""
    try:
        if not tiff.series:
            raise ImageError(f"{found.name} is not a readable TIFF: no image found (its header is damaged)")
        source = TiffSource(tiff, found.name, level, found.target if isinstance(found.target, bytes) else None, grey)
        source.size = found.size
        return source
    except ImageError:
        tiff.close()
        raise
    except Exception as error:
        tiff.close()
        raise _tiff_error(found.name, error) from None


def tiff_file(found: Input) -> Any:
    """`found`'s TIFF header (its image file directories) read by tifffile: an object in storage through an fsspec
    handle, which the TiffSource then reads its tiles through."""
    import tifffile

    target = found.target
    handle = remote.open_file(target.url) if isinstance(target, RemoteObject) else None
    try:
        return tifffile.TiffFile(io.BytesIO(target) if isinstance(target, bytes) else handle or target)
    except Exception as error:
        if handle is not None:
            handle.close()
        raise _tiff_error(found.name, error) from None


def is_georeferenced(tiff: Any) -> bool:
    """The TIFF's first page places it on the map: it carries any GeoTIFF tag."""
    return bool(tiff.pages) and any(code in tiff.pages[0].tags for code in GEO_TAGS)


def check_extent(tiff: Any, found: Input) -> None:
    """Refuse a TIFF whose image data reaches past its end (a truncated file or upload), from its header alone."""
    for page in tiff.pages:
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        if len(ends) and int(ends.max()) > found.size:
            raise ImageError(
                f"{found.name} is truncated: its data reaches byte {int(ends.max()):,} of a {found.size:,}-byte file"
            )
