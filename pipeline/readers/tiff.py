"""Tiled and stripped TIFFs (BigTIFF and pyramids too) read window by window: tifffile reads the header, libvips
(libtiff) the pixels.

Opening parses the image file directories with tifffile: the pyramid's levels, the pixel type and colour layout,
and where every tile or strip lies, checked against the file's length, so a damaged, truncated or unsupported file
is refused before any pixel is read. `read(window)` then asks libvips for the window (`Region.fetch`): libtiff
decodes only the tiles or strips the window touches, with every codec it has (deflate, LZW, JPEG, WebP, zstd,
PackBits), and keeps the last ones decoded for the neighbouring windows. libvips cannot read tiled TIFFs whose
samples are stored in separate planes: their tiles are decoded by tifffile instead. A TIFF stored as one
compressed strip cannot be read by window: it is decoded whole. A file in object storage is read through its
fsspec handle.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyvips

from pipeline.images import ImageError, normalize
from pipeline.model import Spatial
from pipeline.readers.vips import DTYPES, vips_errors
from pipeline.tiling import Window

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
    """One pyramid level of the first image series of a TIFF, read window by window (see the module's docstring)."""

    reader = "tiff"

    def __init__(self, tiff: Any, name: str, level: int = 0, target: Path | bytes | Any = None) -> None:
        """`tiff`: the file's header, opened by tifffile; `target`: what libvips reads the pixels from (the path,
        the bytes, or a file object such as an object in storage's handle)."""
        self.tiff, self.name, self.level, self.target = tiff, name, level, target
        series = tiff.series[0]
        self.levels = len(series.levels)
        if not 0 <= level < self.levels:
            raise ImageError(f"{name} has {self.levels} pyramid level(s) (0 to {self.levels - 1}); level {level} asked")
        page = series.levels[level].pages[0]
        self.page = page.aspage() if hasattr(page, "aspage") else page
        self.width, self.height = int(self.page.imagewidth), int(self.page.imagelength)
        self.downsample = int(series.levels[0].pages[0].imagewidth) / max(self.width, 1)
        samples = self._check_pixels_supported()
        self.channels = 1 if samples < 3 else 3
        self._samples = samples
        self.size: int | None = None  # of a file object (an object in storage), whose handle has no path
        self.spatial: Spatial | None = None
        self.windowed = not self._one_big_strip()
        self._region: pyvips.Region | None = None
        self._image: pyvips.Image | None = None
        # tiled, each sample in its own plane (which libvips cannot read): tiles decoded by tifffile, a few kept
        self._layout: _Layout | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def validate(self) -> TiffSource:
        """Check where the header says the pixels are against the file (enough segments, none past its end).
        Separate from opening so that a size limit is applied before anything else."""
        if isinstance(self.target, bytes):
            file_size = len(self.target)
        else:
            file_size = self.size or os.path.getsize(self.tiff.filehandle.path)
        page = self.page
        planes = int(page.shaped[0])
        if page.is_tiled:
            h, w = int(page.tilelength), int(page.tilewidth)
        else:
            h, w = min(int(page.rowsperstrip or self.height), self.height), self.width
        needed = planes * -(-self.width // w) * -(-self.height // h)
        if len(page.dataoffsets) < needed:
            raise ImageError(
                f"{self.name} is damaged: it has {len(page.dataoffsets)} data segments where its "
                f"{self.width}x{self.height} size needs {needed}"
            )
        ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(page.databytecounts, dtype=np.int64)
        if len(ends) and int(ends.max()) > file_size:
            raise ImageError(
                f"{self.name} is truncated: its data reaches byte {int(ends.max()):,} of a {file_size:,}-byte file"
            )
        if page.is_tiled and planes > 1:
            self._layout = _Layout(h, w, -(-self.width // w), -(-self.height // h), planes)
        return self

    def _one_big_strip(self) -> bool:
        """A compressed strip larger than SEGMENT_CACHE_BYTES: every window would decode all of it again."""
        page = self.page
        if page.is_tiled or int(page.compression) == 1:
            return False
        rows = min(int(page.rowsperstrip or self.height), self.height)
        return rows * self.width * self._samples * np.dtype(page.dtype).itemsize > SEGMENT_CACHE_BYTES

    def _check_pixels_supported(self) -> int:
        page = self.page
        photometric = getattr(page.photometric, "name", str(page.photometric))
        samples = int(page.samplesperpixel)
        if page.dtype is None or np.dtype(page.dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ImageError(f"{self.name}: unsupported TIFF pixel type {page.dtype}; use 8- or 16-bit images")
        if int(getattr(page, "imagedepth", 1)) != 1:
            raise ImageError(f"{self.name}: volumetric TIFFs (image depth > 1) are not supported")
        if photometric in ("MINISBLACK", "MINISWHITE") and samples <= 2:
            return samples
        if photometric in ("RGB", "YCBCR") and samples in (3, 4):
            return samples
        raise ImageError(
            f"{self.name}: unsupported TIFF colour layout ({photometric}, {samples} samples per pixel); "
            "use grey, RGB or RGBA"
        )

    def _location(self) -> dict[str, int]:
        """Where libvips finds this level: a page of the file, or a SubIFD of the first page (tifffile counts both
        from 0)."""
        subifds = list(self.tiff.pages[0].subifds or ())
        if self.level and self.page.offset in subifds:
            return {"subifd": subifds.index(self.page.offset)}
        return {"page": int(self.page.index)}

    def _open_pixels(self) -> pyvips.Image:
        with vips_errors(f"{self.name} is damaged or uses an unsupported codec"):
            where = self._location()
            if isinstance(self.target, Path | str):
                image = pyvips.Image.new_from_file(str(self.target), access="random", fail_on="warning", **where)
            elif isinstance(self.target, bytes):
                image = pyvips.Image.new_from_buffer(self.target, "", access="random", fail_on="warning", **where)
            else:
                image = pyvips.Image.new_from_source(_source_of(self.target), "", access="random", fail_on="warning",
                                                     **where)  # fmt: skip
            if self.page.is_tiled:  # the tiles a window shares with its neighbours, decoded once
                tile = int(self.page.tilewidth), int(self.page.tilelength)
                across = -(-self.width // tile[0]) * 2
                cached = max(across, SEGMENT_CACHE_BYTES // max(1, tile[0] * tile[1] * self._samples * 2))
                image = image.tilecache(tile_width=tile[0], tile_height=tile[1], max_tiles=cached, threaded=False)
        return image

    def read(self, window: Window) -> np.ndarray:
        """The window's pixels as 8-bit grey or BGR, decoding only the TIFF segments it touches."""
        if window.x < 0 or window.y < 0 or window.x2 > self.width or window.y2 > self.height or window.width <= 0:
            raise ImageError(f"window {window.to_list()[1:]} is not inside the {self.width}x{self.height} image")
        if self._layout is not None:
            return self._to_bgr(self._assemble(window, self._layout))
        if self._region is None:
            self._image = self._open_pixels()
            self._region = pyvips.Region.new(self._image)
        assert self._image is not None
        with vips_errors(f"{self.name} is damaged or uses an unsupported codec: {window.to_list()[1:]} cannot be read"):
            data = self._region.fetch(window.x, window.y, window.width, window.height)
        raw = np.frombuffer(data, DTYPES[self._image.format]).reshape(window.height, window.width, self._image.bands)
        return self._to_bgr(raw)

    def _assemble(self, window: Window, layout: _Layout) -> np.ndarray:
        out = np.zeros((window.height, window.width, self._samples), dtype=self.page.dtype)
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
        self._remember(index, segment)
        return segment

    def _remember(self, index: int, segment: np.ndarray) -> None:
        self._cache[index] = segment
        self._cached_bytes += segment.nbytes
        while self._cached_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes

    def whole(self) -> np.ndarray:
        """The level decoded whole, as 8-bit grey or BGR (for TIFFs that cannot be read by window)."""
        return self.read(Window(0, 0, 0, self.width, self.height))

    def _to_bgr(self, raw: np.ndarray) -> np.ndarray:
        """libvips' pixels (grey, RGB, with alpha or not; MINISWHITE already inverted) as 8-bit grey or BGR."""
        if not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        if raw.shape[2] >= 3:
            return normalize(cv2.cvtColor(raw[:, :, :3], cv2.COLOR_RGB2BGR))
        return normalize(np.ascontiguousarray(raw[:, :, 0]))

    def close(self) -> None:
        self._region = self._image = None
        self._cache.clear()
        self.tiff.close()


def _source_of(handle: Any) -> pyvips.SourceCustom:
    """A libvips source reading a seekable Python file object (an fsspec handle: each read a range request)."""
    source = pyvips.SourceCustom()
    source.on_read(lambda size: handle.read(size))
    source.on_seek(lambda offset, whence: handle.seek(offset, whence))
    return source


def tiff_source(tiff: Any, target: Any, name: str, level: int, size: int | None = None) -> TiffSource:
    """A TiffSource of an open TiffFile (closed if it cannot be one)."""
    try:
        if not tiff.series:
            raise ImageError(f"{name} is not a readable TIFF: no image found (its header is damaged)")
        source = TiffSource(tiff, name, level, target)
        source.size = size
        return source
    except ImageError:
        tiff.close()
        raise
    except Exception as error:
        tiff.close()
        raise _tiff_error(name, error) from None


def tiff_file(target: str | Path | bytes | Any, name: str) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(io.BytesIO(target) if isinstance(target, bytes) else target)
    except Exception as error:
        raise _tiff_error(name, error) from None


def check_extent(tiff: Any, size: int, name: str) -> None:
    """Refuse a TIFF whose image data reaches past its end (a truncated file or upload), from its header alone."""
    for page in tiff.pages:
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        if len(ends) and int(ends.max()) > size:
            raise ImageError(f"{name} is truncated: its data reaches byte {int(ends.max()):,} of a {size:,}-byte file")
