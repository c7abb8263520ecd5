"""COCO export with masks and keypoints (pipeline.outputs.export), checked by COCO's own tooling: faster-coco-eval (the
`eval` extra) loads the results and scores a perfect predictor of a drawn scene at AP 1.0, a shifted one lower."""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import pytest
import shapely

from pipeline.model import Detections, Recognition
from pipeline.outputs.export import COCO_KEYPOINTS, coco_document, coco_results, segmentation
from pipeline.shapes import encode_rle, polygons_from_bitmap

pytest.importorskip("faster_coco_eval")
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as coco_mask

HEIGHT, WIDTH = 240, 320
LABELS = {"cell": 1, "ring": 2}


def drawn(draw: Any) -> np.ndarray:
    """A full-image 0/1 bitmap with one shape drawn on it by `draw(canvas)`."""
    canvas = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    draw(canvas)
    return canvas


def ring(canvas: np.ndarray) -> None:
    cv2.ellipse(canvas, (240, 60), (45, 35), 0, 0, 360, 1, cv2.FILLED)
    cv2.ellipse(canvas, (240, 60), (20, 15), 10, 0, 360, 0, cv2.FILLED)  # the hole


# (label, bitmap): two ellipses, a ring with a hole, and an ellipse cut by the image's left and bottom edges
SCENE = [
    ("cell", drawn(lambda c: cv2.ellipse(c, (80, 70), (40, 25), 30, 0, 360, 1, cv2.FILLED))),
    ("cell", drawn(lambda c: cv2.ellipse(c, (220, 160), (50, 30), -15, 0, 360, 1, cv2.FILLED))),
    ("ring", drawn(ring)),
    ("cell", drawn(lambda c: cv2.ellipse(c, (10, 220), (40, 30), 0, 0, 360, 1, cv2.FILLED))),
]


def ground_truth() -> dict[str, Any]:
    """The scene as a COCO dataset, its masks encoded by COCO's own `mask.encode` of the drawn bitmaps."""
    annotations = []
    for number, (label, bitmap) in enumerate(SCENE, start=1):
        rle = coco_mask.encode(np.asfortranarray(bitmap))
        annotations.append(
            {
                "id": number,
                "image_id": 1,
                "category_id": LABELS[label],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": float(coco_mask.area(rle)),
                "bbox": coco_mask.toBbox(rle).tolist(),
                "iscrowd": 0,
            }
        )
    return {
        "images": [{"id": 1, "file_name": "scene.png", "width": WIDTH, "height": HEIGHT}],
        "categories": [{"id": number, "name": label} for label, number in LABELS.items()],
        "annotations": annotations,
    }


def predicted(shift: float = 0.0) -> Recognition:
    """A perfect predictor of the scene: each shape's polygons traced from its bitmap's crop; moved by `shift`
    pixels to the right when asked."""
    masks = []
    for _, bitmap in SCENE:
        x, y, w, h = cv2.boundingRect(bitmap)
        mask = polygons_from_bitmap(bitmap[y : y + h, x : x + w], offset=(x, y))
        masks.append(shapely.affinity.translate(mask, shift, 0))
    detections = Detections(
        np.array([m.bounds for m in masks]),
        np.linspace(0.9, 0.6, len(SCENE)),
        [label for label, _ in SCENE],
        masks=masks,
    )
    return Recognition(width=WIDTH, height=HEIGHT, detections=detections.clipped(WIDTH, HEIGHT), recognizer="test")


def average_precision(truth: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> float:
    """COCO AP@[.5:.95] of `results` against `truth`, both passed through JSON as a file would be."""
    for annotation in [*truth["annotations"], *results]:
        if isinstance(annotation.get("segmentation"), dict):
            coco_mask.decode(annotation["segmentation"])  # a malformed RLE hangs COCOeval's C++ code: fail here
    ground = COCO(json.loads(json.dumps(truth)))
    found = ground.loadRes(json.loads(json.dumps(results)))
    evaluation = COCOeval_faster(ground, found, iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0])


def decoded(segment: list[list[float]] | dict[str, Any]) -> np.ndarray:
    """The full-image bitmap COCO makes of a `segmentation` (polygons merged, as COCO's annToRLE does)."""
    rle = coco_mask.merge(coco_mask.frPyObjects(segment, HEIGHT, WIDTH)) if isinstance(segment, list) else segment
    return coco_mask.decode(rle)


# ------------------------------------------------------------------------------------------------------ masks


def test_segmentation_is_polygons_without_holes_and_rle_with_them_and_exact() -> None:
    records = coco_results(predicted(), image_id=1, ids=LABELS)
    kinds = [type(record["segmentation"]).__name__ for record in records]
    assert kinds == ["list", "list", "dict", "list"]  # only the ring has a hole
    truth = ground_truth()["annotations"]
    assert records[2]["segmentation"] == truth[2]["segmentation"]  # RLE identical to COCO's own encoding
    for record, (_, bitmap) in zip(records, SCENE, strict=True):
        assert (decoded(record["segmentation"]) == bitmap).all()  # COCO's reading of each shape: pixel for pixel


def test_perfect_masks_score_ap_one_and_shifted_ones_less() -> None:
    truth = ground_truth()
    perfect = coco_results(predicted(), image_id=1, ids=LABELS)
    assert average_precision(truth, perfect, "segm") == pytest.approx(1.0)
    assert average_precision(truth, perfect, "bbox") == pytest.approx(1.0)
    shifted = coco_results(predicted(shift=6.0), image_id=1, ids=LABELS)
    assert average_precision(truth, shifted, "segm") < 0.9
    assert average_precision(truth, shifted, "bbox") < 0.9


def test_the_document_is_a_coco_dataset_with_mask_areas() -> None:
    recognition = predicted()
    document = coco_document([recognition], ["scene.png"])
    areas = [annotation["area"] for annotation in document["annotations"]]
    assert areas == [float(bitmap.sum()) for _, bitmap in SCENE]  # traced polygons cover whole pixels
    results = coco_results(recognition, 1, {c["name"]: c["id"] for c in document["categories"]})
    assert average_precision(document, results, "segm") == pytest.approx(1.0)


def test_encode_rle_equals_coco_encoding_of_the_whole_image() -> None:
    rng = np.random.default_rng(7)
    for case in range(300):
        height, width = (int(v) for v in rng.integers(1, 41, size=2))
        w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
        # every fourth case pinned to the image's edges: runs wrap from one column into the next there
        x = width - w if case % 4 == 1 else 0 if case % 4 == 2 else int(rng.integers(0, width - w + 1))
        y = height - h if case % 4 == 3 else 0 if case % 4 == 2 else int(rng.integers(0, height - h + 1))
        crop = (rng.random((h, w)) < [0.0, 0.3, 0.7, 1.0][case % 4]).astype(np.uint8)
        image = np.zeros((height, width), dtype=np.uint8)
        image[y : y + h, x : x + w] = crop
        expected = coco_mask.encode(np.asfortranarray(image))
        got = encode_rle(crop, x, y, height, width)
        assert got == {"size": [height, width], "counts": expected["counts"].decode()}, (case, x, y, w, h)


def test_a_mask_reaching_out_of_the_image_is_cut_to_it() -> None:
    holed = shapely.Polygon([(-5, -5), (30, -5), (30, 30), (-5, 30)], [[(5, 5), (10, 5), (10, 10), (5, 10)]])
    rle = segmentation(holed, 20, 10)
    bitmap = coco_mask.decode(rle)
    assert rle["size"] == [10, 20] and bitmap.sum() == 20 * 10 - 25
    assert bitmap[:5, :5].all() and not bitmap[5:10, 5:10].any()
    outside = shapely.Polygon([(30, 0), (40, 0), (40, 6), (30, 6)], [[(32, 1), (34, 1), (34, 3), (32, 3)]])
    assert not coco_mask.decode(segmentation(outside, 20, 10)).any()  # nothing in the image: an empty mask


# -------------------------------------------------------------------------------------------------- keypoints

PERSON = np.array(
    [[50, 20], [54, 16], [46, 16], [58, 18], [42, 18], [65, 40], [35, 40], [72, 60], [28, 60], [75, 80], [25, 80],
     [60, 90], [40, 90], [62, 120], [38, 120], [63, 150], [37, 150]],
    dtype=float,
)  # fmt: skip


def people(shift: float = 0.0, score: float = 1.0) -> Recognition:
    """Two people (COCO's 17 keypoints), the second's right wrist not seen (score 0)."""
    keypoints = []
    for dx in (0.0, 150.0):
        points = np.column_stack([PERSON + np.array([dx + shift, 0.0]), np.full(17, score)])
        keypoints.append(points)
    keypoints[1][10, 2] = 0.0
    boxes = [[dx + 15, 5, 70, 160] for dx in (0.0, 150.0)]
    detections = Detections.from_xywh(boxes, [0.9, 0.8], "person", keypoints=keypoints, keypoint_names=COCO_KEYPOINTS)
    return Recognition(width=WIDTH, height=HEIGHT, detections=detections, recognizer="test")


def test_keypoints_carry_coco_visibility_scores_and_the_person_skeleton() -> None:
    document = coco_document([people(score=0.75)])
    (category,) = document["categories"]
    assert category["keypoints"] == list(COCO_KEYPOINTS)
    assert [16, 14] in category["skeleton"] and len(category["skeleton"]) == 19
    first, second = document["annotations"]
    assert first["keypoints"][:3] == [50.0, 20.0, 2] and len(first["keypoints"]) == 51
    assert first["num_keypoints"] == 17 and second["num_keypoints"] == 16
    assert second["keypoints"][30:33] == [175.0, 80.0, 0]  # not seen: v = 0, where it was placed kept
    assert second["keypoint_scores"][10] == 0.0 and second["keypoint_scores"][0] == 0.75


def test_exact_keypoints_score_ap_one_and_shifted_ones_less() -> None:
    truth = coco_document([people()], ["people.png"])  # our own document as the ground truth
    exact = coco_results(people(score=0.9), 1, {"person": 1})
    assert average_precision(truth, exact, "keypoints") == pytest.approx(1.0)
    shifted = coco_results(people(shift=8.0, score=0.9), 1, {"person": 1})
    assert average_precision(truth, shifted, "keypoints") < 0.9


# ------------------------------------------------------------------------------------------- the other fields


def test_obb_class_id_and_data_are_extra_fields_and_box_only_records_stay_plain() -> None:
    detections = Detections(
        np.array([[10, 10, 50, 30], [60, 60, 70, 70]]),
        [0.9, 0.5],
        ["plate", "plate"],
        obb=[[30, 20, 40, 20, 12.3456], None],
        class_id=[4, -1],
        data={"track": [17, None]},
    )
    first, second = coco_results(Recognition(100, 100, detections, "test"), 1, {"plate": 1})
    assert first["obb"] == [30.0, 20.0, 40.0, 20.0, 12.346]
    assert first["class_id"] == 4 and first["data"] == {"track": 17}
    assert second == {"image_id": 1, "category_id": 1, "bbox": [60.0, 60.0, 10.0, 10.0], "score": 0.5}


def test_several_parts_are_several_polygons_and_unnamed_keypoints_are_numbered() -> None:
    parts = shapely.MultiPolygon([shapely.box(0, 0, 4, 4), shapely.box(10, 0, 12, 2)])
    assert sorted(len(polygon) for polygon in segmentation(parts, 20, 20)) == [8, 8]
    detections = Detections.from_xywh([[0, 0, 12, 4]], [0.5], "thing", masks=[parts], keypoints=[[[1, 1], [2, 2]]])
    document = coco_document([Recognition(20, 20, detections, "test")])
    assert document["categories"][0]["keypoints"] == ["0", "1"] and document["categories"][0]["skeleton"] == []
    assert document["annotations"][0]["area"] == 20.0  # the mask's area, not the box's 48
    named = Detections.from_xywh([[0, 0, 1, 1]], [0.5], "thing", keypoints=[[[1, 1], [2, 2]]], keypoint_names="ab")
    with pytest.raises(ValueError, match="named"):
        coco_document([Recognition(20, 20, detections, "test"), Recognition(20, 20, named, "test")])
