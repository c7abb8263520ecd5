"""An example tilerec plugin: bright spots, found by thresholding and connected components.

Exported two ways, as the plugin protocol allows (see pipeline/recognizers/plugins.py): the factory class itself
(its keyword defaults are the parameters) and a full `RecognizerSpec`. Install with `pip install -e
tests/plugin_example`; workers then run it by name: `tilerec.recognize(image, "bright-spots", threshold=200)`.

`bright-spots` also declares an optional second stage (`second_stage=True` runs it): each merged spot's crop, read
at full resolution, is measured whole (its brightest value and its pixels above the threshold), which no tile can
do for a spot cut by a seam.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.recognizers import RecognizerSpec
from pipeline.recognizers.stages import Crop, SecondStage


class Measure(SecondStage):
    """Per spot: its brightest value and its pixels above the threshold, on its whole crop."""

    name = "spot-measure"
    cost_ms = 0.2  # one crop on one core
    pad = 2  # pixels around each spot's box

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def recognize(self, crops: list[Crop]) -> list[dict]:
        records = []
        for crop in crops:
            grey = crop.pixels if crop.pixels.ndim == 2 else cv2.cvtColor(crop.pixels, cv2.COLOR_BGR2GRAY)
            records.append({"peak": int(grey.max()), "bright_pixels": int((grey > self.threshold).sum())})
        return records  # the default finish makes each field a data column


class BrightSpots:
    """bright spots (pixels above `threshold`) of at least `min_area` pixels"""

    cost_ms = 1.0
    stage_by_default = False  # jobs ask for the second stage with second_stage=True

    @staticmethod
    def second_stage(params: dict) -> Measure:
        return Measure(params["threshold"])

    def __init__(self, threshold: int = 200, min_area: int = 30) -> None:
        self.threshold, self.min_area = threshold, min_area

    def __call__(self, tile: np.ndarray) -> Detections:
        grey = tile if tile.ndim == 2 else cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
        _, mask = cv2.threshold(grey, self.threshold, 255, cv2.THRESH_BINARY)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        boxes = stats[1:count]  # row 0 is the background
        boxes = boxes[boxes[:, cv2.CC_STAT_AREA] >= self.min_area]
        scores = boxes[:, cv2.CC_STAT_AREA] / (boxes[:, 2] * boxes[:, 3])  # how much of its box the spot fills
        return Detections.from_xywh(boxes[:, :4], scores, "spot")


DIM_SPOTS = RecognizerSpec(
    "dim-spots", BrightSpots, {"threshold": 100, "min_area": 30}, "spots above grey 100", cost_ms=1.0
)
