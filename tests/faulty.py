"""Recognizers that misbehave on purpose, loaded by workers as `tests.faulty:…` (TILEREC_PLUGIN_MODULES).

They read QR codes like `qrcode`, except on tiles that contain the marker: a patch of pure red.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.model import Detections
from pipeline.recognizers import get_recognizer

MARKER_BGR = (0, 0, 255)


def has_marker(tile: np.ndarray) -> bool:
    return tile.ndim == 3 and bool(np.all(tile == MARKER_BGR, axis=2).sum() >= 100)


class RaisesOnMarker:
    """QR codes; raises on tiles with the red marker"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            raise ValueError("the red marker makes this recognizer fail")
        return get_recognizer("qrcode")(tile)


class CrashesOnMarker:
    """QR codes; kills its own worker process on tiles with the red marker"""

    def __call__(self, tile: np.ndarray) -> Detections:
        if has_marker(tile):
            os._exit(1)
        return get_recognizer("qrcode")(tile)
