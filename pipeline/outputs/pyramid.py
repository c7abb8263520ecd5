"""Deep Zoom (DZI) tiles of an image, cut on demand from its sources: what a deep-zoom viewer (OpenSeadragon) shows.

The Deep Zoom pyramid halves the image from the full size (level `max_level`) down to one pixel (level 0). A tile is
read from the finest image level at least as coarse as it (a pyramidal TIFF's own levels), and resized. Where the
coarsest level the file has is still much finer than a tile needs (a TIFF without a pyramid, a PNG), overviews
(in-memory images at 8x, 64x, … of it) are made once by streaming the image band by band, so no request reads more
than about 8² times a tile's pixels.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.readers.sources import ArraySource, Source
from pipeline.tiling import Window

TILE_SIZE = 254  # with a 1 px overlap, DZI tiles are at most 256 px: OpenSeadragon's and Deep Zoom's default
TILE_OVERLAP = 1
OVERVIEW_FACTOR = 8  # each overview is 8x coarser than the image it is made from
MAX_READ_FACTOR = 8  # a tile reads at most this factor times its side from a level (64x its pixels)
BAND_ROWS = 512  # rows of the source streamed at a time while an overview is made


@dataclass(frozen=True)
class DeepZoomGrid:
    """The geometry of a Deep Zoom pyramid of a `width` x `height` image."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = TILE_OVERLAP

    @property
    def max_level(self) -> int:
        """The full-size level; level 0 is one pixel."""
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def scale(self, level: int) -> int:
        """Full-size pixels per pixel of `level`."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of `level`."""
        scale = self.scale(level)
        return max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))

    def tile_counts(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at `level`."""
        width, height = self.level_size(level)
        return math.ceil(width / self.tile_size), math.ceil(height / self.tile_size)

    def tile_bounds(self, level: int, column: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of a tile in `level`'s pixels, its overlap with its neighbours included.

        Raises:
            IndexError: no such tile.
        """
        columns, rows = self.tile_counts(level)
        if not (0 <= level <= self.max_level and 0 <= column < columns and 0 <= row < rows):
            raise IndexError(f"no tile {column},{row} at level {level}")
        width, height = self.level_size(level)
        x = max(0, column * self.tile_size - self.overlap)
        y = max(0, row * self.tile_size - self.overlap)
        x2 = min(width, (column + 1) * self.tile_size + self.overlap)
        y2 = min(height, (row + 1) * self.tile_size + self.overlap)
        return x, y, x2 - x, y2 - y

    def dzi(self, image_format: str = "jpeg") -> str:
        """The .dzi descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{image_format}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{self.width}" '
            f'Height="{self.height}"/></Image>\n'
        )


@dataclass
class _Level:
    """An image of the pyramid's sources: `downsample` full-size pixels per pixel, read by `read`."""

    downsample: float
    width: int
    height: int
    read: Callable[[Window], np.ndarray]


def overview(read: Callable[[Window], np.ndarray], width: int, height: int, factor: int) -> np.ndarray:
    """An image `factor` times smaller than the `width` x `height` one `read` gives, made band by band.

    Args:
        read: gives a window's pixels (2-D grey or 3-channel).
        width, height: the image's size.
        factor: the reduction; each output pixel averages a `factor` x `factor` block (cv2.INTER_AREA).

    Returns:
        The reduced image, ceil(height / factor) x ceil(width / factor).
    """
    out_w, out_h = max(1, math.ceil(width / factor)), max(1, math.ceil(height / factor))
    band = max(factor, BAND_ROWS // factor * factor)
    parts = []
    for y in range(0, height, band):
        rows = min(band, height - y)
        pixels = read(Window(0, 0, y, width, rows))
        parts.append(cv2.resize(pixels, (out_w, max(1, math.ceil(rows / factor))), interpolation=cv2.INTER_AREA))
    return np.concatenate(parts, axis=0)[:out_h]


class Pyramid:
    """Deep Zoom tiles of one image, from its sources (finest first), overviews made once where they are needed.

    Thread-safe: reads from the sources are serialised (a TIFF file handle is shared); resizing and the tiles'
    encoding run in the caller's thread. Encoded tiles are kept in a small LRU cache.
    """

    def __init__(self, sources: Sequence[Source], cache_tiles: int = 1024, quality: int = 90) -> None:
        """
        Args:
            sources: the image at one or more resolutions, the full size first (e.g. a pyramidal TIFF's levels
                from the one a result was computed at).
            cache_tiles: encoded tiles kept.
            quality: JPEG quality of the tiles.
        """
        base = sources[0]
        self.grid = DeepZoomGrid(base.width, base.height)
        self.sources = list(sources)
        self.quality = quality
        self._lock = threading.Lock()
        self._levels = [
            _Level(base.width / source.width, source.width, source.height, self._locked(source.read))
            for source in self.sources
        ]
        self._tiles: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._overviews_ready = threading.Event()
        self._overview_error: BaseException | None = None
        if self.needs_overviews():
            threading.Thread(target=self._make_overviews, name="tilerec-overviews", daemon=True).start()
        else:
            self._overviews_ready.set()

    def _locked(self, read: Callable[[Window], np.ndarray]) -> Callable[[Window], np.ndarray]:
        def locked(window: Window) -> np.ndarray:
            with self._lock:
                return np.ascontiguousarray(read(window))

        return locked

    def _too_fine(self, level: _Level) -> bool:
        """Over MAX_READ_FACTOR tiles wide: the tiles coarser than it would read too many of its pixels."""
        return max(level.width, level.height) > MAX_READ_FACTOR * self.grid.tile_size

    def needs_overviews(self) -> bool:
        """The coarsest source is too fine for the top of the pyramid."""
        return self._too_fine(self._levels[-1])

    def _make_overviews(self) -> None:
        try:
            level = self._levels[-1]
            while self._too_fine(level):
                pixels = overview(level.read, level.width, level.height, OVERVIEW_FACTOR)
                source = ArraySource(pixels)
                level = _Level(level.downsample * OVERVIEW_FACTOR, source.width, source.height, source.read)
                self._levels.append(level)
        except BaseException as error:  # the tiles needing overviews fail with it; finer ones are still served
            self._overview_error = error
        finally:
            self._overviews_ready.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the overviews; True once every tile can be served."""
        return self._overviews_ready.wait(timeout)

    def _level_for(self, scale: int) -> _Level:
        usable = [level for level in self._levels if level.downsample <= scale * 1.0001]
        best = usable[-1] if usable else self._levels[0]
        if scale / best.downsample > MAX_READ_FACTOR and not self._overviews_ready.is_set():
            self._overviews_ready.wait()
            if self._overview_error is not None:
                raise RuntimeError(f"could not make the image's overviews: {self._overview_error}")
            return self._level_for(scale)
        return best

    def tile_pixels(self, level: int, column: int, row: int) -> np.ndarray:
        """A tile's pixels (grey or BGR).

        Raises:
            IndexError: no such tile.
        """
        x, y, w, h = self.grid.tile_bounds(level, column, row)
        scale = self.grid.scale(level)
        source = self._level_for(scale)
        factor = scale / source.downsample
        sx, sy = math.floor(x * factor), math.floor(y * factor)
        sx2 = min(source.width, math.ceil((x + w) * factor))
        sy2 = min(source.height, math.ceil((y + h) * factor))
        pixels = source.read(Window(0, sx, sy, max(1, sx2 - sx), max(1, sy2 - sy)))
        if pixels.shape[1] == w and pixels.shape[0] == h:
            return pixels
        return cv2.resize(pixels, (w, h), interpolation=cv2.INTER_AREA)

    def tile(self, level: int, column: int, row: int) -> bytes:
        """A tile as JPEG bytes, from the cache when it was served before.

        Raises:
            IndexError: no such tile.
        """
        key = (level, column, row)
        with self._lock:
            cached = self._tiles.get(key)
            if cached is not None:
                self._tiles.move_to_end(key)
                return cached
        ok, encoded = cv2.imencode(
            ".jpg", self.tile_pixels(level, column, row), [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        )
        if not ok:
            raise RuntimeError(f"could not encode tile {column},{row} of level {level}")
        data = encoded.tobytes()
        with self._lock:
            self._tiles[key] = data
            while len(self._tiles) > self._cache_tiles:
                self._tiles.popitem(last=False)
        return data

    def close(self) -> None:
        for source in self.sources:
            source.close()
