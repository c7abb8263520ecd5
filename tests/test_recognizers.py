from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.recognizers import RecognizerError, available, get_recognizer, resolve_params
from pipeline.recognizers.opencv import contrib
from pipeline.scenes.codes import ean13, iou_xywh, qr_code

ASTRONAUT = Path(__file__).resolve().parents[1].parent / "shared" / "images" / "astronaut.png"
# the face in astronaut.png, from ../shared/models/PROVENANCE.md (YuNet's box, x y w h)
ASTRONAUT_FACE = (178, 63, 90, 113)


def canvas(height: int = 480, width: int = 640, value: int = 200) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def paste(image: np.ndarray, picture: np.ndarray, x: int, y: int) -> None:
    if picture.ndim == 2:
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
    image[y : y + picture.shape[0], x : x + picture.shape[1]] = picture


def test_builtins_are_registered_with_their_parameters():
    names = {spec.name: spec for spec in available()}
    assert {"faces", "people", "qrcode", "barcode", "aruco"} <= set(names)
    assert names["faces"].params["min_neighbors"] == 5


def test_qrcode_decodes_payloads_at_known_places():
    image = canvas()
    expected = {}
    for text, (x, y) in {"alpha": (30, 40), "beta-2": (360, 200)}.items():
        picture, (bx, by, bw, bh) = qr_code(text, 4)
        paste(image, picture, x, y)
        expected[text] = (x + bx, y + by, bw, bh)
    found = get_recognizer("qrcode")(image).to_records()
    assert sorted(r["text"] for r in found) == sorted(expected)
    for record in found:
        assert iou_xywh(record["box"], expected[record["text"]]) > 0.9
        assert len(record["points"]) == 4


def test_barcode_decodes_an_ean13():
    image = canvas(value=230)
    picture, (bx, by, bw, bh), digits = ean13("590123412345", 2, 120)
    paste(image, picture, 100, 150)
    found = get_recognizer("barcode")(image).to_records()
    assert [r["text"] for r in found] == [digits]
    assert iou_xywh(found[0]["box"], (100 + bx, 150 + by, bw, bh)) > 0.5


def test_aruco_reports_marker_ids_and_corners():
    image = canvas(value=255)
    dictionary = cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50)
    for marker_id, (x, y) in {7: (50, 50), 23: (400, 250)}.items():
        paste(image, cv2.aruco.generateImageMarker(dictionary, marker_id, 120), x, y)
    found = get_recognizer("aruco")(image).to_records()
    assert sorted(r["text"] for r in found) == ["23", "7"]
    seven = next(r for r in found if r["text"] == "7")
    assert iou_xywh(seven["box"], (50, 50, 120, 120)) > 0.9


@pytest.mark.skipif(not ASTRONAUT.exists(), reason=f"{ASTRONAUT} is missing")
def test_faces_finds_the_astronaut_face():
    found = get_recognizer("faces")(cv2.imread(str(ASTRONAUT))).to_records()
    assert len(found) == 1
    assert iou_xywh(found[0]["box"], ASTRONAUT_FACE) > 0.5
    assert 0 < found[0]["score"] <= 1


def test_people_finds_nothing_on_a_blank_tile_and_skips_tiny_tiles():
    people = get_recognizer("people")
    assert len(people(canvas())) == 0
    assert len(people(canvas(100, 100))) == 0


def test_a_class_opencv_5_moved_to_its_contrib_package_is_asked_for_by_package_name():
    asked = r"no cv2\.NoSuchDetector: .* pip install 'opencv-contrib-python-headless=="
    with pytest.raises(RecognizerError, match=asked):
        contrib("NoSuchDetector")
    assert contrib("QRCodeDetector") is cv2.QRCodeDetector


def test_recognizers_accept_grey_tiles():
    picture, _ = qr_code("grey", 4)
    image = np.full((300, 300), 255, dtype=np.uint8)
    image[20 : 20 + picture.shape[0], 20 : 20 + picture.shape[1]] = picture
    assert [r["text"] for r in get_recognizer("qrcode")(image).to_records()] == ["grey"]
    assert len(get_recognizer("faces")(image)) == 0


def test_recognizers_are_built_once_per_parameter_set():
    assert get_recognizer("faces") is get_recognizer("faces", {"min_neighbors": 5})
    assert get_recognizer("faces") is not get_recognizer("faces", {"min_neighbors": 3})


def test_parameters_are_checked():
    assert resolve_params("faces", {"min_size": 30.0}) == {"scale_factor": 1.1, "min_neighbors": 5, "min_size": 30}
    with pytest.raises(RecognizerError, match="has no parameter"):
        resolve_params("faces", {"colour": "red"})
    # a parameter another recognizer takes says which: naming people needs the detector with landmarks
    with pytest.raises(
        RecognizerError, match=r"no parameter\(s\) identify; .* \(identify is a parameter of faces-dnn\)$"
    ):
        resolve_params("faces", {"identify": "family"})
    with pytest.raises(RecognizerError, match="'min_neighbors' must be int"):
        resolve_params("faces", {"min_neighbors": "five"})
    with pytest.raises(RecognizerError, match="unknown recognizer 'cats'; available: aruco"):
        resolve_params("cats")
    with pytest.raises(RecognizerError, match="unknown ArUco dictionary"):
        get_recognizer("aruco", {"dictionary": "DICT_NOPE"})


@pytest.mark.skipif(not ASTRONAUT.exists(), reason=f"{ASTRONAUT} is missing")
@pytest.mark.parametrize("name", sorted(spec.name for spec in available() if spec.grey))
def test_grey_recognizers_find_the_same_on_the_grey_tiles_the_store_keeps(name):
    """Tiles of grey recognizers are stored grey (pipeline.inference.compact): nothing may change but the bytes."""
    from pipeline.scenes.codes import code_scene

    scene = code_scene(1200, 900, seed=3, per_megapixel=8).image
    photo = cv2.imread(str(ASTRONAUT))
    scene[: photo.shape[0], : photo.shape[1]] = photo
    assert scene.ndim == 3
    recognizer = get_recognizer(name)
    in_colour = recognizer(scene).to_records()
    assert in_colour, f"the scene should hold something {name} finds"
    assert recognizer(cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)).to_records() == in_colour
