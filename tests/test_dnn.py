"""The neural recognizers: real models on real pictures, in process and through a real worker, and the YOLO
decoders on tiny constant ONNX models whose boxes are known."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import recognize_image, recognizers
from pipeline.model import Detections
from pipeline.photo_scenes import ASTRONAUT_FACE, ASTRONAUT_PERSON, Picture, clock, photo_scene
from pipeline.recognizers import RecognizerError, get_recognizer, limit_threads, thread_budget
from pipeline.recognizers.dnn import OBJECTS_FILE, YUNET_FILE, model_file
from pipeline.scenes import Scene, Truth, iou_xywh
from pipeline.tiling import Window, grid
from tasks import recognize

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("TILEREC_MODEL_DIR") or REPO.parent / "shared" / "models")
ASTRONAUT = REPO.parent / "shared" / "images" / "astronaut.png"
TIMEOUT = 120


def need(path: Path) -> Path:
    """The file, else a skip that names it; in CI (CI=true), where ../shared is always there, a failure."""
    if not path.is_file():
        message = f"{path} is missing (set TILEREC_MODEL_DIR, or put shared/ beside the repo)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def yunet() -> str:
    return str(need(MODEL_DIR / YUNET_FILE))


@pytest.fixture(scope="module")
def fastestdet() -> str:
    return str(need(MODEL_DIR / OBJECTS_FILE))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return cv2.imread(str(need(ASTRONAUT)))


def assert_each_once(found: Detections, truths: list[Truth], min_iou: float) -> None:
    """Each truth reported exactly once, with a box at least `min_iou` on it, and nothing else reported."""
    records = found.to_records()
    matched = set()
    for truth in truths:
        hits = [k for k, r in enumerate(records) if r["label"] == truth.label and iou_xywh(r["box"], truth.box) > 0.3]
        assert len(hits) == 1, (truth, [records[k] for k in hits])
        assert iou_xywh(records[hits[0]]["box"], truth.box) >= min_iou, (truth, records[hits[0]])
        matched.add(hits[0])
    assert [r for k, r in enumerate(records) if k not in matched] == [], "nothing but the pasted objects"


def count_found(detections: Detections, truths: list[Truth]) -> int:
    """How many of the truths some detection of the same label overlaps."""
    records = detections.to_records()
    return sum(any(r["label"] == t.label and iou_xywh(r["box"], t.box) > 0.3 for r in records) for t in truths)


def seam_crossers(truths: list[Truth], width: int, height: int) -> int:
    """How many objects a tile border runs through (each is still whole in another tile)."""

    def cut(window: Window, x: float, y: float, w: float, h: float) -> bool:
        meets = window.x < x + w and x < window.x2 and window.y < y + h and y < window.y2
        return meets and not (window.x <= x and x + w <= window.x2 and window.y <= y and y + h <= window.y2)

    windows = grid(height, width, 640, 0.2)
    return sum(any(cut(window, *truth.box) for window in windows) for truth in truths)


def one_pass(image: np.ndarray, recognizer: str, side: int, **params: object) -> Detections:
    """The whole image shrunk to the model's input size and recognized at once, boxes back in image pixels."""
    scale = side / max(image.shape[:2])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    small_found = get_recognizer(recognizer, params)(small)
    return Detections(small_found.xyxy / scale, small_found.scores, small_found.labels)


# --- faces-dnn (YuNet) ---------------------------------------------------------------------------------------------


def test_faces_dnn_finds_the_astronaut_face_and_its_landmarks(yunet, astronaut):
    [face] = get_recognizer("faces-dnn", {"model": yunet})(astronaut).to_records()
    assert face["label"] == "face" and face["score"] > 0.9
    assert max(abs(a - b) for a, b in zip(face["box"], ASTRONAUT_FACE, strict=True)) <= 2
    x, y, w, h = face["box"]
    assert len(face["points"]) == 5 and all(x <= px <= x + w and y <= py <= y + h for px, py in face["points"])
    (right_eye, left_eye), mouth = face["points"][:2], face["points"][3:]
    assert right_eye[0] < left_eye[0] and max(right_eye[1], left_eye[1]) < min(m[1] for m in mouth)
    grey = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    assert len(get_recognizer("faces-dnn", {"model": yunet})(grey)) == 1


@pytest.fixture(scope="module")
def face_scene(astronaut) -> Scene:
    return photo_scene([Picture(astronaut, ASTRONAUT_FACE, "face")], 4000, 3000, 10, (0.35, 0.5, 0.7), seed=2)


def test_faces_dnn_finds_every_pasted_face_once_and_one_pass_misses_most(yunet, face_scene):
    assert seam_crossers(face_scene.truths, 4000, 3000) >= 5
    tiled = recognize_image(face_scene.image, "faces-dnn", model=yunet)
    assert_each_once(tiled.detections, face_scene.truths, min_iou=0.75)
    whole = one_pass(face_scene.image, "faces-dnn", 640, model=yunet)  # YuNet's 640x640 input
    assert count_found(whole, face_scene.truths) <= 3, "shrunk to 640 px, most faces are too small for YuNet"


def test_faces_dnn_through_a_worker(worker, yunet, face_scene, images_root):
    path = images_root / "faces-photo-scene.png"
    cv2.imwrite(str(path), face_scene.image)
    result = recognize.delay(str(path), "faces-dnn", model=yunet).get(timeout=TIMEOUT)
    assert result["failed_tiles"] == [] and result["tiling"]["tiles"] == len(grid(3000, 4000))
    assert_each_once(Detections.from_records(result["detections"]), face_scene.truths, min_iou=0.75)
    assert all(len(d["points"]) == 5 for d in result["detections"])


# --- objects (FastestDet through ONNX Runtime) ---------------------------------------------------------------------


def test_objects_finds_the_astronaut_as_a_person(fastestdet, astronaut):
    [person] = get_recognizer("objects", {"model": fastestdet})(astronaut).to_records()
    assert person["label"] == "person" and person["score"] > 0.8
    assert iou_xywh(person["box"], ASTRONAUT_PERSON) > 0.95
    only_clocks = get_recognizer("objects", {"model": fastestdet, "classes": "clock"})
    assert len(only_clocks(astronaut)) == 0
    with pytest.raises(RecognizerError, match=r"unknown class\(es\) \['unicorn'\]"):
        get_recognizer("objects", {"model": fastestdet, "classes": "person,unicorn"})


@pytest.fixture(scope="module")
def object_scene(astronaut) -> Scene:
    # the astronaut cropped to the person's box, at a size FastestDet calls "person"; drawn clocks across seams
    person = Picture(astronaut[:, :400], ASTRONAUT_PERSON, "person")
    return photo_scene([person, clock(400)], 4000, 3000, 10, (0.5, 0.25), seam_share=0.5, seed=3)


def test_objects_finds_every_pasted_object_once_and_one_pass_misses_them(fastestdet, object_scene):
    assert seam_crossers(object_scene.truths, 4000, 3000) >= 5
    tiled = recognize_image(object_scene.image, "objects", model=fastestdet)
    assert_each_once(tiled.detections, object_scene.truths, min_iou=0.7)
    whole = one_pass(object_scene.image, "objects", 352, model=fastestdet)  # FastestDet's 352x352 input
    assert count_found(whole, object_scene.truths) <= 2, "shrunk to 352 px, the objects are too small for FastestDet"


def test_objects_through_a_worker(worker, fastestdet, object_scene, images_root):
    path = images_root / "objects-photo-scene.png"
    cv2.imwrite(str(path), object_scene.image)
    result = recognize.delay(str(path), "objects", model=fastestdet).get(timeout=TIMEOUT)
    assert result["failed_tiles"] == []
    assert_each_once(Detections.from_records(result["detections"]), object_scene.truths, min_iou=0.7)


def test_ort_sessions_follow_the_thread_budget(fastestdet, monkeypatch):
    monkeypatch.setattr(recognizers, "_thread_budget", thread_budget())
    opencv_threads = cv2.getNumThreads()
    try:
        limit_threads(1)
        session = get_recognizer("objects", {"model": fastestdet, "nms_threshold": 0.449}).session
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        cv2.setNumThreads(opencv_threads)


# --- model files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recognizer", ["faces-dnn", "objects"])
def test_a_missing_or_corrupt_model_is_named_with_its_parameter(recognizer, tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(RecognizerError, match=rf"'{recognizer}': model file {missing} \(from parameter 'model'\)"):
        get_recognizer(recognizer, {"model": str(missing)})
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a network" * 50)
    with pytest.raises(RecognizerError) as raised:
        get_recognizer(recognizer, {"model": str(corrupt)})
    assert f"model file {corrupt} (parameter 'model') is not a usable ONNX model" in str(raised.value)
    assert raised.value.__suppress_context__, "no chained trace from inside OpenCV or ONNX Runtime"


def test_the_model_comes_from_the_parameter_then_the_env_then_the_model_dir(tmp_path, monkeypatch):
    for name in ("given.onnx", "from-env.onnx", YUNET_FILE):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("TILEREC_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("TILEREC_YUNET_MODEL", str(tmp_path / "from-env.onnx"))

    def find(value: str) -> Path:
        return model_file("faces-dnn", "model", value, "TILEREC_YUNET_MODEL", YUNET_FILE)

    assert find(str(tmp_path / "given.onnx")) == tmp_path / "given.onnx"
    assert find("") == tmp_path / "from-env.onnx"
    monkeypatch.delenv("TILEREC_YUNET_MODEL")
    assert find("") == tmp_path / YUNET_FILE
    monkeypatch.delenv("TILEREC_MODEL_DIR")
    with pytest.raises(RecognizerError, match="set parameter 'model', or env TILEREC_YUNET_MODEL to the file"):
        find("")


# --- YOLO layouts, decoded from constant models -------------------------------------------------------------------

NAMES = ["cat", "dog", "kite"]
# input-pixel boxes (cx, cy, w, h) of a 320x320 model, with (objectness, class scores)
ROWS = [
    ((100, 140, 40, 60), 0.9, (0.0, 0.95, 0.0)),  # dog: kept
    ((102, 141, 40, 60), 0.9, (0.0, 0.90, 0.0)),  # the same dog, weaker: NMS drops it
    ((104, 142, 40, 60), 0.9, (0.0, 0.0, 0.85)),  # a kite on it: another class, kept
    ((250, 200, 30, 30), 0.3, (0.9, 0.0, 0.0)),  # a cat with low objectness: v5 drops it (0.27), v8 keeps it
]
# a 640x480 tile letterboxed into 320x320: scale 0.5, 40 px of padding above
TILE = np.zeros((480, 640, 3), dtype=np.uint8)


def tile_box(cx: float, cy: float, w: float, h: float) -> list[float]:
    return [(cx - w / 2) / 0.5, (cy - h / 2 - 40) / 0.5, w / 0.5, h / 0.5]


def constant_model(path: Path, output: np.ndarray, input_shape: list, names: list[str] | None = None) -> str:
    """An ONNX model that ignores its image and always outputs `output`: the decoder's input, known exactly."""
    node = helper.make_node("Constant", [], ["output0"], value=numpy_helper.from_array(output.astype(np.float32)))
    graph = helper.make_graph(
        [node],
        "constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by older ONNX Runtime releases too
    if names:
        helper.set_model_props(model, {"names": repr(dict(enumerate(names)))})  # as Ultralytics writes it
    onnx.save(model, str(path))
    return str(path)


def test_yolov8_output_is_decoded_to_known_boxes(tmp_path):
    rows = np.array([[*box, *classes] for box, _, classes in ROWS])
    # dynamic input size, names in the metadata, layout detected from the 1x(4+C)xN shape
    model = constant_model(tmp_path / "v8.onnx", rows.T[None], ["batch", 3, "height", "width"], NAMES)
    detector = get_recognizer("objects", {"model": model, "input_size": 320, "score_threshold": 0.25})
    assert detector.layout == "yolov8"
    records = detector(TILE).to_records()
    assert [(r["label"], r["score"]) for r in records] == [("dog", 0.95), ("cat", 0.9), ("kite", 0.85)]
    for record, (box, _, _) in zip(records, [ROWS[0], ROWS[3], ROWS[2]], strict=True):
        assert record["box"] == pytest.approx(tile_box(*box), abs=0.01)


def test_yolov5_output_is_decoded_with_objectness(tmp_path):
    rows = np.array([[*box, objectness, *classes] for box, objectness, classes in ROWS])
    model = constant_model(tmp_path / "v5.onnx", rows[None], [1, 3, 320, 320])
    names = tmp_path / "three.names"
    names.write_text("\n".join(NAMES) + "\n")
    detector = get_recognizer("objects", {"model": model, "names": str(names), "score_threshold": 0.3})
    assert detector.layout == "yolov5"
    records = detector(TILE).to_records()
    assert [(r["label"], r["score"]) for r in records] == [("dog", 0.855), ("kite", 0.765)]
    assert records[0]["box"] == pytest.approx(tile_box(*ROWS[0][0]), abs=0.01)
    with pytest.raises(RecognizerError, match=r"output shape \(1, 4, 8\) does not fit layout 'yolov8' with 3"):
        get_recognizer("objects", {"model": model, "names": str(names), "layout": "yolov8"})
