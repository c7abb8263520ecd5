"""Neural detectors: faces with landmarks (OpenCV's YuNet) and COCO objects from an ONNX file (ONNX Runtime).

Model files are not part of tilerec (where to get them: ../shared/models/PROVENANCE.md). Each recognizer takes
its file from its `model` parameter, else from its own env var, else from the folder in TILEREC_MODEL_DIR.
A `model` (or `names`) sent in a job is a path the worker opens: on workers it must lie under TILEREC_MODEL_DIR or
TILEREC_MODEL_ROOTS (see `restrict_file_params`), so a message cannot make a worker parse arbitrary files.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.recognizers import RecognizerError, RecognizerSpec, register, thread_budget

MODEL_DIR_ENV = "TILEREC_MODEL_DIR"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
OBJECTS_FILE = "FastestDet.onnx"
NAMES_FILE = "coco.names"
LAYOUTS = ("auto", "fastestdet", "yolov5", "yolov8")


def model_file(recognizer: str, param: str, value: str, env: str, filename: str) -> Path:
    """The model named by the parameter, else by `env`, else TILEREC_MODEL_DIR/filename; it must be a file."""
    model_dir = os.environ.get(MODEL_DIR_ENV, "")
    choices = [
        (value, f"parameter {param!r}"),
        (os.environ.get(env, ""), f"env {env}, parameter {param!r} being empty"),
        (model_dir and os.path.join(model_dir, filename), f"env {MODEL_DIR_ENV}, parameter {param!r} being empty"),
    ]
    chosen = next(((path, source) for path, source in choices if path), None)
    if chosen is None:
        raise RecognizerError(
            f"recognizer {recognizer!r} needs its model file {filename}: set parameter {param!r}, "
            f"or env {env} to the file, or env {MODEL_DIR_ENV} to its folder"
        )
    path = Path(chosen[0]).expanduser()
    if not path.is_file():
        raise RecognizerError(f"recognizer {recognizer!r}: model file {path} (from {chosen[1]}) does not exist")
    return path


def _unloadable(recognizer: str, param: str, path: Path, error: Exception) -> RecognizerError:
    """The loader's complaint in one line, without OpenCV's source paths or ORT's error codes in front."""
    reason = " ".join(str(error).split()).rpartition("error: ")[2].rpartition(" : ")[2][:200]
    return RecognizerError(
        f"recognizer {recognizer!r}: model file {path} (parameter {param!r}) is not a usable ONNX model: {reason}"
    )


def _bgr(tile: np.ndarray) -> np.ndarray:
    return tile if tile.ndim == 3 else cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)


class YuNetFaces:
    """Faces with five landmarks (eyes, nose tip, mouth corners) as `points`.

    One detector per process; `setInputSize` per tile only resizes the network's input, which is cheap.
    """

    def __init__(self, model: str, score_threshold: float, nms_threshold: float, top_k: int) -> None:
        path = model_file("faces-dnn", "model", model, "TILEREC_YUNET_MODEL", YUNET_FILE)
        try:
            self.detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, top_k)
        except cv2.error as error:
            raise _unloadable("faces-dnn", "model", path, error) from None

    def __call__(self, tile: np.ndarray) -> Detections:
        height, width = tile.shape[:2]
        self.detector.setInputSize((width, height))
        _, faces = self.detector.detect(_bgr(tile))
        if faces is None:
            return Detections.empty()
        return Detections.from_xywh(faces[:, :4], faces[:, 14], "face", points=list(faces[:, 4:14].reshape(-1, 5, 2)))


def _session(path: Path) -> Any:
    """An ONNX Runtime session on this process's thread budget (0 before `limit_threads`: ORT picks)."""
    import onnxruntime  # here, not at module level: 0.2 s that clients and the CLI never need

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = thread_budget()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT's own exception types (InvalidProtobuf, Fail, ...)
        raise _unloadable("objects", "model", path, error) from None


def _read_names(model: Path, names: str, metadata: dict[str, str]) -> list[str]:
    """Class names: the `names` file, else the model's `names` metadata (as Ultralytics exports), else coco.names
    beside the model."""
    if not names and "names" in metadata:
        try:  # a dict literal {0: 'person', ...}; literal_eval runs no code
            parsed = ast.literal_eval(metadata["names"])
            return (
                [str(parsed[key]) for key in sorted(parsed)] if isinstance(parsed, dict) else [str(n) for n in parsed]
            )
        except (ValueError, TypeError, SyntaxError):
            raise RecognizerError(f"recognizer 'objects': model {model} has unreadable 'names' metadata") from None
    path = Path(names).expanduser() if names else model.with_name(NAMES_FILE)
    if not path.is_file():
        raise RecognizerError(
            f"recognizer 'objects': names file {path} (parameter 'names') does not exist, "
            f"and model {model} has no 'names' metadata"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _layout(layout: str, shape: Sequence[int], classes: int) -> str:
    """The output layout: FastestDet's 1×(5+C)×H×W grid, YOLOv5's 1×N×(5+C) rows, YOLOv8/11's 1×(4+C)×N columns."""
    fits = {
        "fastestdet": len(shape) == 4 and shape[1] == 5 + classes,
        "yolov8": len(shape) == 3 and shape[1] == 4 + classes,
        "yolov5": len(shape) == 3 and shape[2] == 5 + classes,
    }
    if layout == "auto":
        layout = next((name for name, fit in fits.items() if fit), "auto")
    if not fits.get(layout):
        raise RecognizerError(
            f"recognizer 'objects': output shape {tuple(shape)} does not fit layout {layout!r} with {classes} "
            f"classes (parameter 'layout': one of {', '.join(LAYOUTS)}; parameter 'names': the class names)"
        )
    return layout


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class OnnxObjects:
    """COCO-style objects from an ONNX detector, run with ONNX Runtime.

    ORT and not cv2.dnn: several times faster on CPU (docs/performance.md), and it reads the class names that
    Ultralytics exports store in the model's metadata. OpenCV still does the resizing and NMS.
    Each layout has its own pre-processing and decoder; boxes then go through per-class NMS, as upstream.
    """

    def __init__(
        self,
        model: str,
        names: str,
        layout: str,
        input_size: int,
        score_threshold: float,
        nms_threshold: float,
        classes: str,
    ) -> None:
        if layout not in LAYOUTS:
            raise RecognizerError(f"recognizer 'objects': parameter 'layout' must be one of {LAYOUTS}, got {layout!r}")
        path = model_file("objects", "model", model, "TILEREC_OBJECTS_MODEL", OBJECTS_FILE)
        self.session = _session(path)
        self.input = self.session.get_inputs()[0]
        dims = self.input.shape[2:]
        # a dynamic input (a name, not a number) takes `input_size`, or 640 as Ultralytics exports do
        self.size = tuple(d if isinstance(d, int) else input_size or 640 for d in dims)[::-1]  # (width, height)
        self.names = _read_names(path, names, self.session.get_modelmeta().custom_metadata_map)
        try:  # one blank run: the output's shape picks the layout, and a model that cannot run fails here, named
            probe = self.session.run(None, {self.input.name: np.zeros((1, 3, *self.size[::-1]), np.float32)})
        except Exception as error:
            raise _unloadable("objects", "model", path, error) from None
        self.layout = _layout(layout, probe[0].shape, len(self.names))
        wanted = [name.strip() for name in classes.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(self.names))
        if unknown:
            raise RecognizerError(f"recognizer 'objects': parameter 'classes' names unknown class(es) {unknown}")
        self.keep = np.array([not wanted or name in wanted for name in self.names])
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold

    def _fastestdet(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per grid cell: score = obj^0.6 · max(cls)^0.4, centre = (cell + tanh(offset)) / grid, size = sigmoid(term),
        all relative to the (stretched) input, so relative to the tile."""
        grid = output[0]
        rows, cols = grid.shape[1:]
        classes = grid[5:].reshape(len(self.names), -1)
        ids = classes.argmax(axis=0)
        scores = grid[0].reshape(-1).clip(0, 1) ** 0.6 * classes.max(axis=0).clip(0, 1) ** 0.4
        cells = np.flatnonzero(scores >= self.score_threshold)
        row, col = np.divmod(cells, cols)
        terms = grid[1:5].reshape(4, -1)[:, cells]
        cx, cy = (col + np.tanh(terms[0])) / cols, (row + np.tanh(terms[1])) / rows
        w, h = _sigmoid(terms[2]), _sigmoid(terms[3])
        return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1), scores[cells], ids[cells]

    def _yolo(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of cx, cy, w, h (input pixels), [obj,] class scores; YOLOv8 has no obj and stores columns."""
        rows = output[0].T if self.layout == "yolov8" else output[0]
        classes = rows[:, -len(self.names) :]
        ids, scores = classes.argmax(axis=1), classes.max(axis=1)
        if self.layout == "yolov5":
            scores = scores * rows[:, 4]
        keep = np.flatnonzero(scores >= self.score_threshold)
        cx, cy, w, h = rows[keep, :4].T
        return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1), scores[keep], ids[keep]

    def _letterbox(self, tile: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
        """The tile scaled to fit the input, aspect kept, centred on grey 114 (Ultralytics' pre-processing)."""
        height, width = tile.shape[:2]
        scale = min(self.size[0] / width, self.size[1] / height)
        scaled = cv2.resize(tile, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
        left, top = (self.size[0] - scaled.shape[1]) // 2, (self.size[1] - scaled.shape[0]) // 2
        right, bottom = self.size[0] - scaled.shape[1] - left, self.size[1] - scaled.shape[0] - top
        padded = cv2.copyMakeBorder(scaled, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        return padded, scale, (left, top)

    def _run(self, picture: np.ndarray, rgb: bool) -> np.ndarray:
        blob = cv2.dnn.blobFromImage(picture, 1 / 255, swapRB=rgb)  # HWC uint8 to 1xCxHxW float in [0, 1]
        return self.session.run(None, {self.input.name: blob})[0]

    def __call__(self, tile: np.ndarray) -> Detections:
        tile = _bgr(tile)
        if self.layout == "fastestdet":
            boxes, scores, ids = self._fastestdet(
                self._run(cv2.resize(tile, self.size, interpolation=cv2.INTER_AREA), False)
            )
            boxes = boxes * np.tile(tile.shape[1::-1], 2)
        else:
            picture, scale, offset = self._letterbox(tile)
            boxes, scores, ids = self._yolo(self._run(picture, True))
            boxes = (boxes - np.array([*offset, 0, 0])) / scale
        wanted = np.flatnonzero(self.keep[ids])
        if not len(wanted):
            return Detections.empty()
        boxes, scores, ids = boxes[wanted].astype(np.float64), scores[wanted].astype(np.float64), ids[wanted]
        kept = np.asarray(cv2.dnn.NMSBoxesBatched(boxes, scores, ids, self.score_threshold, self.nms_threshold))
        kept = kept.reshape(-1)
        return Detections.from_xywh(boxes[kept], scores[kept], [self.names[i] for i in ids[kept]])


register(
    RecognizerSpec(
        "faces-dnn",
        YuNetFaces,
        {"model": "", "score_threshold": 0.7, "nms_threshold": 0.3, "top_k": 5000},
        f"faces with 5 landmarks, YuNet CNN (model: {YUNET_FILE})",
        cost_ms=47,  # a 640x640 tile on one thread (YuNet net + OpenCV's post-processing)
        file_params=("model",),
    )
)
register(
    RecognizerSpec(
        "objects",
        OnnxObjects,
        {
            "model": "",
            "names": "",
            "layout": "auto",
            "input_size": 0,
            "score_threshold": 0.65,  # FastestDet upstream's; YOLO exports are usually run at 0.25
            "nms_threshold": 0.45,
            "classes": "",
        },
        f"objects (80 COCO classes), ONNX Runtime: FastestDet, YOLOv5 or YOLOv8/11 exports (model: {OBJECTS_FILE})",
        cost_ms=14,  # a 640x640 tile on one thread with FastestDet (a YOLO model costs several times more)
        file_params=("model", "names"),
    )
)
