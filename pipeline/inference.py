"""Recognizing tiles and merging them: the same functions run in one process and on Celery workers,
so the two give identical detections."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from pipeline.images import normalize
from pipeline.merge import merge_detections, place
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, parse_options
from pipeline.recognizers import get_recognizer, get_spec
from pipeline.tiling import Window, auto_batch_size, batches, grid


def crop(image: np.ndarray, window: Window) -> np.ndarray:
    return image[window.y : window.y2, window.x : window.x2]


def plan(height: int, width: int, options: JobOptions) -> list[list[Window]]:
    """The tile grid cut into task batches: `batch_size` tiles each, or as many as the recognizer's cost suggests."""
    windows = grid(height, width, options.tile, options.overlap)
    size = options.batch_size
    if size is None:
        area = windows[0].width * windows[0].height
        tile_cost_ms = get_spec(options.recognizer).cost_ms * area / (640 * 640)
        size = auto_batch_size(len(windows), tile_cost_ms)
    return batches(windows, size)


def recognize_tile(tile: np.ndarray, window: Window, options: JobOptions, width: int, height: int) -> Detections:
    """One tile's detections, filtered by score and placed in image coordinates."""
    recognizer = get_recognizer(options.recognizer, options.params)
    found = recognizer(tile)
    if options.min_score > 0 and len(found):
        found = found[np.flatnonzero(found.scores >= options.min_score)]
    return place(found, window, width, height)


def merge_tiles(per_tile: Iterable[Detections], options: JobOptions) -> Detections:
    """Merge per-tile detections given in tile order (the order decides ties, so keep it for identical results)."""
    return merge_detections(Detections.concat(per_tile), options.merge, options.match_metric, options.match_threshold)


def recognize_image(image: np.ndarray, recognizer: str = "faces", **options: object) -> Recognition:
    """Sliced recognition of a whole image in this process (what SAHI does), with tilerec's tiling and merge."""
    started = time.perf_counter()
    parsed = parse_options(recognizer, options)
    image = normalize(np.asarray(image))
    height, width = image.shape[:2]
    windows = grid(height, width, parsed.tile, parsed.overlap)
    per_tile = [recognize_tile(crop(image, w), w, parsed, width, height) for w in windows]
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
    )
