"""Neural detectors: faces with landmarks (OpenCV's YuNet) and objects from an ONNX file (ONNX Runtime): boxes, and
for YOLOv8/11 exports of the other heads also instance masks, oriented boxes or keypoints.

Model files are not part of tilerec (where to get them: ../shared/models/PROVENANCE.md). Each recognizer takes
its file from its `model` parameter, else from the file configured under its own variable's name, else from the
configured folder (`configure_models`: workers and the CLI configure them from TILEREC_MODEL_DIR and the variables).
A `model` (or `names`) sent in a job is a path the worker opens: on workers it must lie under TILEREC_MODEL_DIR or
TILEREC_MODEL_ROOTS (see `restrict_file_params`), so a message cannot make a worker parse arbitrary files.
ONNX Runtime sessions run on the execution providers of `configure_execution` (workers: TILEREC_ONNX_PROVIDERS).
"""

from __future__ import annotations

import ast
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from pipeline.model import Detections
from pipeline.recognizers import RecognizerError, RecognizerSpec, register, thread_budget
from pipeline.shapes import COCO_KEYPOINTS, obb_corners, polygons_from_bitmap

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "TILEREC_MODEL_DIR"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
OBJECTS_FILE = "FastestDet.onnx"
NAMES_FILE = "coco.names"
LAYOUTS = ("auto", "fastestdet", "yolov5", "yolov8", "yolov8-seg", "yolov8-obb", "yolov8-pose")
# the layout of each `task` that Ultralytics writes into an export's metadata
TASK_LAYOUTS = {"detect": "yolov8", "segment": "yolov8-seg", "obb": "yolov8-obb", "pose": "yolov8-pose"}
MASK_COEFFICIENTS = 32  # prototype masks of Ultralytics' segment heads
# the subject's right and left, in the order of FaceDetectorYN's output columns 4-13
YUNET_KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "right_mouth_corner", "left_mouth_corner")


@dataclass(frozen=True)
class ModelPlaces:
    """Where recognizers find their model files when a job names none."""

    folder: str = ""  # TILEREC_MODEL_DIR: each recognizer's own file name in it
    files: Mapping[str, str] = field(default_factory=dict)  # by the variable a recognizer names: its file


_places = ModelPlaces()  # this process's (`configure_models`)


def configure_models(folder: str = "", files: Mapping[str, str] | None = None) -> None:
    """Where this process's recognizers find their model files when a job names none (none until called).

    Args:
        folder: the folder of the models under their usual file names (workers: TILEREC_MODEL_DIR).
        files: a file for a recognizer, by the variable it names (`TILEREC_YUNET_MODEL`, `TILEREC_OBJECTS_MODEL`);
            empty values are left out.

    Example:
        >>> configure_models("/models", {"TILEREC_OBJECTS_MODEL": "/models/yolo11n.onnx"})
    """
    global _places
    _places = ModelPlaces(folder, {name: path for name, path in (files or {}).items() if path})


def model_file(recognizer: str, param: str, value: str, env: str, filename: str) -> Path:
    """The model named by the parameter, else configured under `env`, else the configured folder's `filename`; it
    must be a file."""
    model_dir = _places.folder
    choices = [
        (value, f"parameter {param!r}"),
        (_places.files.get(env, ""), f"env {env}, parameter {param!r} being empty"),
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
    """Faces with five landmarks as `keypoints` (eyes, nose tip, mouth corners; `YUNET_KEYPOINTS`), each scored
    with its face's score, since YuNet gives no score per landmark.

    One detector per process; `setInputSize` per tile only resizes the network's input, which is cheap.
    """

    def __init__(
        self, model: str, score_threshold: float, nms_threshold: float, top_k: int, **identities: Any
    ) -> None:  # `identities`: the parameters of the identities stage (pipeline.recognizers.faces), not the detector's
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
        landmarks = faces[:, 4:14].reshape(-1, 5, 2)
        scores = np.broadcast_to(faces[:, 14, None, None], (len(faces), 5, 1))
        keypoints = list(np.concatenate([landmarks, scores], axis=2))
        return Detections.from_xywh(
            faces[:, :4], faces[:, 14], "face", keypoints=keypoints, keypoint_names=YUNET_KEYPOINTS
        )


CPU_PROVIDER = "CPUExecutionProvider"
# the providers that pick their device with a `device_id` option; the others (the CPU's among them) have none
DEVICE_ID_PROVIDERS = frozenset({
    "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "DmlExecutionProvider", "CANNExecutionProvider",
})  # fmt: skip


@dataclass(frozen=True)
class Execution:
    """Where this process's ONNX Runtime sessions run: the providers asked for (most preferred first), the device of
    those that take one, whether a missing provider refuses (`strict`) or falls back, and the providers this
    onnxruntime build has; sessions are given `used`."""

    requested: tuple[str, ...] = (CPU_PROVIDER,)
    device: int = 0
    strict: bool = False
    available: tuple[str, ...] = (CPU_PROVIDER,)  # every build has the CPU's: no need to import onnxruntime to know

    @property
    def missing(self) -> tuple[str, ...]:
        """The requested providers this build lacks (the CPU wheel has no CUDA; a misspelt name is lacking too)."""
        return tuple(name for name in self.requested if name not in self.available)

    @property
    def used(self) -> tuple[str, ...]:
        """The requested providers this build has, else the CPU's (ORT runs what a provider cannot on the CPU)."""
        return tuple(name for name in self.requested if name in self.available) or (CPU_PROVIDER,)

    def providers(self) -> list[str | tuple[str, dict[str, int]]]:
        """`used` as InferenceSession takes it, the device given to the providers that choose one."""
        return [(name, {"device_id": self.device}) if name in DEVICE_ID_PROVIDERS else name for name in self.used]

    def to_json(self) -> dict[str, Any]:
        """What `tilerec recognizers --json` shows of a process (or a worker node)."""
        return {
            "available": list(self.available),
            "configured": list(self.requested),
            "used": list(self.used),
            "device": self.device,
            "strict": self.strict,
        }


_execution = Execution()
_told: set[tuple[tuple[str, ...], str]] = set()  # the fallbacks this process has warned about


def plan_execution(providers: Sequence[str], device: int = 0, strict: bool = False) -> Execution:
    """Where sessions would run with these providers (none: the CPU's) on this onnxruntime, changing nothing: what
    `configure_execution` sets, and what `tilerec recognizers --json` reports."""
    import onnxruntime  # here, not at module level: 0.2 s that clients and the CLI never need

    names = tuple(name.strip() for name in providers if name.strip()) or (CPU_PROVIDER,)
    return Execution(names, int(device), bool(strict), tuple(onnxruntime.get_available_providers()))


def configure_execution(providers: Sequence[str], device: int = 0, strict: bool = False) -> Execution:
    """Run this process's ONNX Runtime sessions on these providers from now on; sessions read it when they are
    built, so call it before the first recognizer. Workers call it once from their settings, before their pool
    starts: every process inherits it, and a fallback is told once per node. A requested provider this build lacks
    is left out with one warning naming it and what runs instead; with `strict`, building a recognizer refuses."""
    global _execution
    _execution = plan_execution(providers, device, strict)
    if _execution.missing and not strict:
        _fall_back(_execution, _execution.missing, "not in this onnxruntime build", _execution.used)
    return _execution


def current_execution() -> Execution:
    """This process's providers (the CPU's until `configure_execution`)."""
    return _execution


def _fall_back(execution: Execution, names: tuple[str, ...], why: str, instead: Sequence[str]) -> None:
    """Warn once per process that sessions run without these providers, and on what instead; refuse if strict."""
    available = ", ".join(execution.available)
    message = f"ONNX Runtime execution provider(s) {', '.join(names)} {why} (available: {available})"
    if execution.strict:
        raise RecognizerError(
            f"recognizer 'objects': {message}, and strict providers (TILEREC_ONNX_PROVIDERS_STRICT) do not fall back"
        )
    if (names, why) not in _told:
        _told.add((names, why))
        log.warning("%s: sessions use %s instead", message, ", ".join(instead))


def _session(path: Path, recognizer: str = "objects", param: str = "model") -> Any:
    """An ONNX Runtime session on this process's providers (`configure_execution`) and thread budget (0 before
    `limit_threads`: ORT picks); a provider it could not have is told once, or refused."""
    import onnxruntime

    execution = _execution
    if execution.missing:  # told when configured; strict refuses here, so each tile fails with the reason
        _fall_back(execution, execution.missing, "not in this onnxruntime build", execution.used)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = thread_budget()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=execution.providers())
    except Exception as error:  # ORT's own exception types (InvalidProtobuf, Fail, ...)
        raise _unloadable(recognizer, param, path, error) from None
    started = session.get_providers()
    dropped = tuple(name for name in execution.used if name not in started)
    if dropped:  # a build may have a provider this machine cannot start (no CUDA libraries, no GPU): ORT leaves it out
        _fall_back(execution, dropped, "could not start", started)
    return session


def _metadata_literal(model: Path, metadata: Mapping[str, str], key: str) -> Any:
    """A Python literal that Ultralytics wrote into the model's metadata as `str(value)`, or None if `key` is absent;
    literal_eval runs no code."""
    if key not in metadata:
        return None
    try:
        return ast.literal_eval(metadata[key])
    except (ValueError, TypeError, SyntaxError):
        raise RecognizerError(f"recognizer 'objects': model {model} has unreadable {key!r} metadata") from None


def _read_names(model: Path, names: str, metadata: Mapping[str, str]) -> list[str]:
    """Class names: the `names` file, else the model's `names` metadata (as Ultralytics exports), else coco.names
    beside the model."""
    parsed = None if names else _metadata_literal(model, metadata, "names")  # a dict literal {0: 'person', ...}
    if parsed is not None:
        return [str(parsed[key]) for key in sorted(parsed)] if isinstance(parsed, dict) else [str(n) for n in parsed]
    path = Path(names).expanduser() if names else model.with_name(NAMES_FILE)
    if not path.is_file():
        raise RecognizerError(
            f"recognizer 'objects': names file {path} (parameter 'names') does not exist, "
            f"and model {model} has no 'names' metadata"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _keypoint_name_list(model: Path, metadata: Mapping[str, str]) -> list[str] | None:
    """The first class's keypoint names from newer Ultralytics exports' `kpt_names` ({0: ['nose', ...], ...}): a
    result has one naming for all its detections."""
    parsed = _metadata_literal(model, metadata, "kpt_names")
    lists = list(parsed.values()) if isinstance(parsed, dict) else parsed
    if not lists:
        return None
    names = lists if isinstance(lists[0], str) else lists[0]  # one list for all classes, or one per class
    return [str(name) for name in names]


def _keypoint_shape(model: Path, metadata: Mapping[str, str], classes: int) -> tuple[int, int] | None:
    """(K, values per keypoint) of a pose head: `kpt_shape` metadata ([17, 3]: x, y, visibility; [K, 2]: x, y),
    else K of `kpt_names` with visibility, else COCO's 17 for a one-class (person) model; None when nothing tells."""
    shape = _metadata_literal(model, metadata, "kpt_shape")
    if shape is not None:
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and shape[1] in (2, 3) and _count(shape[0])):
            raise RecognizerError(f"recognizer 'objects': model {model} has 'kpt_shape' {shape!r}, not [K, 2 or 3]")
        return int(shape[0]), int(shape[1])
    names = _keypoint_name_list(model, metadata)
    if names:
        return len(names), 3
    return (len(COCO_KEYPOINTS), 3) if classes == 1 else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and value > 0


def _keypoint_names(model: Path, metadata: Mapping[str, str], count: int) -> tuple[str, ...]:
    """The model's own keypoint names if it has `count` of them, else COCO's for 17, else kp0, kp1, …"""
    names = _keypoint_name_list(model, metadata)
    if names and len(names) == count:
        return tuple(names)
    return COCO_KEYPOINTS if count == len(COCO_KEYPOINTS) else tuple(f"kp{i}" for i in range(count))


def _layout(
    layout: str, shapes: Sequence[Sequence[int]], classes: int, keypoints: tuple[int, int] | None, task: str
) -> str:
    """The output layout: FastestDet's 1×(5+C)×H×W grid, YOLOv5's 1×N×(5+C) rows, YOLOv8/11's 1×(4+C+E)×N columns
    with E head columns: none (detect), 32 mask coefficients beside 1×32×mh×mw prototypes (segment), an angle (obb),
    K keypoints (pose). `auto` takes the layout of the Ultralytics `task` metadata, else the first that fits, in
    this order: the heads that only a few columns tell apart come after the plain layouts."""
    first = tuple(shapes[0])
    columns = first[1] - 4 - classes if len(first) == 3 else None  # YOLOv8/11's columns after box and classes
    protos = tuple(shapes[1]) if len(shapes) == 2 else ()
    fits = {
        "fastestdet": len(first) == 4 and first[1] == 5 + classes,
        "yolov8": columns == 0,
        "yolov5": len(first) == 3 and first[2] == 5 + classes,
        "yolov8-seg": columns == MASK_COEFFICIENTS and len(protos) == 4 and protos[1] == MASK_COEFFICIENTS,
        "yolov8-obb": columns == 1,
        "yolov8-pose": keypoints is not None and columns == keypoints[0] * keypoints[1],
    }
    origin = ""
    if layout == "auto" and task in TASK_LAYOUTS:
        layout, origin = TASK_LAYOUTS[task], f" (from the model's 'task' metadata {task!r})"
    elif layout == "auto":
        layout = next((name for name, fit in fits.items() if fit), "auto")
    if not fits.get(layout):
        described = ", ".join(str(tuple(shape)) for shape in shapes)
        raise RecognizerError(
            f"recognizer 'objects': output shape{'s' if len(shapes) > 1 else ''} {described} does not fit layout "
            f"{layout!r}{origin} with {classes} classes (parameter 'layout': one of {', '.join(LAYOUTS)}; "
            "parameter 'names': the class names)"
        )
    return layout


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Letterbox(NamedTuple):
    """Where a letterboxed tile lies in the network's input: scaled by `scale`, its top-left corner at (left, top),
    `width`×`height` input pixels."""

    scale: float
    left: int
    top: int
    width: int
    height: int

    def to_tile(self, xy: np.ndarray) -> np.ndarray:
        """Input-pixel coordinates (x, y in the last axis) in tile pixels."""
        return (xy - np.array([self.left, self.top])) / self.scale

    def boxes_to_tile(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes x, y, w, h from input pixels to tile pixels."""
        return np.concatenate([self.to_tile(boxes[:, :2]), boxes[:, 2:] / self.scale], axis=1)


def _corner_form(centred: np.ndarray) -> np.ndarray:
    """Boxes cx, cy, w, h as x, y, w, h, the form OpenCV's NMS and `Detections.from_xywh` take."""
    cx, cy, w, h = centred.T
    return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)


def _upsampling(start: int, stop: int, source: int, target: int) -> np.ndarray:
    """Weights of bilinear upsampling from `source` to `target` pixels (PyTorch's align_corners=False, which
    Ultralytics uses), one row per output pixel start..stop-1: so only a box's crop of a mask is ever computed."""
    position = ((np.arange(start, stop) + 0.5) * source / target - 0.5).clip(0, source - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, source - 1)
    weights = np.zeros((stop - start, source))
    rows = np.arange(stop - start)
    weights[rows, below] = 1 - (position - below)
    weights[rows, above] += position - below  # the same pixel at the edge: its weight stays 1
    return weights


def _obb_degrees(centred: np.ndarray, radians: np.ndarray) -> np.ndarray:
    """(N, 5) oriented boxes in degrees, as Ultralytics' `regularize_rboxes` gives them: the angle brought into
    [0°, 90°), width and height swapped where that takes a quarter turn off, so that one box has one form."""
    obb = np.column_stack([centred, np.degrees(radians % (np.pi / 2))])
    swap = radians % np.pi >= np.pi / 2
    obb[swap, 2], obb[swap, 3] = centred[swap, 3], centred[swap, 2]
    return obb


class OnnxObjects:
    """Objects from an ONNX detector, run with ONNX Runtime: FastestDet, YOLOv5, and YOLOv8/11 exports of each head
    (detect; segment: `masks`; obb: `obb`; pose: `keypoints`); every detection has its `class_id`.

    ORT and not cv2.dnn: several times faster on CPU (docs/performance.md), and it reads the class names that
    Ultralytics exports store in the model's metadata. OpenCV still does the resizing and NMS.
    Each layout has its own pre-processing and decoder; boxes then go through per-class NMS, as upstream.

    Tiles run `max_batch` to a forward pass (`recognize_batch`; one tile is a pass of one): `batch` for a model with
    a dynamic batch axis, the model's own batch for a fixed one (a short last pass padded), 1 where the model
    cannot run two tiles at once.
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
        batch: int,
    ) -> None:
        if layout not in LAYOUTS:
            raise RecognizerError(f"recognizer 'objects': parameter 'layout' must be one of {LAYOUTS}, got {layout!r}")
        if batch < 1:
            raise RecognizerError(f"recognizer 'objects': parameter 'batch' must be at least 1, got {batch}")
        path = model_file("objects", "model", model, "TILEREC_OBJECTS_MODEL", OBJECTS_FILE)
        self.session = _session(path)
        self.input = self.session.get_inputs()[0]
        dims = self.input.shape[2:]
        # a dynamic input (a name, not a number) takes `input_size`, or 640 as Ultralytics exports do
        self.size = tuple(d if isinstance(d, int) else input_size or 640 for d in dims)[::-1]  # (width, height)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.names = _read_names(path, names, metadata)
        # a fixed batch axis (a number) takes exactly that many tiles a pass; a dynamic one (a name) any number
        self.fixed_batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None
        try:  # one blank run: the outputs' shapes pick the layout, and a model that cannot run fails here, named
            probe = self.session.run(None, {self.input.name: self._blank(self.fixed_batch or 1)})
        except Exception as error:
            raise _unloadable("objects", "model", path, error) from None
        self.keypoint_shape = _keypoint_shape(path, metadata, len(self.names))
        shapes = [output.shape for output in probe]
        self.layout = _layout(layout, shapes, len(self.names), self.keypoint_shape, metadata.get("task", ""))
        self.keypoint_names = (
            _keypoint_names(path, metadata, self.keypoint_shape[0]) if self.layout == "yolov8-pose" else ()
        )
        wanted = [name.strip() for name in classes.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(self.names))
        if unknown:
            raise RecognizerError(f"recognizer 'objects': parameter 'classes' names unknown class(es) {unknown}")
        self.keep = np.array([not wanted or name in wanted for name in self.names])
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_batch = self.fixed_batch or self._dynamic_batch(path, batch)

    def _blank(self, tiles: int) -> np.ndarray:
        return np.zeros((tiles, 3, *self.size[::-1]), np.float32)

    def _dynamic_batch(self, path: Path, batch: int) -> int:
        """`batch` if the model runs a blank pass of 2 tiles into outputs of 2, else 1 with a warning: a batch axis
        declared dynamic can still be fixed inside the graph (a Reshape to batch 1), or ignored by the outputs."""
        if batch == 1:
            return 1
        try:
            follows = all(len(output) == 2 for output in self.session.run(None, {self.input.name: self._blank(2)}))
        except Exception:  # ORT's own exception types: the graph's shapes do not fit a batch of 2
            follows = False
        if not follows:
            log.warning(
                "model %s declares a dynamic batch axis but cannot run 2 tiles in one pass: one at a time", path
            )
            return 1
        return batch

    def _fastestdet(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per grid cell: score = obj^0.6 · max(cls)^0.4, centre = (cell + tanh(offset)) / grid, size = sigmoid(term),
        all relative to the (stretched) input, so relative to the tile."""
        grid = output[0]
        rows, cols = grid.shape[1:]
        classes = grid[5:].reshape(len(self.names), -1)
        ids = classes.argmax(axis=0)
        scores = grid[0].reshape(-1).clip(0, 1) ** 0.6 * classes.max(axis=0).clip(0, 1) ** 0.4
        cells = np.flatnonzero((scores >= self.score_threshold) & self.keep[ids])
        row, col = np.divmod(cells, cols)
        terms = grid[1:5].reshape(4, -1)[:, cells]
        cx, cy = (col + np.tanh(terms[0])) / cols, (row + np.tanh(terms[1])) / rows
        w, h = _sigmoid(terms[2]), _sigmoid(terms[3])
        boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1).astype(np.float64)
        return boxes, scores[cells].astype(np.float64), ids[cells]

    def _yolo(self, output: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows of cx, cy, w, h (input pixels), [obj,] class scores, then the head's own columns, which come back
        as they are; YOLOv8/11 has no obj and stores columns."""
        rows = output[0] if self.layout == "yolov5" else output[0].T
        first = 5 if self.layout == "yolov5" else 4
        classes = rows[:, first : first + len(self.names)]
        ids, scores = classes.argmax(axis=1), classes.max(axis=1)
        if self.layout == "yolov5":
            scores = scores * rows[:, 4]
        keep = np.flatnonzero((scores >= self.score_threshold) & self.keep[ids])
        head = rows[keep, first + len(self.names) :].astype(np.float64)
        return rows[keep, :4].astype(np.float64), scores[keep].astype(np.float64), ids[keep], head

    def _nms(self, boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Indices of the boxes (x, y, w, h) that per-class NMS keeps, best first."""
        kept = cv2.dnn.NMSBoxesBatched(boxes, scores, ids, self.score_threshold, self.nms_threshold)
        return np.asarray(kept, dtype=np.int64).reshape(-1)

    def _rotated_nms(self, obb: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Indices of the oriented boxes that rotated NMS keeps within each class, best first (OpenCV has no batched
        rotated NMS)."""
        kept = []
        for class_id in np.unique(ids):
            members = np.flatnonzero(ids == class_id)
            rects = [((cx, cy), (w, h), angle) for cx, cy, w, h, angle in obb[members].tolist()]
            picked = cv2.dnn.NMSBoxesRotated(rects, scores[members].tolist(), self.score_threshold, self.nms_threshold)
            kept.extend(members[np.asarray(picked, dtype=np.int64).reshape(-1)])
        kept = np.array(kept, dtype=np.int64)
        return kept[np.argsort(-scores[kept], kind="stable")]

    def _mask(
        self, coefficients: np.ndarray, protos: np.ndarray, box: np.ndarray, letterbox: Letterbox
    ) -> BaseGeometry | None:
        """An instance mask as Ultralytics' `process_mask_upsample` makes it (sigmoid of the coefficients times the
        prototypes, upsampled bilinearly to the input size, cut to the box, over 0.5), computed on the box's input
        pixels only, then outlined and moved to tile coordinates; None if no pixel is set."""
        channels, mask_height, mask_width = protos.shape
        low = _sigmoid(coefficients @ protos.reshape(channels, -1)).reshape(mask_height, mask_width)
        x, y, w, h = box
        # crop_mask keeps pixel columns c with x1 <= c < x2; the letterbox's padding is no part of the tile
        left, right = max(math.ceil(x), letterbox.left), min(math.ceil(x + w), letterbox.left + letterbox.width)
        top, bottom = max(math.ceil(y), letterbox.top), min(math.ceil(y + h), letterbox.top + letterbox.height)
        if right <= left or bottom <= top:
            return None
        rows = _upsampling(top, bottom, mask_height, self.size[1])
        cols = _upsampling(left, right, mask_width, self.size[0])
        outline = polygons_from_bitmap(rows @ low @ cols.T > 0.5, (left, top))
        return None if outline is None else shapely.transform(outline, letterbox.to_tile)

    def _oriented(
        self, centred: np.ndarray, scores: np.ndarray, ids: np.ndarray, radians: np.ndarray, letterbox: Letterbox
    ) -> Detections:
        """YOLOv8/11-obb: the box columns are the turned box's centre and size, the angle (radians) follows the class
        scores; the detection's box is the axis-aligned hull of its corners."""
        in_tile = np.column_stack([letterbox.to_tile(centred[:, :2]), centred[:, 2:] / letterbox.scale])
        obb = _obb_degrees(in_tile, radians)
        kept = self._rotated_nms(obb, scores, ids)
        corners = obb_corners(obb[kept])
        xyxy = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
        labels = [self.names[i] for i in ids[kept]]
        return Detections(xyxy, scores[kept], labels, obb=obb[kept], class_id=ids[kept])

    def _letterbox(self, tile: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """The tile scaled to fit the input, aspect kept, centred on grey 114 (Ultralytics' pre-processing)."""
        height, width = tile.shape[:2]
        scale = min(self.size[0] / width, self.size[1] / height)
        scaled = cv2.resize(tile, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
        left, top = (self.size[0] - scaled.shape[1]) // 2, (self.size[1] - scaled.shape[0]) // 2
        right, bottom = self.size[0] - scaled.shape[1] - left, self.size[1] - scaled.shape[0] - top
        padded = cv2.copyMakeBorder(scaled, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        return padded, Letterbox(scale, left, top, scaled.shape[1], scaled.shape[0])

    def _prepare(self, tile: np.ndarray) -> tuple[np.ndarray, Letterbox | None]:
        """The tile at the input size: stretched for FastestDet (its boxes are relative to the tile, so no geometry
        to undo), letterboxed for the YOLO layouts."""
        if self.layout == "fastestdet":
            return cv2.resize(tile, self.size, interpolation=cv2.INTER_AREA), None
        return self._letterbox(tile)

    def _forward(self, pictures: list[np.ndarray]) -> list[np.ndarray]:
        """One session run over the pictures stacked as B×3×H×W floats in [0, 1] (RGB but for FastestDet, which takes
        OpenCV's BGR); a fixed batch axis gets a short pass padded with blank tiles.

        Channel by channel into one buffer, not cv2.dnn.blobFromImages: the same values, and blobFromImages slows
        down with the batch (0.5 ms a 352×352 tile alone, 3 ms a tile in a batch of 32; this: 0.5 and 0.7 ms)."""
        blob = np.zeros((max(len(pictures), self.fixed_batch or 0), 3, *self.size[::-1]), np.float32)
        order = (0, 1, 2) if self.layout == "fastestdet" else (2, 1, 0)
        for k, picture in enumerate(pictures):
            for channel, source in enumerate(order):
                np.multiply(picture[..., source], np.float32(1 / 255), out=blob[k, channel], casting="unsafe")
        return self.session.run(None, {self.input.name: blob})

    def recognize_batch(self, tiles: Sequence[np.ndarray]) -> list[Detections]:
        """Each tile's detections, `max_batch` tiles a forward pass; the same as the tiles one at a time, since each
        is brought to the input size on its own and its slice of the outputs decoded alone."""
        found: list[Detections] = []
        for start in range(0, len(tiles), self.max_batch):
            chunk = [_bgr(tile) for tile in tiles[start : start + self.max_batch]]
            prepared = [self._prepare(tile) for tile in chunk]
            outputs = self._forward([picture for picture, _ in prepared])
            for k, (tile, (_, letterbox)) in enumerate(zip(chunk, prepared, strict=True)):
                found.append(self._decode([output[k : k + 1] for output in outputs], tile.shape[1::-1], letterbox))
        return found

    def __call__(self, tile: np.ndarray) -> Detections:
        return self.recognize_batch([tile])[0]

    def _decode(self, outputs: list[np.ndarray], tile_size: tuple[int, int], letterbox: Letterbox | None) -> Detections:
        """One tile's detections from its outputs (batch axis of 1), in the coordinates of a tile of `tile_size`
        (width, height)."""
        if letterbox is None:  # FastestDet: boxes relative to the stretched tile
            boxes, scores, ids = self._fastestdet(outputs[0])
            boxes = boxes * np.tile(tile_size, 2)
            kept = self._nms(boxes, scores, ids)
            return Detections.from_xywh(
                boxes[kept], scores[kept], [self.names[i] for i in ids[kept]], class_id=ids[kept]
            )
        centred, scores, ids, head = self._yolo(outputs[0])
        if self.layout == "yolov8-obb":
            return self._oriented(centred, scores, ids, head[:, 0], letterbox)
        input_boxes = _corner_form(centred)
        boxes = letterbox.boxes_to_tile(input_boxes)
        kept = self._nms(boxes, scores, ids)
        columns: dict[str, Any] = {}
        if self.layout == "yolov8-seg":
            protos = outputs[1][0]
            columns["masks"] = [self._mask(head[i], protos, input_boxes[i], letterbox) for i in kept]
        elif self.layout == "yolov8-pose":
            keypoints = head[kept].reshape(len(kept), *self.keypoint_shape)
            keypoints[..., :2] = letterbox.to_tile(keypoints[..., :2])  # the third column, visibility, stays
            columns.update(keypoints=list(keypoints), keypoint_names=self.keypoint_names)
        labels = [self.names[i] for i in ids[kept]]
        return Detections.from_xywh(boxes[kept], scores[kept], labels, class_id=ids[kept], **columns)


def _identities(params: dict[str, Any]) -> Any:
    """The identities stage (`faces`, imported on use: it needs dlib only where faces are identified)."""
    from pipeline.recognizers.faces import FaceIdentities

    return FaceIdentities(params)


def _identities_wanted(params: Mapping[str, Any]) -> bool:
    """A job runs it when it names a gallery or asks for its faces' embeddings."""
    return bool(params.get("identify") or params.get("embeddings"))


register(
    RecognizerSpec(
        "faces-dnn",
        YuNetFaces,
        {
            "model": "",
            "score_threshold": 0.7,
            "nms_threshold": 0.3,
            "top_k": 5000,
            # identities (docs/faces.md): the second stage runs when a job names a gallery (or asks for embeddings)
            "identify": "",
            "identity_threshold": None,  # a similarity; null: the embedder's own (dlib 0.4, sface 0.363)
            "identity_repeats": False,
            "embedder": "dlib",
            "face_model": "",
            "min_face": 32,
            "embeddings": False,
        },
        f"faces with 5 landmarks, YuNet CNN (model: {YUNET_FILE}); identify=GALLERY names them",
        cost_ms=47,  # a 640x640 tile on one thread (YuNet net + OpenCV's post-processing)
        file_params=("model", "face_model"),
        second_stage=_identities,
        stage_by_default=_identities_wanted,
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
            # tiles a forward pass where the model's batch axis is dynamic: 1 by default, since on CPUs batches are
            # no faster (docs/performance.md); a GPU job sends 8-32
            "batch": 1,
        },
        f"objects (80 COCO classes), ONNX Runtime: FastestDet, YOLOv5, YOLOv8/11 exports of detect, segment, obb or "
        f"pose (model: {OBJECTS_FILE})",
        cost_ms=14,  # a 640x640 tile on one thread with FastestDet (a YOLO model costs several times more)
        file_params=("model", "names"),
    )
)
