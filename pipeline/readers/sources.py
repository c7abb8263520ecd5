"""Image sources: where a job's pixels come from, read one window at a time when the format allows it.

One `open_source` for every input: identified once (`inputs.identify`), then opened by one reader per kind of file
(`pipeline.readers`, whose docstring says which reads what and why). Every input's size is read from its header and
`max_pixels` checked before any pixel is decoded:

- a tiled or stripped TIFF (BigTIFF and pyramids too) is read window by window: `read(window)` decodes only the
  TIFF tiles or strips the window touches (`TiffSource`), so a gigapixel scan costs each reader a few tiles;
- a GeoTIFF through rasterio, a slide through OpenSlide, window by window; objects in storage through fsspec;
- JPEG, PNG, GIF and HEIF through libvips, decoded top to bottom band by band (`readers.vips`): read in row order
  (`in_row_order`), only the bands a window spans are held, otherwise the image is decoded whole;
- WebP, BMP, PNM/PFM, HDR, Sun raster, JPEG 2000 and .npy are decoded whole (`readers.opencv`) into an
  `ArraySource`; a WebP read in row order at its first window (`opencv.DeferredSource`).

A caller that keeps only grey (a grey-only recognizer's tiles) opens an image `grey`: one libvips decodes band by
band is then converted to grey once per band, and a TIFF read by window once per TIFF tile or strip, not window by
window (other sources' windows stay as they are: an image decoded whole would need a second whole-image buffer,
whose fresh pages cost more than converting windows).

Every source gives 8-bit grey or BGR windows (what the recognizers take), like `images.normalize`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.model import Spatial
from pipeline.readers import formats, geo, opencv, remote
from pipeline.readers.geo import geo_source
from pipeline.readers.images import DEFAULT_MAX_PIXELS, ImageError, check_pixels
from pipeline.readers.inputs import Input, identify
from pipeline.readers.opencv import DeferredSource
from pipeline.readers.remote import RemoteObject
from pipeline.readers.slide import slide_source
from pipeline.readers.tiff import TiffSource, check_extent, is_georeferenced, tiff_file, tiff_source
from pipeline.readers.vips import VipsSource
from pipeline.tiling import Window


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
    spec: ReadSpec = ReadSpec(),
    in_row_order: bool = False,
    grey: bool = False,
) -> Source:
    """A source for a file (already confined to the allowed roots), an object in storage, or encoded bytes.

    The input is identified once (`inputs.identify`: its format from its first bytes) and opened by the one reader
    that reads it, its size from its header: `max_pixels` is checked against the `roi` ([x, y, w, h]) or the level
    for an image read by window, and against the whole image (at most DEFAULT_MAX_PIXELS) for anything decoded,
    whose ends are checked for a truncation too, before any pixel is decoded. A format decoded top to bottom (JPEG,
    PNG, WebP, …) is decoded whole here, unless the caller reads its windows `in_row_order` (`tiling.grid`'s): then
    bands are decoded as the windows reach them (a WebP, decoded whole, at its first window). `grey`: the caller
    keeps only grey, so an image libvips decodes gives grey bands, and a TIFF grey windows, each converted once
    rather than window by window.
    """
    found = identify(target)
    source = _opened(found, level, spec, grey, max_pixels or DEFAULT_MAX_PIXELS)
    try:
        # read by window: the roi or the level, against the limit asked; decoded: the whole image, by default too
        limit = max_pixels if source.windowed else max_pixels or DEFAULT_MAX_PIXELS
        width, height = (roi[2], roi[3]) if roi and source.windowed else (source.width, source.height)
        if limit:
            check_pixels(width, height, limit, "read" if source.windowed else "decode")
        if source.windowed:
            return source.validate() if isinstance(source, TiffSource) else source
        if found.truncation:  # after the size, before any pixel is decoded
            raise ImageError(found.truncation)
        # read in row order, libvips decodes bands as the windows reach them, OpenCV a WebP at its first window
        if in_row_order and (isinstance(source, VipsSource) or found.kind in opencv.DEFERRED):
            return source
        pixels = source.whole()  # type: ignore[attr-defined]
    except BaseException:
        source.close()
        raise
    source.close()
    return ArraySource(pixels)


def _opened(found: Input, level: int, spec: ReadSpec, grey: bool, max_pixels: int) -> Source:
    """`found` opened by the one reader `choose_reader` picks for it, its header read and no pixel decoded."""
    if found.kind != "tiff":
        if choose_reader(spec, False, found.vendor) == "slide":
            return slide_source(found, level, spec.mpp)
        if found.remote:
            raise ImageError(f"{found.name} is not a TIFF: only TIFFs and GeoTIFFs are read from object storage")
        if spec.reader != "auto":
            raise ImageError(f"{found.name} is not a TIFF: reader {spec.reader!r} cannot read it")
        if level != 0:
            raise ImageError(f"{found.name} has 1 pyramid level (only TIFFs and slides have more); level {level} asked")
        if found.kind is None:
            raise ImageError(f"not an image format tilerec reads (it starts {found.head[:12]!r}); give {formats.READ}")
        if found.kind in formats.VIPS_FORMATS:
            return VipsSource(found.target, found.name, found.kind, grey)  # type: ignore[arg-type]
        return DeferredSource(found, max_pixels)
    tiff = tiff_file(found)
    try:
        reader = choose_reader(spec, is_georeferenced(tiff), found.vendor, geo.available())
        if reader != "tiff" or found.remote:
            check_extent(tiff, found)  # a local file's TiffSource checks it as it opens (`TiffSource.validate`)
    except BaseException:
        tiff.close()
        raise
    if reader == "tiff":
        return tiff_source(tiff, found, level, grey)  # an object's source reads through the handle `tiff` opened
    tiff.close()
    if reader == "slide":
        return slide_source(found, level, spec.mpp)
    return geo_source(found, level, spec.bands, spec.scale)


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (any format `open_source` reads, or a .npy array) decoded whole: 8-bit grey or BGR.

    Raises:
        ImageError: not an image, damaged, cut short, or over `max_pixels` (checked from the header first).
    """
    with contextlib.closing(open_source(data, max_pixels=max_pixels)) as source:
        pixels = source.read(Window(0, 0, 0, source.width, source.height))
    if pixels is None:
        raise ImageError("the image has no valid pixels (all nodata)")
    return pixels


def image_size(target: Path | bytes) -> tuple[int, int]:
    """(width, height) of an image file or its bytes (level 0), from its header: no pixel is decoded.

    Raises:
        ImageError: not an image format tilerec reads, or a damaged header.
    """
    with contextlib.closing(_opened(identify(target), 0, ReadSpec(), False, DEFAULT_MAX_PIXELS)) as source:
        return source.width, source.height


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
    grey: bool = False  # opened grey (`open_source`), so every window is

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileRef:
        bands, scale = data.get("bands"), data.get("scale")
        return cls(str(data["path"]), int(data["level"]), int(data["mtime_ns"]), int(data["size"]),
                   data.get("reader", "tiff"), tuple(bands) if bands else None, tuple(scale) if scale else None,
                   data.get("etag", ""), bool(data.get("grey", False)))  # fmt: skip

    @classmethod
    def of(cls, target: Path | RemoteObject, level: int, source: Source | None = None) -> FileRef:
        """The reference of a file or object at `level`, opened by `source` (None: a TIFF), for the tile tasks
        to open it the same way."""
        reader = source.reader if source is not None else "tiff"
        options = {"reader": reader, "bands": getattr(source, "bands", None) if reader == "geo" else None,
                   "scale": getattr(source, "scale", None) if reader == "geo" else None,
                   "grey": bool(getattr(source, "grey", False))}  # fmt: skip
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
        opened = _opened(identify(self._current(ref)), ref.level, ref.spec, ref.grey, DEFAULT_MAX_PIXELS)
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
