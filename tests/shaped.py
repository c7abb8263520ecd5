"""Recognizers that return shapes, loaded by workers as `tests.shaped:…` (TILEREC_PLUGIN_MODULES).

`Segmenter` outlines every dark connected region of a tile exactly (pixel edges, holes included), as a perfect
instance-segmentation model would; `Malformed` returns one kind of broken shape, to test how tiles fail.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.shapes import polygons_from_bitmap

DARK = 128  # shapes are drawn dark on a light background


class Segmenter:
    """One detection per dark region: its exact polygon as the mask, its pixel count in `data["pixels"]`."""

    def __call__(self, tile: np.ndarray) -> Detections:
        grey = tile if tile.ndim == 2 else cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
        count, labels, stats, _ = cv2.connectedComponentsWithStats((grey < DARK).astype(np.uint8), connectivity=8)
        boxes, masks, pixels = [], [], []
        for region in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[region])
            crop = labels[y : y + h, x : x + w] == region
            boxes.append([x, y, w, h])
            masks.append(polygons_from_bitmap(crop, (x, y)))
            pixels.append(area)
        return Detections.from_xywh(
            boxes, [1.0] * len(boxes), "blob", masks=masks, class_id=[7] * len(boxes), data={"pixels": pixels}
        )


FAULTS = {
    "bowtie": {"masks": [[[[10, 10], [60, 60], [60, 10], [10, 60]]]]},  # self-intersecting
    "nan": {"obb": [[float("nan"), 20, 10, 10, 0]]},
    "outside": {"masks": [[[[10, 10], [5000, 10], [5000, 60], [10, 60]]]]},
}


class Malformed:
    """On tiles with a dark region, one detection with the broken shape named by `fault`; else nothing."""

    def __init__(self, fault: str = "bowtie") -> None:
        self.fault = fault

    def __call__(self, tile: np.ndarray) -> Detections:
        grey = tile if tile.ndim == 2 else cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
        if not (grey < DARK).any():
            return Detections.empty()
        return Detections.from_xywh([[10, 10, 50, 50]], [0.9], "blob", **FAULTS[self.fault])


class BatchedSegmenter(Segmenter):
    """`Segmenter` with the batch protocol: up to `max_batch` tiles a call; each detection's `data["pass_size"]` says
    how many tiles its pass had. A tile with a pure red pixel makes its whole pass raise, as a model can."""

    def __init__(self, max_batch: int = 4) -> None:
        self.max_batch = max_batch
        self.passes: list[int] = []

    def __call__(self, tile: np.ndarray) -> Detections:
        if tile.ndim == 3 and bool(np.all(tile == (0, 0, 255), axis=2).any()):
            raise ValueError("a red pixel in this pass")
        return super().__call__(tile)

    def recognize_batch(self, tiles: list[np.ndarray]) -> list[Detections]:
        self.passes.append(len(tiles))
        found = [self(tile) for tile in tiles]  # one red tile fails the whole pass
        for detections in found:
            detections.data["pass_size"] = np.full(len(detections), len(tiles), dtype=object)
        return found
