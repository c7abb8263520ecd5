"""Identities of faces in one process: alignment and embedding of real photos, one-to-one matching, grouping.

The photos: ../shared/images/people (one person in obama*.jpg, one of them partly hidden; another in biden.jpg).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.inference import recognize_image
from pipeline.model import Detections
from pipeline.recognizers import faces
from tests.conftest import once_per_run

PEOPLE = Path(__file__).resolve().parents[2] / "shared" / "images" / "people"
SAME = ("obama2", "obama3", "obama_partial_face")


def photo(name: str) -> np.ndarray:
    image = cv2.imread(str(PEOPLE / f"{name}.jpg"))
    assert image is not None, f"missing test photo {PEOPLE / name}.jpg"
    return image


def only_face(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    found = recognize_image(image, "faces-dnn").detections
    assert len(found) == 1, f"expected one face, found {len(found)}"
    return found.xyxy[0], found.keypoints[0][:, :2]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, np.ndarray]:
    def embed(_: Path) -> dict[str, np.ndarray]:
        embedder = faces.get_embedder()
        return {name: embedder.embed(photo(name), *only_face(photo(name))) for name in ("obama", *SAME, "biden")}

    return once_per_run(tmp_path_factory, "faces-embedded", embed)


def test_the_same_person_is_recognized_in_other_photos_and_the_other_person_is_not(embedded):
    embedder = faces.get_embedder()
    gallery = faces.Gallery.of("default", embedder.model, {"obama": [embedded["obama"]]})
    matches = [  # each photo on its own: a person is matched at most once per image
        faces.match_faces(faces.person_similarities(embedded[name][None], gallery), gallery.names, 0.4)[0]
        for name in (*SAME, "biden")
    ]
    assert [m.identity for m in matches] == ["obama", "obama", "obama", "unknown"]
    assert all(m.similarity >= 0.4 for m in matches[:3]) and matches[3].similarity < 0.4
    assert embedded["obama"].shape == (128,) and embedded["obama"].dtype == np.float32


def test_a_person_is_matched_once_per_image_unless_repeats_are_allowed():
    # two faces both nearest to anna; the second is also like ben: the assignment gives ben the second
    scores = np.array([[0.9, 0.1], [0.8, 0.6], [0.7, 0.2]])
    one_each = faces.match_faces(scores, ("anna", "ben"), 0.5)
    assert [m.identity for m in one_each] == ["anna", "ben", "unknown"]
    assert one_each[2].similarity == 0.7  # its best, though anna was taken
    repeated = faces.match_faces(scores, ("anna", "ben"), 0.5, repeats=True)
    assert [m.identity for m in repeated] == ["anna", "anna", "anna"]


def test_a_pair_below_the_threshold_is_never_assigned():
    scores = np.array([[0.3, 0.2]])
    assert faces.match_faces(scores, ("anna", "ben"), 0.5) == [faces.Match("unknown", 0.3)]
    assert faces.match_faces(np.zeros((1, 0)), (), 0.5) == [faces.Match("unknown", None)]


def test_unknown_faces_group_into_people_labelled_in_order_of_appearance(embedded):
    order = ["biden", "obama", "obama2", "biden", "obama3"]
    vectors = np.stack([embedded[name] for name in order])
    assert faces.cluster_faces(faces.DLIB, vectors, 0.4) == [1, 2, 2, 1, 2]


def test_a_face_too_small_or_without_landmarks_says_why():
    box = np.array([10, 10, 30, 40])
    with pytest.raises(faces.FaceError, match=r"20 px on its shorter side; at least 32 px"):
        faces.check_face(box, np.zeros((5, 2)))
    with pytest.raises(faces.FaceError, match="five landmarks"):
        faces.check_face(np.array([0, 0, 100, 100]), None)


def test_sface_needs_its_onnx_file(tmp_path):
    with pytest.raises(faces.FaceError, match="needs its ONNX file"):
        faces.get_embedder("sface")
    with pytest.raises(faces.FaceError, match="does not exist"):
        faces.get_embedder("sface", str(tmp_path / "face_recognition_sface_2021dec.onnx"))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(faces.FaceError, match="not a usable SFace ONNX model"):
        faces.get_embedder("sface", str(broken))
    with pytest.raises(faces.FaceError, match="embedder must be one of dlib, sface"):
        faces.get_embedder("arcface")


def test_identities_become_data_columns():
    found = Detections.from_xywh([[0, 0, 50, 50], [60, 0, 50, 50]], [0.9, 0.8], "face")
    tagged = faces.with_identities(found, [faces.Match("anna", 0.71), None])
    assert list(tagged.data["identity"]) == ["anna", None]
    assert list(tagged.data["similarity"]) == [0.71, None]


def test_an_annotated_image_shows_a_face_s_name_in_its_caption():
    from pipeline.outputs.render import draw_detections

    blank = np.full((300, 600, 3), 128, np.uint8)
    face = Detections.from_xywh([[200, 150, 80, 80]], [0.9], "face")
    plain = draw_detections(blank, face, thickness=2)
    named = draw_detections(blank, face.with_data({"identity": ["Barack Obama"]}), thickness=2)
    band = slice(100, 150)  # the caption's rows, above the box
    drawn = [int((image[band] != 128).any(axis=2).any(axis=0).sum()) for image in (plain, named)]
    assert drawn[1] > drawn[0] + 50, "the name widens the caption"
    assert np.array_equal(plain[150:], named[150:]), "the box is drawn alike"
