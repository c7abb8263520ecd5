"""A recognizer with a second stage, loaded by workers as `tests.staged:DarkBlobs` (TILEREC_PLUGIN_MODULES), and the
scene it has known truth on.

The first stage outlines dark rectangles on tiles (`tests.shaped.Segmenter`; the merge joins the pieces of one cut
by seams). The second stage reads each merged rectangle's crop at full resolution and measures what no tile can
give for a rectangle larger than a tile: its dark pixels in all, and a digest of the crop's exact pixels, which a
test compares with the same window of the scene it drew.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

from pipeline.model import Detections
from pipeline.options import JobOptions
from pipeline.recognizers import RecognizerSpec
from pipeline.recognizers.stages import Crop, SecondStage, StageResult
from tasks.resources import register
from tests.shaped import DARK, Segmenter

RED = (0, 0, 255)  # a crop with a pure red pixel makes the stage fail on it
GREEN = (0, 255, 0)  # and one with a pure green pixel kills its worker process
HOLD_S = 120.0  # the longest a held crop waits


class Measure(SecondStage):
    """Per crop: the digest of its pixels, its size and its dark pixels; the page: dark pixels in all. A pure red
    pixel in a crop makes it raise, a pure green one kill its process. While the
    file `hold` exists, a call with a crop wider than `hold_wider` pixels waits (leaving `<hold>.<pid>`)."""

    name = "measure"
    cost_ms = 1.0

    def __init__(self, pad: int = 3, hold: str = "", hold_wider: int = 0, labels: str = "") -> None:
        self.pad, self.hold, self.hold_wider = pad, hold, hold_wider

    def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
        wide = any(crop.window.width > self.hold_wider for crop in crops)
        if self.hold and wide and Path(self.hold).exists():  # held at a known point: the test says when to go on
            Path(f"{self.hold}.{os.getpid()}").touch()
            deadline = time.monotonic() + HOLD_S
            while Path(self.hold).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return [self.measure(crop) for crop in crops]

    @staticmethod
    def measure(crop: Crop) -> dict[str, Any]:
        pixels = crop.pixels
        if pixels.ndim == 3 and bool(np.all(pixels == RED, axis=2).any()):
            raise ValueError("a red pixel in this crop")
        if pixels.ndim == 3 and bool(np.all(pixels == GREEN, axis=2).any()):
            os._exit(1)
        grey = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
        x1, y1, x2, y2 = crop.detection.xyxy[0]
        return {
            "digest": digest(pixels),
            "window": [crop.window.x, crop.window.y, crop.window.width, crop.window.height],
            "dark": int((grey < DARK).sum()),
            "box_in_crop": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "secret": "kept out of results",  # as a face embedding would be
        }

    def finish(
        self, detections: Detections, records: Sequence[Mapping[str, Any] | None], resources: Mapping[str, Any]
    ) -> StageResult:
        names = ("digest", "window", "dark", "box_in_crop")
        columns = {name: [None if r is None else r[name] for r in records] for name in names}
        read = sum(r is not None for r in records)
        dark = sum(r["dark"] for r in records if r is not None)
        return StageResult(detections.with_data(columns), {"read": read, "dark_pixels": dark})


class Labelled(Measure):
    """`Measure`, and each detection labelled by its dark pixels from the label set the job names (`labels`): a
    resource its finish needs, which workers load from Redis (as faces load a gallery)."""

    resources = ("labels",)

    def finish(
        self, detections: Detections, records: Sequence[Mapping[str, Any] | None], resources: Mapping[str, Any]
    ) -> StageResult:
        measured = super().finish(detections, records, resources)
        names = [resources["labels"].get(str(dark), "unknown") for dark in measured.detections.data["dark"]]
        return StageResult(measured.detections.with_data({"name": names}), measured.output)


def load_labels(client: redis.Redis, options: JobOptions) -> dict[str, str]:
    """The label set the job names, from the store's Redis (`tilerec:test:labels:<name>`, JSON)."""
    name = options.params["labels"]
    stored = client.get(f"tilerec:test:labels:{name}")
    if stored is None:
        raise LookupError(f"no label set named {name!r}")
    return json.loads(stored)


register("labels", load_labels)


class DarkBlobs(Segmenter):
    """Dark regions, each measured on its full-resolution crop by a second stage"""

    cost_ms = 1.0

    def __init__(self, pad: int = 3, hold: str = "", hold_wider: int = 0, labels: str = "") -> None:
        del pad, hold, hold_wider, labels  # the second stage's parameters

    @staticmethod
    def second_stage(params: Mapping[str, Any]) -> Measure:
        return Labelled(**params) if params["labels"] else Measure(**params)


# the same as a grey recognizer: its tiles are stored grey, and so are its crops
GREY_BLOBS = RecognizerSpec("grey-blobs", DarkBlobs, {"pad": 3, "hold": "", "hold_wider": 0, "labels": ""},
                            grey=True, second_stage=DarkBlobs.second_stage)  # fmt: skip


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@dataclass(frozen=True)
class BlobScene:
    image: np.ndarray  # BGR, grey noise: light background, dark rectangles
    rects: list[tuple[int, int, int, int]]  # x, y, w, h


def blob_scene(width: int, height: int, rects: list[tuple[int, int, int, int]], seed: int = 0) -> BlobScene:
    """Light grey noise (170-255) with dark grey noise (0-90) in each rectangle: every pixel differs from its
    neighbours, so a crop shifted by one pixel has another digest."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(170, 256, (height, width), dtype=np.uint8)
    for x, y, w, h in rects:
        grey[y : y + h, x : x + w] = rng.integers(0, 91, (h, w), dtype=np.uint8)
    return BlobScene(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), rects)
