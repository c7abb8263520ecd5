"""OpenCV's classical recognizers: nothing to download, shipped inside opencv-python-headless 4.x. From OpenCV 5.0
the Haar cascades and HOG (`faces`, `people`) moved to the contrib package (opencv-contrib-python-headless), which
provides them under the same names; without it those two say so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.recognizers import RecognizerError, RecognizerSpec, register
from pipeline.shapes import obb_from_points


def _grey(tile: np.ndarray) -> np.ndarray:
    return tile if tile.ndim == 2 else cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)


def _bgr(tile: np.ndarray) -> np.ndarray:
    return tile if tile.ndim == 3 else cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)


def _squash(margin: np.ndarray) -> np.ndarray:
    """Classifier margins (unbounded) to a score in (0, 1); monotonic, so thresholds keep their order."""
    return 1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=np.float64).reshape(-1)))


def _from_quads(quads: np.ndarray, texts: list[str], label: str) -> Detections:
    """Codes found as quads: their corners as `points`, their turn as `obb`, and the box around them."""
    quads = np.asarray(quads, dtype=np.float64).reshape(-1, 4, 2)
    xyxy = np.hstack([quads.min(axis=1), quads.max(axis=1)])
    obb = [obb_from_points(quad) for quad in quads]
    return Detections(xyxy, np.ones(len(quads)), [label] * len(quads), texts, list(quads), obb=obb)


CONTRIB = "opencv-contrib-python-headless"  # OpenCV 5's home of the Haar cascades and HOG


def contrib(name: str) -> Any:
    """`cv2.<name>`, which OpenCV 5 ships only in its contrib package.

    Args:
        name: an attribute of `cv2`, such as "CascadeClassifier".

    Returns:
        The attribute.

    Raises:
        RecognizerError: this OpenCV has no such attribute; the message names the package to install.
    """
    found = getattr(cv2, name, None)
    if found is None:
        major = cv2.__version__.split(".")[0]
        raise RecognizerError(
            f"OpenCV {cv2.__version__} has no cv2.{name}: from OpenCV 5 it is in the contrib package; "
            f"pip install '{CONTRIB}=={major}.*' (in place of opencv-python-headless)"
        )
    return found


def haar_cascade(file_name: str) -> Path:
    """A Haar cascade shipped with OpenCV (in 5.x, with its contrib package only)."""
    path = Path(cv2.data.haarcascades) / file_name
    if not path.is_file():
        raise RecognizerError(f"OpenCV {cv2.__version__} ships no {file_name}: pip install '{CONTRIB}'")
    return path


class HaarFaces:
    def __init__(self, scale_factor: float, min_neighbors: int, min_size: int) -> None:
        self.cascade = contrib("CascadeClassifier")(str(haar_cascade("haarcascade_frontalface_default.xml")))
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def __call__(self, tile: np.ndarray) -> Detections:
        boxes, _, weights = self.cascade.detectMultiScale3(
            _grey(tile),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
            outputRejectLevels=True,
        )
        return Detections.from_xywh(np.asarray(boxes).reshape(-1, 4), _squash(weights), "face")


class HogPeople:
    def __init__(self, scale: float, win_stride: int) -> None:
        self.hog = contrib("HOGDescriptor")()
        self.hog.setSVMDetector(contrib("HOGDescriptor_getDefaultPeopleDetector")())
        self.scale, self.win_stride = scale, win_stride

    def __call__(self, tile: np.ndarray) -> Detections:
        if min(tile.shape[:2]) < 128:
            return Detections.empty()
        stride = (self.win_stride, self.win_stride)
        boxes, weights = self.hog.detectMultiScale(tile, winStride=stride, padding=(8, 8), scale=self.scale)
        return Detections.from_xywh(np.asarray(boxes).reshape(-1, 4), _squash(weights), "person")


def _decoded(found: bool, texts: Sequence[str], quads: np.ndarray | None, label: str) -> Detections:
    """The codes a detector found and decoded (one found but not decoded is left out), from its quads and texts."""
    if not found or quads is None:
        return Detections.empty()
    keep = [i for i, text in enumerate(texts) if text]
    return _from_quads(quads[keep], [texts[i] for i in keep], label)


class QRCodes:
    """QR codes, detected and decoded; codes that are found but cannot be decoded are left out."""

    def __init__(self) -> None:
        self.detector = cv2.QRCodeDetectorAruco()

    def __call__(self, tile: np.ndarray) -> Detections:
        found, texts, quads, _ = self.detector.detectAndDecodeMulti(tile)
        return _decoded(found, texts, quads, "qrcode")


class Barcodes:
    """1-D barcodes (EAN-8, EAN-13, UPC-A, UPC-E); the payload goes to `text`."""

    def __init__(self) -> None:
        self.detector = cv2.barcode.BarcodeDetector()

    def __call__(self, tile: np.ndarray) -> Detections:
        found, texts, _, quads = self.detector.detectAndDecodeWithType(tile)
        return _decoded(found, texts, quads, "barcode")


class ArucoMarkers:
    """ArUco markers of one dictionary; the marker id goes to `text`, its four corners to `points`."""

    def __init__(self, dictionary: str) -> None:
        if not dictionary.startswith("DICT_") or not hasattr(cv2.aruco, dictionary):
            known = ", ".join(name for name in dir(cv2.aruco) if name.startswith("DICT_"))
            raise RecognizerError(f"unknown ArUco dictionary {dictionary!r}; known: {known}")
        chosen = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, dictionary))
        self.detector = cv2.aruco.ArucoDetector(chosen, cv2.aruco.DetectorParameters())

    def __call__(self, tile: np.ndarray) -> Detections:
        quads, ids, _ = self.detector.detectMarkers(_grey(tile))
        if ids is None:
            return Detections.empty()
        return _from_quads(np.asarray(quads), [str(int(i)) for i in ids.reshape(-1)], "aruco")


register(
    RecognizerSpec(
        "faces",
        HaarFaces,
        {"scale_factor": 1.1, "min_neighbors": 5, "min_size": 24},
        "frontal faces, Haar cascade (Viola-Jones)",
        cost_ms=23,
        grey=True,
    )
)
register(
    RecognizerSpec(
        "people",
        HogPeople,
        {"scale": 1.05, "win_stride": 8},
        "standing people at least 64x128 px, HOG + linear SVM (Dalal-Triggs)",
        cost_ms=60,
    )
)
register(
    RecognizerSpec(
        "qrcode", QRCodes, {}, "QR codes, detected and decoded (payload in text, turn in obb)", cost_ms=40, grey=True
    )
)
register(
    RecognizerSpec("barcode", Barcodes, {}, "1-D barcodes EAN/UPC, decoded (payload in text)", cost_ms=3, grey=True)
)
register(
    RecognizerSpec(
        "aruco",
        ArucoMarkers,
        {"dictionary": "DICT_4X4_50"},
        "ArUco markers (id in text, corners in points, turn in obb)",
        cost_ms=1.5,
        grey=True,
    )
)
