"""Image sources: where a job's pixels come from, read one window at a time when the format allows it.

A tiled or stripped TIFF (BigTIFF and pyramids too) is opened from its header alone, and `read(window)` decodes
only the TIFF tiles or strips that the window touches, so a gigapixel scan costs each reader a few tiles of memory.
Other formats (PNG, JPEG, BMP, .npy, and a TIFF stored as one compressed strip) cannot be read by window: they are
decoded once, whole, into an `ArraySource`.

Every source gives 8-bit grey or BGR windows (what the recognizers take), like `images.normalize`.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline import geo, remote, streaming
from pipeline.geo import GeoSource, is_georeferenced
from pipeline.images import DEFAULT_MAX_PIXELS, ImageError, check_complete, check_pixels, decode, file_errors, normalize
from pipeline.model import Spatial
from pipeline.remote import RemoteObject
from pipeline.slides import SlideSource, slide_vendor
from pipeline.tiling import Window

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
SEGMENT_CACHE_BYTES = 64 * 2**20  # decoded TIFF tiles kept per open file: neighbouring windows share tiles
BLANK_RANGE = 16.0  # skip_blank=True: a tile whose 4x4 block means vary by at most this (grey levels) is blank


class Source(Protocol):
    """An image of `width` x `height` pixels with `channels` channels (1 or 3) at one pyramid level of `levels`."""

    width: int
    height: int
    channels: int
    levels: int
    level: int
    downsample: float  # level 0's width / this level's width
    windowed: bool  # True: `read` decodes only what a window needs; False: the image is held decoded
    reader: str  # which reader opened it: "tiff", "geo", "slide" ("array": decoded whole)
    spatial: Spatial | None  # where the pixels are on a map or a slide; None: pixels only

    def read(self, window: Window) -> np.ndarray | None: ...  # None: nothing to recognize there (all nodata)

    def close(self) -> None: ...


def is_tiff(head: bytes) -> bool:
    return head[:4] in TIFF_MAGIC


class ArraySource:
    """A decoded image held in memory (formats that cannot be read by window)."""

    windowed = False
    levels = 1
    level = 0
    downsample = 1.0
    spatial = None
    reader = "array"

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self.height, self.width = pixels.shape[:2]
        self.channels = 1 if pixels.ndim == 2 else pixels.shape[2]

    def read(self, window: Window) -> np.ndarray:
        return self.pixels[window.y : window.y2, window.x : window.x2]

    def close(self) -> None:
        self.pixels = np.zeros((0, 0), dtype=np.uint8)


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

    def __init__(self, tiff: Any, name: str, level: int = 0, data: bytes | None = None) -> None:
        self.tiff, self.name, self.level = tiff, name, level
        series = tiff.series[0]
        self.levels = len(series.levels)
        if not 0 <= level < self.levels:
            raise ImageError(f"{name} has {self.levels} pyramid level(s) (0 to {self.levels - 1}); level {level} asked")
        page = series.levels[level].pages[0]
        self.page = page.aspage() if hasattr(page, "aspage") else page
        self.width, self.height = int(self.page.imagewidth), int(self.page.imagelength)
        self.downsample = int(series.levels[0].pages[0].imagewidth) / max(self.width, 1)
        self._photometric, samples = self._check_pixels_supported()
        self.channels = 1 if samples < 3 else 3
        self._samples = samples
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
        else:
            raw = self.whole()[window.y : window.y2, window.x : window.x2]
        return self._to_bgr(raw)

    def whole(self) -> np.ndarray:
        """The level decoded whole, as stored (for TIFFs that cannot be read by window)."""
        try:
            pixels = np.asarray(self.page.asarray())
        except Exception as error:
            raise _tiff_error(self.name, error) from None
        if int(self.page.shaped[0]) > 1:  # planar configuration "separate": samples come first
            pixels = np.moveaxis(pixels.reshape(-1, self.height, self.width), 0, -1)
        return pixels.reshape(self.height, self.width, -1)

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


def _open_tiff(target: str | Path | bytes | Any, name: str, level: int, size: int | None = None) -> TiffSource:
    """A TiffSource of a path, bytes, or an open file object of `size` bytes (an object in storage)."""
    return _tiff_source(_tiff_file(target, name), target, name, level, size)


def _tiff_source(tiff: Any, target: Any, name: str, level: int, size: int | None = None) -> TiffSource:
    """A TiffSource of an open TiffFile (closed if it cannot be one)."""
    try:
        if not tiff.series:
            raise ImageError(f"{name} is not a readable TIFF: no image found (its header is damaged)")
        source = TiffSource(tiff, name, level, target if isinstance(target, bytes) else None)
        source.size = size
        return source
    except ImageError:
        tiff.close()
        raise
    except Exception as error:
        tiff.close()
        raise _tiff_error(name, error) from None


def _tiff_file(target: str | Path | bytes | Any, name: str) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(io.BytesIO(target) if isinstance(target, bytes) else target)
    except Exception as error:
        raise _tiff_error(name, error) from None


def _decode_whole(data: bytes, max_pixels: int, threads: int) -> np.ndarray:
    layout = streaming.streamable_png(data[: streaming.HEAD_BYTES]) if threads > 1 else None
    if layout is None:
        return decode(data, max_pixels)
    check_pixels(layout.width, layout.height, max_pixels)
    check_complete(data)
    return streaming.decode_png(data, layout, threads)


@dataclass(frozen=True)
class ReadSpec:
    """How to open an image, from the job's options: which reader (`options.READERS`), and the geo and slide
    options (bands, 16-to-8-bit scale, level by microns per pixel)."""

    reader: str = "auto"
    bands: tuple[int, ...] | None = None
    scale: tuple[float, float] | None = None
    mpp: float | None = None


def choose_reader(spec: ReadSpec, georeferenced: bool, vendor: str | None, geo_installed: bool = True) -> str:
    """The reader for an image: the one asked for, else geo for a georeferenced TIFF (where rasterio is installed:
    without it, a GeoTIFF is read in pixels as before) or one read by bands, slide for a slide format other than a
    generic TIFF (tifffile reads those) or a level asked by mpp, else tiff.

    Args:
        spec: what the job asks.
        georeferenced: the TIFF carries GeoTIFF tags.
        vendor: the slide format OpenSlide sees in the file, if any.
        geo_installed: rasterio can be imported.

    Returns:
        "tiff", "geo" or "slide".
    """
    if spec.reader != "auto":
        return spec.reader
    if spec.mpp is not None:
        return "slide"
    if (georeferenced and geo_installed) or spec.bands is not None or spec.scale is not None:
        return "geo"
    return "slide" if vendor not in (None, "generic-tiff") else "tiff"


def open_source(
    target: Path | bytes | RemoteObject,
    level: int = 0,
    max_pixels: int | None = None,
    roi: list[int] | None = None,
    threads: int = 1,
    spec: ReadSpec = ReadSpec(),
) -> Source:
    """A source for a file (already confined to the allowed roots), an object in storage, or encoded bytes.

    TIFFs, GeoTIFFs and slides are opened from their header; everything else is decoded whole here (after its
    header's size check). `max_pixels` is checked from the header before any pixel is read: against the `roi`
    ([x, y, w, h]) or the level for an image read by window, against the whole level for anything that must be
    decoded whole. With `threads` ≥ 2 a PNG is decoded on two cores (`streaming.decode_png`); OpenCV decodes it on
    one.
    """
    source = open_windowed(target, level, spec)
    if source is None:
        if level != 0:
            raise ImageError(
                f"{_name(target)} has 1 pyramid level (only TIFFs and slides have more); level {level} asked"
            )
        data = target if isinstance(target, bytes) else _read(target)  # type: ignore[arg-type]
        return ArraySource(_decode_whole(data, max_pixels or DEFAULT_MAX_PIXELS, threads))
    try:
        if max_pixels:
            width, height = (roi[2], roi[3]) if roi and source.windowed else (source.width, source.height)
            check_region(width, height, max_pixels, "read" if source.windowed else "decode")
        if source.windowed:
            return source.validate() if isinstance(source, TiffSource) else source
        pixels = source._to_bgr(source.whole())  # type: ignore[union-attr]
    except BaseException:
        source.close()
        raise
    source.close()
    return ArraySource(pixels)


def _name(target: Path | bytes | RemoteObject) -> str:
    if isinstance(target, RemoteObject):
        return repr(target.url)
    return repr(str(target)) if isinstance(target, Path) else "the image"


def open_windowed(target: Path | bytes | RemoteObject, level: int, spec: ReadSpec) -> Source | None:
    """The image opened by the reader `choose_reader` picks (its header read, no pixels); None for a format that
    only decodes whole (PNG, JPEG, …), which `open_source` then decodes."""
    name = _name(target)
    if isinstance(target, RemoteObject):
        return _open_remote(target, name, level, spec)
    head = _head(target)
    vendor = slide_vendor(target) if isinstance(target, Path) and spec.reader in ("auto", "slide") else None
    if not is_tiff(head):
        if choose_reader(spec, False, vendor) == "slide":
            return _open_slide(target, name, level, spec)
        if spec.reader != "auto":
            raise ImageError(f"{name} is not a TIFF: reader {spec.reader!r} cannot read it")
        return None
    tiff = _tiff_file(target, name)
    georeferenced = bool(tiff.pages) and is_georeferenced(tiff.pages[0].tags)
    reader = choose_reader(spec, georeferenced, vendor, geo.available())
    if reader == "tiff":
        return _tiff_source(tiff, target, name, level)
    if reader == "geo" and not geo.available():
        tiff.close()
        raise ImageError(f"{name}: reading bands of a GeoTIFF needs rasterio (pip install 'tilerec[geo]')")
    try:
        check_extent(tiff, len(target) if isinstance(target, bytes) else _size(target), name)
    finally:
        tiff.close()
    if reader == "slide":
        return _open_slide(target, name, level, spec)
    if isinstance(target, bytes):
        from rasterio.io import MemoryFile

        memory = MemoryFile(target)
        return GeoSource(memory.name, name, level, spec.bands, spec.scale, keep=memory)
    return GeoSource(str(target), name, level, spec.bands, spec.scale)


def _open_remote(target: RemoteObject, name: str, level: int, spec: ReadSpec) -> Source:
    """An object in storage, read by range requests: a TIFF through tifffile, a GeoTIFF through rasterio."""
    if spec.reader == "slide" or spec.mpp is not None:
        raise ImageError(f"{name}: slides are read from local files only (OpenSlide cannot read object storage)")
    handle = remote.open_file(target.url)
    try:
        with remote.remote_errors(target.url):
            head = handle.read(4)
            handle.seek(0)
        if not is_tiff(head):
            raise ImageError(f"{name} is not a TIFF: only TIFFs and GeoTIFFs are read from object storage")
        tiff = _tiff_file(handle, name)
        try:
            check_extent(tiff, target.size, name)
            georeferenced = bool(tiff.pages) and is_georeferenced(tiff.pages[0].tags)
        except BaseException:
            tiff.close()
            raise
        if choose_reader(spec, georeferenced, None, geo.available()) == "tiff":
            return _tiff_source(tiff, handle, name, level, target.size)  # the source reads through the handle
        tiff.close()
    except BaseException:
        handle.close()
        raise
    handle.close()
    if not geo.available():
        raise ImageError(f"{name}: reading bands of a GeoTIFF needs rasterio (pip install 'tilerec[geo]')")
    fs, path = remote.filesystem(target.url)
    return GeoSource(path, name, level, spec.bands, spec.scale, opener=fs)


def _open_slide(target: Path | bytes, name: str, level: int, spec: ReadSpec) -> Source:
    if not isinstance(target, Path):
        raise ImageError("slides are read from files only: give the slide's path (OpenSlide cannot read bytes)")
    return SlideSource(target, name, level, spec.mpp)


def check_extent(tiff: Any, size: int, name: str) -> None:
    """Refuse a TIFF whose image data reaches past its end (a truncated file or upload), from its header alone."""
    for page in tiff.pages:
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        if len(ends) and int(ends.max()) > size:
            raise ImageError(f"{name} is truncated: its data reaches byte {int(ends.max()):,} of a {size:,}-byte file")


def _size(path: Path) -> int:
    with file_errors(str(path)):
        return path.stat().st_size


def streamable_png(target: Path | bytes, max_pixels: int) -> streaming.PngLayout | None:
    """The layout of a PNG (a file or its bytes) that `streaming` can decode band by band, read from its head, with
    its size checked against `max_pixels` and its end for truncation, as a whole decode would; None otherwise."""
    if isinstance(target, bytes):
        head, tail = target[: streaming.HEAD_BYTES], target[-32:]
    else:
        with file_errors(str(target)), open(target, "rb") as handle:
            head = handle.read(streaming.HEAD_BYTES)
            handle.seek(max(0, handle.seek(0, 2) - 32))
            tail = handle.read()
    layout = streaming.streamable_png(head)
    if layout is not None:
        check_pixels(layout.width, layout.height, max_pixels)
        check_complete(head[: len(streaming.PNG_SIGNATURE)] + tail)
    return layout


def check_region(width: int, height: int, max_pixels: int, verb: str = "read") -> None:
    """Refuse a job that would read (or decode) more than `max_pixels` pixels, before any pixel is read."""
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            f"(TILEREC_MAX_PIXELS); refusing to {verb} it"
        )


def is_tiff_file(path: Path) -> bool:
    """The file starts like a TIFF (reads 4 bytes; missing files and folders give the usual ImageError)."""
    return is_tiff(_head(path))


def _head(target: Path | bytes) -> bytes:
    if isinstance(target, bytes):
        if not target:
            raise ImageError("the image is empty (0 bytes)")
        return target[:4]
    with file_errors(str(target)), open(target, "rb") as handle:
        return handle.read(4)


def _read(path: Path) -> bytes:
    with file_errors(str(path)):
        return path.read_bytes()


def is_blank(tile: np.ndarray, threshold: float) -> bool:
    """No content: averaged over 4x4 pixel blocks, no channel varies by more than `threshold` grey levels.

    The averaging flattens sensor noise and compression artefacts, while an object keeps its contrast, however
    small it is in the tile; the range tells them apart where the standard deviation cannot (figures:
    docs/performance.md). Default threshold (skip_blank=true): 16.
    """
    block = 4 if min(tile.shape[:2]) >= 8 else 1
    means = cv2.resize(tile, (tile.shape[1] // block, tile.shape[0] // block), interpolation=cv2.INTER_AREA)
    means = means.reshape(means.shape[0] * means.shape[1], -1)
    spread = means.max(axis=0).astype(np.int16) - means.min(axis=0)
    return bool(spread.max() <= threshold)


@dataclass(frozen=True)
class FileRef:
    """What a tile task needs to read its own windows: the file (or object URL), its level, the reader that opened
    it with its band options, and its identity when planned (size and mtime, or the object's ETag)."""

    path: str
    level: int
    mtime_ns: int
    size: int
    reader: str = "tiff"
    bands: tuple[int, ...] | None = None
    scale: tuple[float, float] | None = None
    etag: str = ""  # an object in storage: its ETag (mtime_ns is 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileRef:
        bands, scale = data.get("bands"), data.get("scale")
        return cls(str(data["path"]), int(data["level"]), int(data["mtime_ns"]), int(data["size"]),
                   data.get("reader", "tiff"), tuple(bands) if bands else None, tuple(scale) if scale else None,
                   data.get("etag", ""))  # fmt: skip

    @classmethod
    def of(cls, target: Path | RemoteObject, level: int, source: Source | None = None) -> FileRef:
        """The reference of a file or object at `level`, opened by `source` (None: a TIFF), for the tile tasks
        to open it the same way."""
        reader = source.reader if source is not None else "tiff"
        options = {"reader": reader, "bands": getattr(source, "bands", None) if reader == "geo" else None,
                   "scale": getattr(source, "scale", None) if reader == "geo" else None}  # fmt: skip
        if isinstance(target, RemoteObject):
            return cls(target.url, level, 0, target.size, etag=target.etag, **options)
        stat = target.stat()
        return cls(str(target), level, stat.st_mtime_ns, stat.st_size, **options)

    @property
    def spec(self) -> ReadSpec:
        return ReadSpec(self.reader, self.bands, self.scale)


class SourceCache:
    """Open files kept per process, so a tile task reads its windows without re-parsing the header each time.

    Keyed by the FileRef: a file or object replaced after the job was planned is noticed, not misread.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._open: OrderedDict[FileRef, Source] = OrderedDict()

    def get(self, ref: FileRef, check: Callable[[str], object] | None = None) -> Source:
        """The open file; `check(path)` runs before a file is opened (a confinement or allow-list check: once per
        open file, not per tile, as what is read afterwards is the open file, whatever its path comes to name)."""
        source = self._open.get(ref)
        if source is not None:
            self._open.move_to_end(ref)
            return source
        if check is not None:
            check(ref.path)
        opened = open_windowed(self._current(ref), ref.level, ref.spec)
        if opened is None:
            raise ImageError(f"{ref.path!r} changed after the job was planned (it is no longer a TIFF)")
        try:
            if isinstance(opened, TiffSource):
                opened.validate()
        except BaseException:
            opened.close()
            raise
        self._open[ref] = opened
        while len(self._open) > self.capacity:
            _, closed = self._open.popitem(last=False)
            closed.close()
        return opened

    @staticmethod
    def _current(ref: FileRef) -> Path | RemoteObject:
        """The file or object the reference names, checked to be the one the job was planned on."""
        if remote.is_url(ref.path):
            found = remote.stat(ref.path)
            if (found.size, found.etag) != (ref.size, ref.etag):
                raise ImageError(f"{ref.path!r} changed after the job was planned (its size or ETag differ)")
            return found
        path = Path(ref.path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ImageError(
                f"{ref.path!r} is not visible on this worker: workers reading windows must see the same files "
                "(set TILEREC_SHARED_STORAGE=false to pass pixels through the tile store instead)"
            ) from None
        if (stat.st_mtime_ns, stat.st_size) != (ref.mtime_ns, ref.size):
            raise ImageError(f"{ref.path!r} changed after the job was planned (its size or time differ)")
        return path

    def clear(self) -> None:
        while self._open:
            _, closed = self._open.popitem()
            closed.close()
