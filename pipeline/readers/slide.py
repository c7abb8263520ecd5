"""Whole-slide images (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, Ventana, generic tiled TIFF …)
read window by window through OpenSlide, at a level chosen by index or by resolution (`mpp`, microns per pixel).

OpenSlide reads local files only. Its pixels come as RGBA: fully transparent windows (outside the scanned regions)
are skipped like blank tiles. The level-0 microns per pixel are recorded in the result, so sizes can be given in µm.
openslide-python with the openslide-bin wheel is the optional `slide` extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.model import Spatial
from pipeline.readers.images import ImageError
from pipeline.readers.inputs import Input
from pipeline.tiling import Window


def level_for_mpp(base_mpp: float, downsamples: Sequence[float], wanted: float) -> int:
    """The level whose resolution is nearest `wanted` microns per pixel (by ratio, so 0.5 is as near 0.25 as 1.0).

    Args:
        base_mpp: level 0's microns per pixel.
        downsamples: each level's downsample from level 0.
        wanted: the resolution asked for.

    Returns:
        The level's index.
    """
    return min(range(len(downsamples)), key=lambda k: abs(math.log(base_mpp * downsamples[k] / wanted)))


def base_mpp(properties: dict[str, str]) -> tuple[float, float] | None:
    """Level 0's microns per pixel (x, y) from OpenSlide's properties; None where the slide does not say."""
    try:
        x, y = float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"])
    except (KeyError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 else None


class SlideSource:
    """One level of a whole-slide image, read window by window through OpenSlide."""

    windowed = True
    reader = "slide"

    def __init__(self, path: Path, name: str, level: int = 0, mpp: float | None = None) -> None:
        try:
            import openslide
        except ImportError:
            raise ImageError(f"{name}: reading slides needs OpenSlide (pip install 'tilerec[slide]')") from None
        try:
            self.slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise ImageError(
                f"{name} is not a slide format OpenSlide reads (supported: Aperio, Hamamatsu, Leica, MIRAX, Philips, "
                "Sakura, Trestle, Ventana, Zeiss, DICOM and generic tiled TIFF)"
            ) from None
        except openslide.OpenSlideError as error:
            raise ImageError(f"{name} is a damaged slide: {error}") from None
        self.name = name
        resolution = base_mpp(dict(self.slide.properties))
        self.spatial = Spatial(mpp=resolution) if resolution else None
        self.levels = self.slide.level_count
        if mpp is not None:
            if resolution is None:
                self.close()
                raise ImageError(f"{name} does not record its microns per pixel: choose a level instead of mpp")
            level = level_for_mpp(resolution[0], self.slide.level_downsamples, mpp)
        if not 0 <= level < self.levels:
            self.close()
            raise ImageError(f"{name} has {self.levels} pyramid level(s) (0 to {self.levels - 1}); level {level} asked")
        self.level = level
        self.width, self.height = self.slide.level_dimensions[level]
        self.downsample = self.slide.dimensions[0] / max(self.width, 1)
        self.channels = 3

    def read(self, window: Window) -> np.ndarray | None:
        """The window's pixels as BGR; None when all of it is outside the scanned regions (transparent)."""
        import openslide

        if window.x < 0 or window.y < 0 or window.x2 > self.width or window.y2 > self.height or window.width <= 0:
            raise ImageError(f"window {window.to_list()[1:]} is not inside the {self.width}x{self.height} image")
        origin = (round(window.x * self.downsample), round(window.y * self.downsample))  # OpenSlide takes level 0's
        try:
            rgba = np.asarray(self.slide.read_region(origin, self.level, (window.width, window.height)))
        except openslide.OpenSlideError as error:
            raise ImageError(f"{self.name} is damaged at {window.to_list()[1:]}: {error}") from None
        if not rgba[:, :, 3].any():
            return None
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGR)

    def close(self) -> None:
        self.slide.close()


def slide_source(found: Input, level: int, mpp: float | None) -> SlideSource:
    """`found` opened through OpenSlide, which reads local files only."""
    if found.remote:
        raise ImageError(f"{found.name}: slides are read from local files only (OpenSlide cannot read object storage)")
    if not isinstance(found.target, Path):
        raise ImageError("slides are read from files only: give the slide's path (OpenSlide cannot read bytes)")
    return SlideSource(found.target, found.name, level, mpp)
