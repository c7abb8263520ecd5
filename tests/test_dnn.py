"""The neural recognizers: real models on real pictures, in process and through a real worker, and the YOLO
decoders on tiny constant ONNX models whose boxes are known."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import shapely
from onnx import TensorProto, helper, numpy_helper

from bench.batching import detector_model, tiles
from pipeline import recognize_image, recognizers
from pipeline.model import Detections
from pipeline.recognizers import RecognizerError, dnn, get_recognizer, limit_threads, thread_budget
from pipeline.recognizers.dnn import (
    COCO_KEYPOINTS,
    OBJECTS_FILE,
    YUNET_FILE,
    YUNET_KEYPOINTS,
    configure_models,
    model_file,
)
from pipeline.scenes.codes import Scene, Truth, iou_xywh
from pipeline.scenes.photos import ASTRONAUT_FACE, ASTRONAUT_PERSON, Picture, clock, photo_scene
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
    assert "points" not in face and len(face["keypoints"]) == 5
    assert all(x <= px <= x + w and y <= py <= y + h and score == face["score"] for px, py, score in face["keypoints"])
    # the subject's right eye and mouth corner, on the picture's left (YuNet's order: YUNET_KEYPOINTS)
    right_eye, left_eye, nose, right_mouth, left_mouth = face["keypoints"]
    assert right_eye[0] < nose[0] < left_eye[0] and right_mouth[0] < left_mouth[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < min(right_mouth[1], left_mouth[1])
    grey = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    found = get_recognizer("faces-dnn", {"model": yunet})(grey)
    assert len(found) == 1 and found.keypoint_names == YUNET_KEYPOINTS


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
    assert all(len(d["keypoints"]) == 5 for d in result["detections"])
    assert result["keypoint_names"] == list(YUNET_KEYPOINTS)


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
    monkeypatch.setattr(dnn, "_places", dnn._places)  # this process's, restored after
    configure_models(str(tmp_path), {"TILEREC_YUNET_MODEL": str(tmp_path / "from-env.onnx")})

    def find(value: str) -> Path:
        return model_file("faces-dnn", "model", value, "TILEREC_YUNET_MODEL", YUNET_FILE)

    assert find(str(tmp_path / "given.onnx")) == tmp_path / "given.onnx"
    assert find("") == tmp_path / "from-env.onnx"
    configure_models(str(tmp_path))
    assert find("") == tmp_path / YUNET_FILE
    configure_models()
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


def constant_model(
    path: Path,
    outputs: np.ndarray | list[np.ndarray],
    input_shape: list,
    names: list[str] | None = None,
    **metadata: str,
) -> str:
    """An ONNX model that ignores its image and always outputs `outputs` (output0, output1, ...): the decoder's
    input, known exactly; `names` and `metadata` (task, kpt_shape, ...) as Ultralytics writes them."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    nodes = [
        helper.make_node("Constant", [], [f"output{i}"], value=numpy_helper.from_array(output.astype(np.float32)))
        for i, output in enumerate(outputs)
    ]
    graph = helper.make_graph(
        nodes,
        "constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(f"output{i}", TensorProto.FLOAT, list(o.shape)) for i, o in enumerate(outputs)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by older ONNX Runtime releases too
    properties = {"names": repr(dict(enumerate(names)))} if names else {}  # as Ultralytics writes it
    if properties or metadata:
        helper.set_model_props(model, {**properties, **metadata})
    onnx.save(model, str(path))
    return str(path)


def test_yolov8_output_is_decoded_to_known_boxes(tmp_path):
    rows = np.array([[*box, *classes] for box, _, classes in ROWS])
    # dynamic input size, names in the metadata, layout detected from the 1x(4+C)xN shape
    model = constant_model(tmp_path / "v8.onnx", rows.T[None], ["batch", 3, "height", "width"], NAMES)
    detector = get_recognizer("objects", {"model": model, "input_size": 320, "score_threshold": 0.25})
    assert detector.layout == "yolov8"
    records = detector(TILE).to_records()
    assert [(r["label"], r["score"], r["class_id"]) for r in records] == [
        ("dog", 0.95, 1),
        ("cat", 0.9, 0),
        ("kite", 0.85, 2),
    ]
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


# --- YOLOv8/11 segment, obb and pose heads, decoded from constant models ------------------------------------------

# an 800x600 tile letterboxed into a 640x640 input: scale min(640/800, 640/600) = 0.8, so 640x480 of picture,
# centred: (640 - 480) // 2 = 80 px of padding above, none at the left
BIG_TILE = np.zeros((600, 800, 3), dtype=np.uint8)
SCALE, LEFT, TOP = 0.8, 0, 80


def in_tile(x: float, y: float) -> tuple[float, float]:
    """An input pixel position in the tile, undoing the letterbox above."""
    return (x - LEFT) / SCALE, (y - TOP) / SCALE


def tile_polygon(geometry: shapely.Geometry) -> shapely.Geometry:
    """An input-pixel shape in tile pixels."""
    return shapely.transform(geometry, lambda xy: (xy - [LEFT, TOP]) / SCALE)


def columns(*rows: list[float]) -> np.ndarray:
    """Candidate rows as a YOLOv8/11 output: 1 x channels x candidates."""
    return np.array(rows, dtype=np.float32).T[None]


def test_yolov8_seg_masks_are_prototype_masks_cut_to_the_box_in_tile_coordinates(tmp_path):
    # prototypes at a quarter of the input (160x160); a prototype pixel (i, j) covers input pixels 4j..4j+4
    centres = (np.arange(160) + 0.5) * 4
    x, y = np.meshgrid(centres, centres)
    protos = np.zeros((1, 32, 160, 160), dtype=np.float32)
    distance = np.hypot(x - 320, y - 300)
    protos[0, 0] = np.where((distance >= 40) & (distance <= 100), 8, -8)  # a disc of radius 100 with a hole of 40
    protos[0, 1] = np.where((x > 400) & (x < 480) & (y > 160) & (y < 240), 8, -8)  # the square [400, 480)x[160, 240)
    disc, square = np.eye(32)[0], np.eye(32)[1]
    output = columns(
        [290, 300, 220, 200, 0, 0, 0.9, *disc],  # a kite, its box x 180..400, y 200..400 cutting the disc's right
        [291, 301, 220, 200, 0, 0, 0.8, *square],  # the same kite, weaker: NMS drops it
        [440, 200, 120, 120, 0.85, 0, 0, *square],  # a cat, its box around the square
        [100, 500, 50, 50, 0.1, 0, 0, *disc],  # below the score threshold
    )
    model = constant_model(tmp_path / "seg.onnx", [output, protos], [1, 3, 640, 640], NAMES)
    detector = get_recognizer("objects", {"model": model, "score_threshold": 0.25})
    assert detector.layout == "yolov8-seg", "two outputs, 4+C+32 channels and 32 prototypes"
    found = detector(BIG_TILE)
    assert [(r["label"], r["class_id"]) for r in found.to_records()] == [("kite", 2), ("cat", 0)]
    ring = (
        shapely.Point(320, 300).buffer(100, quad_segs=64).difference(shapely.Point(320, 300).buffer(40, quad_segs=64))
    )
    expected_ring = tile_polygon(ring.intersection(shapely.box(180, 200, 400, 400)))
    mask = found.masks[0]
    assert mask.geom_type == "Polygon" and len(mask.interiors) == 1, "one piece with its hole"
    assert mask.intersection(expected_ring).area / mask.union(expected_ring).area >= 0.9
    assert mask.bounds[2] == pytest.approx(in_tile(400, 0)[0], abs=1), "cut at the box's right edge"
    expected_square = tile_polygon(shapely.box(400, 160, 480, 240))
    assert found.masks[1].intersection(expected_square).area / found.masks[1].union(expected_square).area >= 0.9
    assert found.masks[1].bounds == pytest.approx(expected_square.bounds, abs=1)
    found.check(800, 600)


def test_a_mask_never_reaches_into_the_letterbox_padding(tmp_path):
    protos = np.full((1, 32, 160, 160), 8, dtype=np.float32)  # everything is object
    output = columns([320, 70, 100, 100, 0.9, 0, 0, *np.eye(32)[0]])  # its box reaches 30 px into the top padding
    model = constant_model(tmp_path / "seg.onnx", [output, protos], [1, 3, 640, 640], NAMES, task="segment")
    [mask] = get_recognizer("objects", {"model": model, "score_threshold": 0.25})(BIG_TILE).masks
    assert mask.bounds == pytest.approx((*in_tile(270, TOP), *in_tile(370, 120)), abs=1)


def obb_corners_by_hand(cx: float, cy: float, w: float, h: float, degrees: float) -> np.ndarray:
    """The 4 corners of a box of width w along (cos, sin) of the angle, height h across it, in input pixels."""
    along = np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])
    across = np.array([-along[1], along[0]])
    return np.array(
        [[cx, cy] + a * w / 2 * along + b * h / 2 * across for a, b in [(-1, -1), (1, -1), (1, 1), (-1, 1)]]
    )


def assert_same_corners(found: list[list[float]], expected: np.ndarray) -> None:
    """The same 4 points within 1 px, in any order."""
    for corner in expected:
        assert min(np.hypot(*(np.array(f) - corner)) for f in found) <= 1, (found, expected)


def test_yolov8_obb_boxes_are_turned_boxes_in_tile_coordinates(tmp_path):
    output = columns(
        [320, 300, 200, 80, 0, 0.9, 0, np.pi / 6],  # a dog turned 30° clockwise
        [322, 301, 200, 80, 0, 0.8, 0, np.radians(32)],  # the same dog, weaker: rotated NMS drops it
        [320, 300, 60, 160, 0, 0, 0.85, 2 * np.pi / 3],  # a kite on it, 120°: the same as 160x60 at 30°
        [480, 450, 50, 50, 0.1, 0, 0, 0],  # below the score threshold
    )
    model = constant_model(tmp_path / "obb.onnx", output, [1, 3, 640, 640], NAMES)
    detector = get_recognizer("objects", {"model": model, "score_threshold": 0.25})
    assert detector.layout == "yolov8-obb", "4+C+1 channels, the angle last"
    records = detector(BIG_TILE).to_records()
    assert [(r["label"], r["class_id"]) for r in records] == [("dog", 1), ("kite", 2)]
    centre = in_tile(320, 300)
    for record, (w, h) in zip(records, [(200, 80), (160, 60)], strict=True):
        corners = np.array([in_tile(*corner) for corner in obb_corners_by_hand(320, 300, w, h, 30)])
        assert_same_corners(record["obb"]["corners"], corners)
        assert record["obb"]["center"] == pytest.approx(centre, abs=0.01)
        assert record["obb"]["size"] == pytest.approx([w / SCALE, h / SCALE], abs=0.01)
        assert record["obb"]["angle"] == pytest.approx(30, abs=0.01)
        x1, y1 = corners.min(axis=0)
        x2, y2 = corners.max(axis=0)
        assert record["box"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1), "the corners' upright hull"


def person_keypoints(k: int) -> tuple[float, float, float]:
    """Keypoint k of the test person in input pixels, with its visibility."""
    return 260 + 5 * k, 200 + 12 * k, 0.5 + k / 40


def test_yolov8_pose_keypoints_come_in_tile_coordinates_with_coco_names(tmp_path):
    keypoints = [value for k in range(17) for value in person_keypoints(k)]
    output = columns(
        [300, 320, 120, 300, 0.9, *keypoints],
        [302, 321, 120, 300, 0.7, *keypoints],  # the same person, weaker: NMS drops it
        [500, 320, 100, 300, 0.2, *keypoints],  # below the score threshold
    )
    # no metadata but the class names: one class and 51 more channels make COCO's 17 keypoints
    model = constant_model(tmp_path / "pose.onnx", output, [1, 3, 640, 640], ["person"])
    detector = get_recognizer("objects", {"model": model, "score_threshold": 0.25})
    assert detector.layout == "yolov8-pose"
    found = detector(BIG_TILE)
    assert found.keypoint_names == COCO_KEYPOINTS and COCO_KEYPOINTS[:3] == ("nose", "left_eye", "right_eye")
    [record] = found.to_records()
    assert record["label"] == "person" and record["class_id"] == 0
    assert record["box"] == pytest.approx([*in_tile(240, 170), 120 / SCALE, 300 / SCALE], abs=0.01)
    for k, (x, y, visibility) in enumerate(record["keypoints"]):
        kx, ky, kv = person_keypoints(k)
        assert np.hypot(x - in_tile(kx, ky)[0], y - in_tile(kx, ky)[1]) <= 1
        assert visibility == pytest.approx(kv, abs=1e-4), "visibility as exported"


def test_pose_keypoints_follow_the_kpt_shape_and_kpt_names_metadata(tmp_path):
    def decoded(name: str, values: int, **metadata: str) -> Detections:
        keypoints = [v for k in range(4) for v in person_keypoints(k)[:values]]
        output = columns([300, 320, 120, 300, 0, 0.9, 0, *keypoints])
        model = constant_model(tmp_path / name, output, [1, 3, 640, 640], NAMES, task="pose", **metadata)
        return get_recognizer("objects", {"model": model, "score_threshold": 0.25})(BIG_TILE)

    plain = decoded("plain.onnx", 3, kpt_shape="[4, 3]")
    assert plain.keypoint_names == ("kp0", "kp1", "kp2", "kp3") and len(plain.keypoints[0]) == 4
    assert decoded("named.onnx", 3, kpt_names=repr({0: list("abcd")})).keypoint_names == tuple("abcd")
    [without_visibility] = decoded("xy.onnx", 2, kpt_shape="[4, 2]").keypoints  # x, y only, as tiger-pose
    expected = [[*in_tile(*person_keypoints(k)[:2]), 1.0] for k in range(4)]
    assert np.allclose(without_visibility, expected, atol=0.01), "visibility 1 where the model gives none"


def test_the_task_metadata_picks_the_head_and_a_shape_that_fits_none_is_named(tmp_path):
    output = columns([320, 300, 200, 80, 0, 0.9, 0, 0.5])  # 8 channels: an obb head with 3 classes
    model = constant_model(tmp_path / "obb.onnx", output, [1, 3, 640, 640], NAMES, task="obb")
    assert get_recognizer("objects", {"model": model}).layout == "yolov8-obb"
    mislabelled = constant_model(tmp_path / "seg.onnx", output, [1, 3, 640, 640], NAMES, task="segment")
    picked = r"layout 'yolov8-seg' \(from the model's 'task' metadata 'segment'\) with 3 classes"
    with pytest.raises(RecognizerError, match=r"output shape \(1, 8, 1\) does not fit " + picked):
        get_recognizer("objects", {"model": mislabelled})
    odd = constant_model(
        tmp_path / "odd.onnx", columns([320, 300, 200, 80, 0, 0.9, 0, 1, 2, 3, 4, 5]), [1, 3, 64, 64], NAMES
    )
    with pytest.raises(RecognizerError, match=r"output shape \(1, 12, 1\) does not fit layout 'auto' with 3 classes"):
        get_recognizer("objects", {"model": odd})


# --- forward passes of several tiles, on models with a batch axis of their own -----------------------------------

# full tiles and the edge tiles of a grid (narrower, shorter, tiny), one of them grey
PASS_TILES = [
    *tiles(3, 640, 640, seed=1),
    *tiles(1, 200, 640, seed=2),
    *tiles(1, 640, 97, seed=3),
    *tiles(1, 53, 31, seed=4),
    cv2.cvtColor(tiles(1, 480, 333, seed=5)[0], cv2.COLOR_BGR2GRAY),
    *tiles(2, 640, 640, seed=6),
]  # 9 tiles: passes of 4, 4 and 1


def forward_passes(detector: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tiles of each `session.run` the detector makes from now on (the input's batch axis)."""
    passes: list[int] = []
    run = detector.session.run

    def counted(names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        passes.append(len(next(iter(feeds.values()))))
        return run(names, feeds)

    monkeypatch.setattr(detector.session, "run", counted)
    return passes


def assert_same_detections(found: list[Detections], expected: list[Detections]) -> None:
    """Tile by tile: the same labels and class ids in the same order, boxes within 1e-4 px, the same scores."""
    assert len(found) == len(expected)
    for one, other in zip(found, expected, strict=True):
        assert list(one.labels) == list(other.labels)
        assert np.array_equal(one.class_id, other.class_id)
        np.testing.assert_allclose(one.xyxy, other.xyxy, rtol=0, atol=1e-4)
        np.testing.assert_allclose(one.scores, other.scores, rtol=0, atol=1e-6)
        for mask, same in zip(one.masks, other.masks, strict=True):
            assert (mask is None) == (same is None)
            assert mask is None or mask.symmetric_difference(same).area <= 1e-6 * max(mask.area, 1)


@pytest.mark.parametrize(("head", "threshold"), [("yolov8", 0.5), ("yolov8-seg", 0.5), ("fastestdet", 0.4)])
def test_a_dynamic_batch_axis_runs_batch_tiles_a_pass_with_the_detections_of_one_at_a_time(
    head, threshold, tmp_path, monkeypatch
):
    model = detector_model(tmp_path / f"{head}.onnx", head=head)
    detector = get_recognizer("objects", {"model": model, "score_threshold": threshold, "batch": 4})
    assert (detector.layout, detector.max_batch) == (head, 4)
    passes = forward_passes(detector, monkeypatch)
    alone = [detector(tile) for tile in PASS_TILES]
    assert passes == [1] * len(PASS_TILES), "a tile on its own is a pass of one"
    assert sum(map(len, alone)) >= 20 and len({len(found) for found in alone}) > 2, "detections follow the tiles"
    passes.clear()
    assert_same_detections(detector.recognize_batch(PASS_TILES), alone)
    assert passes == [4, 4, 1], "one session run a pass"
    if head == "yolov8-seg":
        assert sum(mask is not None for found in alone for mask in found.masks) >= 20, "masks compared too"

    one_at_a_time = get_recognizer("objects", {"model": model, "score_threshold": threshold, "batch": 1})
    assert one_at_a_time.max_batch == 1
    passes = forward_passes(one_at_a_time, monkeypatch)
    assert_same_detections(one_at_a_time.recognize_batch(PASS_TILES), alone)
    assert passes == [1] * len(PASS_TILES)


def test_the_pipeline_gives_the_same_detections_in_passes_of_eight_as_one_at_a_time(tmp_path, monkeypatch):
    model = detector_model(tmp_path / "v8.onnx")
    image = tiles(1, 1900, 1300, seed=7)[0]
    assert len(grid(1300, 1900)) == 12, "4 x 3 tiles (sizes that differ within a pass: the test above)"
    passes = forward_passes(
        get_recognizer("objects", {"model": model, "score_threshold": 0.5, "batch": 8}), monkeypatch
    )
    batched = recognize_image(image, "objects", model=model, score_threshold=0.5, batch=8).detections
    assert passes == [8, 4], "passes of 8"
    alone = recognize_image(image, "objects", model=model, score_threshold=0.5, batch=1).detections
    assert len(batched) >= 20
    assert_same_detections([batched], [alone])


def test_a_fixed_batch_axis_sets_the_tiles_a_pass_and_a_short_pass_is_padded(tmp_path, monkeypatch):
    dynamic = get_recognizer("objects", {"model": detector_model(tmp_path / "any.onnx"), "score_threshold": 0.5})
    batching = get_recognizer(
        "objects", {"model": detector_model(tmp_path / "any.onnx"), "score_threshold": 0.5, "batch": 8}
    )
    fixed = get_recognizer(
        "objects", {"model": detector_model(tmp_path / "four.onnx", batch=4), "score_threshold": 0.5, "batch": 2}
    )
    assert (dynamic.max_batch, batching.max_batch, fixed.max_batch) == (1, 8, 4), "default 1; asked 8; the model's 4"
    passes = forward_passes(fixed, monkeypatch)
    found = fixed.recognize_batch(PASS_TILES[:6])
    assert passes == [4, 4], "6 tiles: a full pass, then 2 tiles and 2 blank ones"
    assert_same_detections(found, [dynamic(tile) for tile in PASS_TILES[:6]])
    assert_same_detections([fixed(PASS_TILES[6])], [dynamic(PASS_TILES[6])])
    assert passes[-1] == 4


def test_models_that_cannot_run_two_tiles_at_once_run_one(fastestdet, tmp_path, monkeypatch, caplog):
    shared = get_recognizer("objects", {"model": fastestdet})
    assert shared.max_batch == 1, "FastestDet's input is 1x3x352x352, its graph hard-codes the 1"
    passes = forward_passes(shared, monkeypatch)
    assert_same_detections(shared.recognize_batch(PASS_TILES[:3]), [shared(tile) for tile in PASS_TILES[:3]])
    assert passes == [1] * 6

    declared = onnx.load(detector_model(tmp_path / "declared.onnx"))
    [rows] = [tensor for tensor in declared.graph.initializer if tensor.name == "rows"]
    rows.CopyFrom(numpy_helper.from_array(np.array([1, 7, -1], np.int64), "rows"))  # a Reshape to batch 1
    onnx.save(declared, str(tmp_path / "declared.onnx"))
    with caplog.at_level("WARNING", logger="pipeline.recognizers.dnn"):
        reshaped = get_recognizer(
            "objects", {"model": str(tmp_path / "declared.onnx"), "score_threshold": 0.5, "batch": 8}
        )
    assert reshaped.max_batch == 1 and len(reshaped(PASS_TILES[0])) > 0
    assert [r.getMessage() for r in caplog.records] == [
        f"model {tmp_path / 'declared.onnx'} declares a dynamic batch axis but cannot run 2 tiles in one pass: "
        "one at a time"
    ]

    rows = np.array([[*box, *classes] for box, _, classes in ROWS])
    constant = constant_model(tmp_path / "v8.onnx", rows.T[None], ["batch", 3, "height", "width"], NAMES)
    assert get_recognizer("objects", {"model": constant, "input_size": 320}).max_batch == 1, "outputs ignore it"
    with pytest.raises(RecognizerError, match="parameter 'batch' must be at least 1, got 0"):
        get_recognizer("objects", {"model": constant, "batch": 0})
