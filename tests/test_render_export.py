"""Drawing detections (pipeline.outputs.render) and the COCO export (pipeline.outputs.export), on made-up detections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from pipeline.model import Detections, Recognition
from pipeline.outputs.export import COCO_KEYPOINTS, categories, category_ids, coco_document, coco_results
from pipeline.outputs.render import MASK_ALPHA, caption, draw_detections, label_color, to_bgr
from pipeline.shapes import obb_corners


def grey(height: int = 200, width: int = 300, value: int = 128) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


def one_box(x: float, y: float, w: float, h: float, label: str = "qrcode", text: str | None = "hello") -> Detections:
    return Detections.from_xywh([[x, y, w, h]], [0.9], [label], [text])


# ------------------------------------------------------------------------------------------------------- render


def test_box_is_drawn_on_its_border_pixels_in_the_label_colour() -> None:
    image = grey()
    drawn = draw_detections(image, one_box(100, 80, 50, 40), thickness=1, captions=False)
    color = np.array(label_color("qrcode"))
    # x2, y2 are exclusive: the box covers columns 100..149 and rows 80..119
    for y, x in [(80, 100), (80, 149), (119, 100), (119, 149), (100, 100), (100, 149), (80, 125), (119, 125)]:
        assert (drawn[y, x] == color).all(), (y, x)
    assert (drawn[100, 125] == 128).all()  # inside the box: untouched
    assert (drawn[79, 125] == 128).all() and (drawn[120, 125] == 128).all()  # just outside: untouched


def test_input_is_not_modified_and_far_pixels_stay_equal() -> None:
    image = np.random.default_rng(0).integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    before = image.copy()
    drawn = draw_detections(image, one_box(150, 120, 40, 40))
    assert (image == before).all()
    assert drawn.shape == image.shape
    assert (drawn[:100, :140] == image[:100, :140]).all()  # far from the box and its caption
    assert (drawn[170:, :] == image[170:, :]).all()
    assert (drawn != image).any()


def test_caption_goes_above_the_box_or_inside_it_at_the_top_edge() -> None:
    drawn = draw_detections(grey(), one_box(100, 80, 50, 40), thickness=1)
    assert (drawn[60:79, 100:160] != 128).any()  # caption above
    at_top = draw_detections(grey(), one_box(100, 0, 50, 40), thickness=1)
    assert (at_top[2:15, 102:148] != 128).any()  # no room above: inside the box's top


def test_grey_images_become_bgr_and_no_detections_draws_nothing() -> None:
    image = grey(50, 60, 77)
    drawn = draw_detections(image, Detections.empty())
    assert drawn.shape == (50, 60, 3)
    assert (drawn == 77).all()
    bgra = np.zeros((4, 5, 4), dtype=np.uint8)
    assert to_bgr(bgra).shape == (4, 5, 3)


def test_points_are_drawn_as_a_polygon() -> None:
    quad = np.array([[40, 20], [80, 30], [70, 70], [30, 60]], dtype=float)
    detections = Detections(np.array([[30, 20, 80, 70]]), [1.0], ["aruco"], ["7"], [quad])
    drawn = draw_detections(grey(100, 100), detections, thickness=2, captions=False)
    assert (drawn[25, 60] != 128).any()  # on the edge from (40, 20) to (80, 30), inside the box


def test_masks_are_tinted_translucent_and_holes_and_far_pixels_stay() -> None:
    holed = shapely.Polygon([(20, 20), (80, 20), (80, 70), (20, 70)], [[(40, 35), (60, 35), (60, 55), (40, 55)]])
    detections = Detections(np.array([[20, 20, 80, 70]]), [0.9], ["cell"], masks=[holed])
    drawn = draw_detections(grey(100, 120), detections, thickness=1, captions=False)
    color = np.array(label_color("cell"))
    tinted = drawn[28, 30].astype(int)  # inside the mask, away from its outline and box
    assert (tinted == np.round(128 * (1 - MASK_ALPHA) + color * MASK_ALPHA)).all()
    assert (np.abs(tinted - color) <= np.abs(128 - color)).all() and (tinted != 128).any()
    assert (drawn[45, 50] == 128).all()  # in the hole
    assert (drawn[90:, :] == 128).all() and (drawn[:, 90:] == 128).all()  # away from the shape
    assert (drawn[20, 50] == color).all()  # the box is still drawn


def test_rotated_boxes_are_drawn_instead_of_the_axis_aligned_box() -> None:
    obb = np.array([60.0, 50.0, 60.0, 24.0, 30.0])
    corners = obb_corners(obb)[0]
    xyxy = np.array([[*corners.min(axis=0), *corners.max(axis=0)]])
    detections = Detections(xyxy, [0.9], ["plate"], obb=[obb])
    drawn = draw_detections(grey(100, 120), detections, thickness=1, captions=False)
    color = np.array(label_color("plate"))
    for x, y in np.floor(corners).astype(int):  # each corner's pixel or a neighbour is on the rotated outline
        assert (drawn[y - 1 : y + 2, x - 1 : x + 2] == color).all(axis=2).any(), (x, y)
    left, top = np.floor(xyxy[0, :2]).astype(int)
    assert (drawn[top, left] == 128).all()  # the axis-aligned box's corner is not drawn
    assert (drawn[50, 60] == 128).all()  # the centre: an outline, not a fill
    level = Detections(np.array([[100, 80, 150, 120]]), [0.9], ["qrcode"], obb=[[125, 100, 50, 40, 0]])
    as_box = draw_detections(grey(), one_box(100, 80, 50, 40), thickness=1, captions=False)
    assert (draw_detections(grey(), level, thickness=1, captions=False) == as_box).all()  # unrotated: same pixels


def person(keypoints: np.ndarray, names: tuple[str, ...]) -> Detections:
    return Detections(np.array([[5, 5, 100, 165]]), [0.9], ["person"], keypoints=[keypoints], keypoint_names=names)


PERSON = np.array(
    [[50, 20], [54, 16], [46, 16], [58, 18], [42, 18], [65, 40], [35, 40], [72, 60], [28, 60], [75, 80], [25, 80],
     [60, 90], [40, 90], [62, 120], [38, 120], [63, 150], [37, 150]],
    dtype=float,
)  # fmt: skip


def test_keypoints_are_dots_joined_by_the_coco_skeleton() -> None:
    keypoints = np.column_stack([PERSON, np.ones(17)])
    keypoints[10, 2] = 0.0  # the right wrist is not seen
    drawn = draw_detections(grey(180, 120), person(keypoints, COCO_KEYPOINTS), thickness=2, captions=False)
    for k, (x, y) in enumerate(PERSON.astype(int)):
        assert (drawn[y, x] != 128).any() == (k != 10), COCO_KEYPOINTS[k]
    assert (drawn[40, 50] != 128).any()  # on the line between the shoulders
    assert (drawn[70, 26] == 128).all()  # no line to the unseen wrist
    assert (drawn[50:, :3] == 128).all() and (drawn[170:] == 128).all()  # away from the person and its box


def test_keypoints_without_a_known_skeleton_are_dots_only() -> None:
    keypoints = np.array([[20.0, 50.0, 0.8], [80.0, 50.0, 0.6]])
    drawn = draw_detections(grey(100, 120), person(keypoints, ("head", "tail")), thickness=2, captions=False)
    assert (drawn[50, 20] != 128).any() and (drawn[50, 80] != 128).any()
    assert (drawn[50, 50] == 128).all()  # nothing between them


def test_caption_text_is_ascii_and_shortened() -> None:
    assert caption("qrcode", 0.876, "tilerec-0001") == "qrcode 0.88 tilerec-0001"
    assert caption("face", 1.0) == "face 1.00"
    assert caption("qrcode", 1.0, "héllo\nwörld") == "qrcode 1.00 h?llo w?rld"
    long = caption("qrcode", 1.0, "x" * 100, max_text=10)
    assert long == "qrcode 1.00 xxxxxxx..."


def test_colours_are_fixed_per_label() -> None:
    assert label_color("face") == label_color("face")
    assert label_color("face") != label_color("qrcode")
    assert all(0 <= channel <= 255 for channel in label_color("person"))


# ------------------------------------------------------------------------------------------------------- export


def recognition(boxes: list[list[float]], labels: list[str], scores: list[float], **kw: object) -> Recognition:
    texts = kw.pop("texts", None)
    detections = Detections.from_xywh(boxes, scores, labels, texts) if boxes else Detections.empty()
    return Recognition(width=1000, height=800, detections=detections, recognizer="test", **kw)  # type: ignore[arg-type]


def test_category_ids_start_at_one_in_label_order() -> None:
    ids = category_ids(["person", "face", "person"])
    assert ids == {"face": 1, "person": 2}
    assert categories(ids) == [
        {"id": 1, "name": "face", "supercategory": "tilerec"},
        {"id": 2, "name": "person", "supercategory": "tilerec"},
    ]


def test_coco_results_have_xywh_boxes_and_scores() -> None:
    found = recognition([[10, 20, 30, 40], [100.5, 200.25, 5, 6]], ["face", "person"], [0.5, 0.25])
    records = coco_results(found, image_id=7, ids={"face": 1, "person": 2})
    assert records == [
        {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5},
        {"image_id": 7, "category_id": 2, "bbox": [100.5, 200.25, 5.0, 6.0], "score": 0.25},
    ]
    with pytest.raises(KeyError, match="person"):
        coco_results(found, 1, {"face": 1})


def test_coco_document_for_several_images() -> None:
    first = recognition([[1, 2, 3, 4]], ["qrcode"], [1.0], texts=["abc"], source="/data/a.png")
    second = recognition([[5, 6, 7, 8], [9, 10, 11, 12]], ["face", "qrcode"], [0.75, 1.0], texts=[None, "xyz"])
    empty = recognition([], [], [])
    document = coco_document([first, second, empty], ["a.png", "b.png", "c.png"])
    assert [image["id"] for image in document["images"]] == [1, 2, 3]
    assert document["images"][0] == {"id": 1, "file_name": "a.png", "width": 1000, "height": 800}
    assert [c["name"] for c in document["categories"]] == ["face", "qrcode"]
    annotations = document["annotations"]
    assert [a["id"] for a in annotations] == [1, 2, 3]
    assert [(a["image_id"], a["category_id"]) for a in annotations] == [(1, 2), (2, 1), (2, 2)]
    assert annotations[0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and annotations[0]["area"] == 12.0
    assert annotations[0]["text"] == "abc" and "text" not in annotations[1]
    assert all(a["iscrowd"] == 0 and "score" in a for a in annotations)
    assert json.loads(json.dumps(document)) == document  # plain JSON types only


def test_coco_document_with_a_fixed_label_list_and_default_file_names() -> None:
    found = recognition([[1, 2, 3, 4]], ["face"], [0.5], source="/data/x.png")
    document = coco_document([found], labels=["person", "face", "car"])
    assert [(c["id"], c["name"]) for c in document["categories"]] == [(1, "car"), (2, "face"), (3, "person")]
    assert document["annotations"][0]["category_id"] == 2
    assert document["images"][0]["file_name"] == "/data/x.png"
    with pytest.raises(ValueError, match="file names"):
        coco_document([found], ["a.png", "b.png"])
