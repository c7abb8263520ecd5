"""Recognizing tiles and merging them: the same functions run in one process and on Celery workers,
so the two give identical detections."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from pipeline.images import normalize
from pipeline.merge import merge_detections, place
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, OptionsError, parse_options
from pipeline.recognizers import get_recognizer, get_spec
from pipeline.sources import ArraySource, Source, check_region, is_blank
from pipeline.tiling import Window, auto_batch_size, batches, grid, row_batches, tapered_batches


def crop(image: np.ndarray, window: Window) -> np.ndarray:
    return image[window.y : window.y2, window.x : window.x2]


def region(height: int, width: int, options: JobOptions) -> Window:
    """The part of the image the job covers: its `roi`, checked to lie inside the image, or the whole image."""
    if options.roi is None:
        return Window(0, 0, 0, width, height)
    x, y, w, h = options.roi
    if x + w > width or y + h > height:
        raise OptionsError(f"roi {options.roi} is not inside the {width}x{height} image (level {options.level})")
    return Window(0, x, y, w, h)


def check_size(height: int, width: int, options: JobOptions, max_pixels: int) -> None:
    """Refuse a job whose region (the roi, or the level read) has more pixels than `max_pixels`, before reading."""
    covered = region(height, width, options)
    check_region(covered.width, covered.height, max_pixels)


def windows_of(height: int, width: int, options: JobOptions) -> list[Window]:
    """The tile grid over the job's region, in the image's coordinates (so detections need no further shift)."""
    covered = region(height, width, options)
    tiles = grid(covered.height, covered.width, options.tile, options.overlap)
    if covered.x == covered.y == 0:
        return tiles
    return [Window(t.index, t.x + covered.x, t.y + covered.y, t.width, t.height) for t in tiles]


def plan(
    height: int,
    width: int,
    options: JobOptions,
    tile_cost_ms: float | None = None,
    target_batch_ms: float = 400.0,
    min_batches: int = 16,
    taper: bool = True,
    row_by_row: bool = False,
) -> list[list[Window]]:
    """The tile grid cut into batches: `batch_size` tiles each, or (auto) about `target_batch_ms` of work per batch
    and at least `min_batches` batches, with a tapered tail so the workers finish together (`taper=False`: one
    worker process, nothing to balance, and the tail's batches would only add their overhead). With `row_by_row`,
    for an image whose tiles become ready row by row as it decodes, auto batches never span two rows of tiles
    (`tiling.row_batches`).

    `tile_cost_ms` is what a 640x640 tile costs, measured on earlier jobs; by default the recognizer's estimate."""
    windows = windows_of(height, width, options)
    if options.batch_size is not None:
        return batches(windows, options.batch_size)
    per_640 = get_spec(options.recognizer).cost_ms if tile_cost_ms is None else tile_cost_ms
    cost = per_640 * windows[0].width * windows[0].height / (640 * 640)
    size = auto_batch_size(len(windows), cost, target_batch_ms, min_batches)
    if row_by_row:
        return row_batches(windows, size, taper)
    return tapered_batches(windows, size) if taper else batches(windows, size)


def measured_tile_cost(seconds: list[float], height: int, width: int, options: JobOptions) -> float | None:
    """The mean time of a job's recognized tiles, scaled to a 640x640 tile (the unit of `plan`), in ms."""
    if not seconds:
        return None
    covered = region(height, width, options)
    area = min(options.tile, covered.width) * min(options.tile, covered.height)
    return 1000 * sum(seconds) / len(seconds) * (640 * 640) / area


def blank(tile: np.ndarray, options: JobOptions) -> bool:
    """The tile is to be skipped: `skip_blank` is on and the tile has no content (see `sources.is_blank`)."""
    return options.skip_blank is not None and is_blank(tile, options.skip_blank)


def compact(tile: np.ndarray, options: JobOptions) -> np.ndarray:
    """The tile in the channels its recognizer reads: grey for a grey-only one. Tiles are stored this way (a third
    of the bytes), and in-process runs convert the same way, so both feed the recognizer identical pixels."""
    if tile.ndim == 3 and get_spec(options.recognizer).grey:
        return cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
    return tile


def compact_bands(bands: Iterator[np.ndarray], options: JobOptions) -> Iterator[np.ndarray]:
    """Rows of an image in the channels its tiles are stored in (`compact`), each pixel converted once instead of
    once per tile overlapping it; left as they are when `skip_blank` must first judge each tile in colour."""
    if options.skip_blank is not None:
        return bands
    return (compact(band, options) for band in bands)


def recognize_tile(tile: np.ndarray, window: Window, options: JobOptions, width: int, height: int) -> Detections:
    """One tile's detections, filtered by score and placed in image coordinates."""
    recognizer = get_recognizer(options.recognizer, options.params)
    found = recognizer(compact(tile, options))
    if options.min_score > 0 and len(found):
        found = found[np.flatnonzero(found.scores >= options.min_score)]
    return place(found, window, width, height)


def merge_tiles(per_tile: Iterable[Detections], options: JobOptions) -> Detections:
    """Merge per-tile detections given in tile order (the order decides ties, so keep it for identical results)."""
    return merge_detections(Detections.concat(per_tile), options.merge, options.match_metric, options.match_threshold)


def recognize_image(image: np.ndarray, recognizer: str = "faces", **options: object) -> Recognition:
    """Sliced recognition of a whole image in this process (what SAHI does), with tilerec's tiling and merge."""
    return recognize_source(ArraySource(normalize(np.asarray(image))), recognizer, **options)


def recognize_window(source: Source, window: Window, options: JobOptions) -> Detections | None:
    """One window of the source read and recognized, detections in image coordinates; None: blank, skipped."""
    tile = source.read(window)
    if blank(tile, options):
        return None
    return recognize_tile(tile, window, options, source.width, source.height)


def recognize_source(source: Source, recognizer: str = "faces", **options: object) -> Recognition:
    """`recognize_image` for any source (a TIFF read window by window, say): same tiles, skips and merge as a job.

    The source must be opened at the level the options name (`sources.open_source(path, level)`).
    """
    started = time.perf_counter()
    parsed = parse_options(recognizer, options)
    if parsed.level != source.level:
        raise OptionsError(f"the source is open at level {source.level}, the options ask for level {parsed.level}")
    width, height = source.width, source.height
    windows = windows_of(height, width, parsed)
    per_tile, skipped = [], 0
    for window in windows:
        found = recognize_window(source, window, parsed)
        if found is None:
            skipped += 1
            continue
        per_tile.append(found)
    recognized = time.perf_counter()
    merged = merge_tiles(per_tile, parsed)
    finished = time.perf_counter()
    return Recognition(
        width=width,
        height=height,
        detections=merged,
        recognizer=parsed.recognizer,
        params=parsed.params,
        tile=parsed.tile,
        overlap=parsed.overlap,
        tiles=len(windows),
        tasks=1,
        timings={"recognize_s": recognized - started, "merge_s": finished - recognized, "total_s": finished - started},
        level=parsed.level,
        downsample=source.downsample,
        roi=parsed.roi,
        skipped=skipped if parsed.skip_blank is not None else None,
    )
