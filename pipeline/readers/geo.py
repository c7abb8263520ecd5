"""GeoTIFF and Cloud-Optimized GeoTIFF read window by window through rasterio (GDAL), and where pixels are on a map.

A `GeoSource` reads only the blocks a window touches (its overviews are pyramid levels), picks bands of a
multispectral raster (`bands=[3, 2, 1]`: red, green, blue), scales 16-bit (or any numeric) bands to 8 bits over a
range the user can set (`stretch=[low, high]`), and returns None for a window that is all nodata, which the tiles
then skip like blank ones. Its `spatial` carries the raster's CRS and level-0 geotransform, which the result records
and `export.geojson_document` uses to put detections on the map. rasterio is the optional `geo` extra.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.model import Spatial
from pipeline.readers import remote
from pipeline.readers.images import ImageError
from pipeline.readers.inputs import Input
from pipeline.readers.remote import RemoteObject
from pipeline.tiling import Window

# GDAL's own settings that a worker sets in its environment before GDAL first reads, unless the operator set them
# (tasks.celery). GDAL's block cache is 5 % of the machine's memory per process by default: a tile process reading a
# large COG grew to 1 GB (bench.remote); 64 MB is what a TiffSource keeps. And no listing of the image's folder (or
# bucket) for sidecar files on each open: a COG carries its overviews.
GDAL_DEFAULTS = {"GDAL_CACHEMAX": "64", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def available() -> bool:
    """rasterio (the `geo` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("rasterio") is not None


def default_bands(count: int) -> tuple[int, ...]:
    """The bands read when none are chosen: the first three (red, green, blue) of a colour raster, else the first.

    Args:
        count: the raster's number of bands.

    Returns:
        1-based band indexes, 3 of them for RGB or 1 for grey.
    """
    return (1, 2, 3) if count >= 3 else (1,)


def check_bands(bands: tuple[int, ...], count: int, name: str) -> tuple[int, ...]:
    """The chosen bands, checked against the raster: one (grey) or three (red, green, blue), each in 1..count."""
    if len(bands) not in (1, 3):
        raise ImageError(f"{name}: bands must name 1 band (grey) or 3 (red, green, blue), got {list(bands)}")
    if any(not 1 <= band <= count for band in bands):
        raise ImageError(f"{name} has {count} band(s) (1 to {count}); bands {list(bands)} asked")
    return bands


def to_8bit(pixels: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    """Bands as 8-bit: `scale` = (low, high) maps low..high linearly to 0..255 (clipped); without it 8-bit data is
    kept and 16-bit data keeps its high byte, as for any 16-bit image.

    Args:
        pixels: (bands, rows, columns) as read.
        scale: the input range shown as 0..255, or None.

    Returns:
        The same shape as uint8.
    """
    if scale is None:
        if pixels.dtype == np.uint8:
            return pixels
        if pixels.dtype == np.uint16:
            return (pixels >> 8).astype(np.uint8)
        raise ImageError(f"{pixels.dtype} bands need stretch=[low, high] to be shown as 8-bit")
    low, high = scale
    scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def as_bgr(bands: np.ndarray) -> np.ndarray:
    """(1 or 3, rows, columns) 8-bit bands as grey or BGR pixels (the bands are in red, green, blue order)."""
    return np.ascontiguousarray(bands[0] if len(bands) == 1 else np.moveaxis(bands[::-1], 0, -1))


def spatial_of(dataset: Any) -> Spatial:
    """The CRS (WKT, EPSG code where one matches) and affine geotransform of a rasterio dataset at level 0. A raster
    without a geotransform is recorded as not georeferenced, its CRS kept if it names one: its results stay in
    pixels."""
    crs, transform = dataset.crs, dataset.transform
    wkt, epsg = (crs.to_wkt(), crs.to_epsg()) if crs is not None else (None, None)
    if transform.is_identity:
        return Spatial(crs=wkt, epsg=epsg, georeferenced=False)
    return Spatial(crs=wkt, epsg=epsg, transform=tuple(float(v) for v in tuple(transform)[:6]), georeferenced=True)


class GeoSource:
    """One level (0: full resolution, k: overview k) of a raster read through rasterio, window by window."""

    windowed = True
    reader = "geo"

    def __init__(
        self,
        target: str,
        name: str,
        level: int = 0,
        bands: tuple[int, ...] | None = None,
        scale: tuple[float, float] | None = None,
        opener: Any = None,
        keep: Any = None,
    ) -> None:
        """Open `target` (a path, or the path in `opener`, an fsspec filesystem); `keep` is closed with the source
        (the in-memory file of bytes)."""
        import rasterio
        from rasterio.errors import RasterioError

        self.name, self.level, self.scale, self._keep = name, level, scale, keep
        try:
            full = rasterio.open(target, opener=opener)
            try:
                self.bands = check_bands(tuple(bands or default_bands(full.count)), full.count, name)
                self.levels = 1 + len(full.overviews(1))
                self.spatial = spatial_of(full)
                full_width, dtypes = full.width, {full.dtypes[b - 1] for b in self.bands}
                if not 0 <= level < self.levels:
                    raise ImageError(f"{name} has {self.levels} pyramid level(s) (0 to {self.levels - 1}); "
                                     f"level {level} asked")  # fmt: skip
                if scale is None and not dtypes <= {"uint8", "uint16"}:
                    raise ImageError(
                        f"{name} has {'/'.join(sorted(dtypes))} bands: give stretch=[low, high] to show them"
                    )
            except BaseException:
                full.close()
                raise
            if level:  # an overview opens as a dataset of its own
                full.close()
                self.dataset = rasterio.open(target, opener=opener, overview_level=level - 1)
            else:
                self.dataset = full
        except RasterioError as error:
            raise ImageError(f"{name} cannot be read as a raster: {error}") from None
        self.width, self.height = self.dataset.width, self.dataset.height
        self.channels = len(self.bands)
        self.downsample = full_width / max(self.width, 1)
        # a mask needs reading only where some pixels may be nodata (a nodata value, an alpha band or mask band)
        self._masked = any(flags != [rasterio.enums.MaskFlags.all_valid] for flags in self.dataset.mask_flag_enums)

    def read(self, window: Window) -> np.ndarray | None:
        """The window's pixels as 8-bit grey or BGR, nodata pixels black; None when all of it is nodata."""
        from rasterio.errors import RasterioError
        from rasterio.windows import Window as RasterWindow

        if window.x < 0 or window.y < 0 or window.x2 > self.width or window.y2 > self.height or window.width <= 0:
            raise ImageError(f"window {window.to_list()[1:]} is not inside the {self.width}x{self.height} image")
        area = RasterWindow(window.x, window.y, window.width, window.height)
        try:
            valid = self.dataset.dataset_mask(window=area) if self._masked else None
            if valid is not None and not valid.any():
                return None
            pixels = to_8bit(self.dataset.read(list(self.bands), window=area), self.scale)
        except RasterioError as error:
            raise ImageError(f"{self.name} is damaged or unreadable at {window.to_list()[1:]}: {error}") from None
        if valid is not None:
            pixels[:, valid == 0] = 0
        return as_bgr(pixels)

    def close(self) -> None:
        self.dataset.close()
        if self._keep is not None:
            self._keep.close()


def geo_source(found: Input, level: int, bands: tuple[int, ...] | None, scale: tuple[float, float] | None) -> GeoSource:
    """`found` opened through rasterio: a file by its path, bytes as an in-memory file, an object in storage through
    its fsspec filesystem (range requests).

    Raises:
        ImageError: rasterio is not installed, or the raster cannot be read as asked."""
    if not available():
        raise ImageError(f"{found.name}: reading bands of a GeoTIFF needs rasterio (pip install 'tilerec[geo]')")
    target = found.target
    if isinstance(target, bytes):
        from rasterio.io import MemoryFile

        memory = MemoryFile(target)
        return GeoSource(memory.name, found.name, level, bands, scale, keep=memory)
    if isinstance(target, RemoteObject):
        fs, path = remote.filesystem(target.url)
        return GeoSource(path, found.name, level, bands, scale, opener=fs)
    return GeoSource(str(target), found.name, level, bands, scale)
