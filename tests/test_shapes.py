"""Masks, oriented boxes, keypoints, class ids and data: the result model, the shape-aware merge, and real producers
of shapes across seams (a perfect segmenter on drawn shapes, rotated ArUco markers and QR codes)."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import shapely
from shapely import affinity

from pipeline import recognize_image
from pipeline.merge.detections import merge_detections
from pipeline.model import Detections, Recognition
from pipeline.scenes.codes import aruco_marker, qr_sticker
from pipeline.shapes import (
    ShapeError,
    obb_corners,
    obb_from_points,
    polygon_from_rings,
    polygons_from_bitmap,
    rasterize,
    rings_of,
)
from pipeline.tiling import grid
from tests.shaped import Malformed, Segmenter

TILE, OVERLAP = 640, 0.2  # seams of the default grid: tiles start every 512 px, overlapping by 128


def square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side]]


# --- shapes: pure functions ---


def test_obb_corners_are_the_turned_rectangle_and_min_area_rect_recovers_them():
    corners = obb_corners(np.array([[100, 50, 40, 20, 90]]))[0]  # a 40x20 box turned upright
    assert corners.round(6).tolist() == [[110, 30], [110, 70], [90, 70], [90, 30]]
    rng = np.random.default_rng(3)
    for _ in range(50):
        cx, cy, w, h = rng.uniform(20, 200, 4)
        angle = rng.uniform(-180, 180)
        quad = obb_corners(np.array([[cx, cy, w, h, angle]]))[0]
        again = obb_corners(obb_from_points(quad))[0]
        # the same rectangle: every corner of one is a corner of the other (the order and the axes may differ)
        distances = np.linalg.norm(quad[:, None] - again[None], axis=2)
        assert distances.min(axis=1).max() < 1e-3


def test_bitmap_outlines_are_exact_pixel_edges_with_holes():
    ring = np.zeros((40, 50), np.uint8)
    ring[5:35, 5:45] = 1
    ring[15:25, 15:30] = 0  # a hole
    ring[0:3, 47:50] = 1  # a separate part
    mask = polygons_from_bitmap(ring, (100, 200))
    assert mask.geom_type == "MultiPolygon" and mask.area == ring.sum()
    assert sorted(len(p.interiors) for p in mask.geoms) == [0, 1]
    assert mask.bounds == (105.0, 200.0, 150.0, 235.0)
    assert np.array_equal(rasterize(mask, 100, 200, 50, 40), ring)
    assert polygons_from_bitmap(np.zeros((5, 5))) is None


def test_mask_json_rings_round_trip():
    mask = polygon_from_rings([[square(0, 0, 10), square(2, 2, 3)], [square(20, 0, 4)]])
    assert mask.area == 100 - 9 + 16
    assert polygon_from_rings(rings_of(mask)).equals(mask)
    assert polygon_from_rings([square(0, 0, 10)]).area == 100  # one polygon needs no outer list


# --- the result model ---


def full() -> Detections:
    return Detections.from_xywh(
        [[0, 0, 10, 10], [50, 50, 20, 20]],
        [0.9, 0.5],
        ["cell", "ship"],
        masks=[[[square(0, 0, 10), square(2, 2, 3)]], None],
        obb=[None, [60, 60, 20, 8, 30]],
        keypoints=[[[1, 2, 0.5], [3, 4, 1.0]], None],
        keypoint_names=["head", "tail"],
        class_id=[3, 5],
        data={"area_um2": [12.5, None], "tag": ["a", "b"]},
    )


def test_every_column_survives_json_columns_records_and_the_result_document():
    d = full()
    back = Detections.from_columns(json.loads(json.dumps(d.to_columns())))
    assert back.to_records() == d.to_records()
    [cell, ship] = d.to_records()
    assert cell["mask"] == [[square(0, 0, 10), square(2, 2, 3)]] and cell["class_id"] == 3
    assert cell["keypoints"] == [[1, 2, 0.5], [3, 4, 1.0]] and cell["data"] == {"area_um2": 12.5, "tag": "a"}
    assert ship["obb"]["center"] == [60, 60] and ship["obb"]["size"] == [20, 8] and ship["obb"]["angle"] == 30
    assert len(ship["obb"]["corners"]) == 4 and "mask" not in ship and ship["data"] == {"tag": "b"}
    result = Recognition(100, 100, d, "test")
    document = json.loads(json.dumps(result.to_json()))
    assert document["schema"] == "tilerec/recognition@2" and document["keypoint_names"] == ["head", "tail"]
    again = Recognition.from_json(document)
    assert again.detections.to_records() == d.to_records() and again.detections.keypoint_names == ("head", "tail")


def test_a_schema_1_result_is_still_read():
    old = {
        "schema": "tilerec/recognition@1",
        "image": {"width": 10, "height": 10, "source": None},
        "recognizer": {"name": "qrcode", "params": {}},
        "tiling": {"tile": 640, "overlap": 0.2, "tiles": 1, "tasks": 1},
        "detections": [{"label": "qrcode", "score": 1.0, "box": [1, 1, 5, 5], "text": "hi"}],
    }
    detections = Recognition.from_json(old).detections
    assert detections.texts.tolist() == ["hi"] and not detections.has("masks") and not detections.has("obb")


def test_shift_moves_every_shape_and_concat_fills_missing_data_with_none():
    moved = full().shifted(100, 10)
    assert moved.masks[0].bounds == (100, 10, 110, 20) and moved.obb[1, :2].tolist() == [160, 70]
    assert moved.keypoints[0][:, :2].tolist() == [[101, 12], [103, 14]] and moved.keypoints[0][0, 2] == 0.5
    plain = Detections.from_xywh([[0, 0, 5, 5]], [1.0], "x", data={"other": [1]})
    joined = Detections.concat([full(), plain])
    assert joined.data["tag"].tolist() == ["a", "b", None] and joined.data["other"].tolist() == [None, None, 1]
    assert joined.class_id.tolist() == [3, 5, -1] and joined.keypoint_names == ("head", "tail")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"keypoints": [[[1, 2, 1]], [[1, 2, 1], [3, 4, 1]]]}, "keypoints: detection 1 has 2 keypoints, not 1"),
        ({"keypoints": [[[1, 2, 1]]] * 2, "keypoint_names": ["a", "b"]}, "keypoints: detection 0 has 1 keypoints"),
        ({"obb": [[1, 2, 3], None]}, "obb: detection 0 has 3 values, not 5"),
        ({"class_id": [1.5, 2]}, "class_id: values must be whole numbers"),
    ],
)
def test_malformed_columns_are_refused_naming_the_column(columns, message):
    with pytest.raises(ShapeError, match=message):
        Detections.from_xywh([[0, 0, 5, 5], [10, 10, 5, 5]], [1, 1], "x", **columns)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("bowtie", r"masks: detection 0 is not a valid polygon \(Self-intersection"),
        ("nan", "obb: detection 0 is .*not finite"),
        ("outside", "masks: detection 0 is outside its 640x640 tile"),
    ],
)
def test_a_malformed_shape_fails_its_tile_and_the_job_merges_the_rest(fault, message):
    image = np.full((1200, 1200, 3), 255, np.uint8)
    cv2.circle(image, (100, 100), 30, (0, 0, 0), -1)  # only the top-left tile sees a dark region
    result = recognize_image(image, Malformed(fault), on_tile_error="partial")
    assert [f["tile"] for f in result.failed_tiles] == [0]
    assert result.failed_tiles[0]["error"].startswith("ShapeError: ")
    assert re.search(message, result.failed_tiles[0]["error"]), result.failed_tiles[0]["error"]
    assert result.tiles == 9 and len(result.detections) == 0


def test_a_callable_gets_no_parameters():
    from pipeline.recognizers import RecognizerError

    with pytest.raises(RecognizerError, match=r"is a callable: it takes no parameters .*functools.partial"):
        recognize_image(np.zeros((100, 100), np.uint8), Segmenter(), threshold=3)


# --- the shape-aware merge ---


def test_thin_rotated_boxes_side_by_side_stay_apart_although_their_hulls_coincide():
    # two 200x10 boxes along the diagonal, 30 px apart across it: axis-aligned hulls overlap almost fully
    offset = 30 / np.sqrt(2)
    obb = [[100 - offset / 2, 100 + offset / 2, 200, 10, 45], [100 + offset / 2, 100 - offset / 2, 200, 10, 45]]
    corners = obb_corners(np.array(obb))
    xyxy = np.hstack([corners.min(axis=1), corners.max(axis=1)])
    as_hulls = Detections(xyxy, [0.9, 0.8], ["ship", "ship"])
    assert len(merge_detections(as_hulls, "nms", "iou", 0.5)) == 1  # what an axis-aligned merge does
    turned = Detections(xyxy, [0.9, 0.8], ["ship", "ship"], obb=obb)
    assert len(merge_detections(turned, "nms", "iou", 0.5)) == 2
    twice = Detections(np.vstack([xyxy, xyxy[:1] + 1]), [0.9, 0.8, 0.7], ["ship"] * 3, obb=[*obb, obb[0]])
    assert len(merge_detections(twice, "nms", "iou", 0.5)) == 2  # the same ship seen twice is one


def test_seam_cut_pieces_of_a_long_mask_join_into_its_whole_outline():
    # a 1000x100 bar over three tiles' views: pieces overlap only in the 128 px bands, far below any IOS threshold
    bar = shapely.box(100, 300, 1100, 400)
    views = [(0, 640), (512, 1152), (1024, 1664)]
    pieces = [shapely.clip_by_rect(bar, x0, 0, x1, 1000) for x0, x1 in views]
    masks = [*pieces, shapely.box(300, 500, 340, 540)]  # and an unrelated blob below
    xyxy = np.array([m.bounds for m in masks])
    d = Detections(xyxy, [0.8, 0.9, 0.7, 0.6], ["bar"] * 4, cut=[True, True, True, False], masks=masks,
                   data={"piece": [0, 1, 2, 3]})  # fmt: skip
    merged = merge_detections(d)
    assert len(merged) == 2
    [k] = np.flatnonzero(merged.data["piece"] != 3)  # not the blob
    assert merged.masks[k].symmetric_difference(bar).area < 1e-6 and merged.xyxy[k].tolist() == [100, 300, 1100, 400]
    assert merged.data["piece"][k] == 1  # the best-scored piece keeps its data
    kept = merge_detections(d, "nms")  # the best piece (the middle one) drops its neighbours, and joins nothing
    assert sorted(kept.data["piece"].tolist()) == [1, 3] and kept.masks[0].equals(pieces[1])


def test_two_touching_cells_cut_by_the_same_seam_stay_two():
    left, right = shapely.Point(560, 300).buffer(40), shapely.Point(640, 300).buffer(40)  # touching discs
    views = [(0, 640), (512, 1152)]
    masks = []
    for disc in (left, right):
        for x0, x1 in views:
            piece = shapely.clip_by_rect(disc, x0, 0, x1, 1000)
            if not piece.is_empty:
                masks.append(piece)
    xyxy = np.array([m.bounds for m in masks])
    d = Detections(xyxy, np.linspace(0.9, 0.6, len(masks)), ["cell"] * len(masks), cut=[True] * len(masks),
                   masks=masks)  # fmt: skip
    merged = merge_detections(d)
    areas = sorted(m.area for m in merged.masks)
    assert len(merged) == 2 and areas == pytest.approx([left.area, right.area], rel=1e-6)


def test_a_cut_view_takes_each_keypoint_from_the_view_that_scored_it_best():
    names = ["a", "b"]
    d = Detections(
        np.array([[0, 0, 100, 100], [10, 0, 110, 100]]),
        [0.9, 0.8],
        ["p", "p"],
        cut=[True, True],
        keypoints=[[[5, 5, 0.9], [99, 50, 0.1]], [[6, 5, 0.2], [100, 50, 0.8]]],
        keypoint_names=names,
    )
    [merged] = merge_detections(d).keypoints
    assert merged.tolist() == [[5, 5, 0.9], [100, 50, 0.8]]


# --- real producers across seams ---


def ellipse(cx: float, cy: float, a: float, b: float, angle: float) -> shapely.Polygon:
    return affinity.rotate(affinity.scale(shapely.Point(cx, cy).buffer(1, 256), a, b), angle)


def draw(image: np.ndarray, shape: shapely.Geometry) -> None:
    for part in getattr(shape, "geoms", [shape]):
        rings = [part.exterior, *part.interiors]
        cv2.fillPoly(image, [np.round((np.asarray(r.coords) - 0.5) * 16).astype(np.int32) for r in rings], 0,
                     cv2.LINE_8, 4)  # fmt: skip


def drawn_scene() -> tuple[np.ndarray, list[shapely.Geometry]]:
    """Ellipses and rings with holes on white, most across seams: one over three tiles, one on a four-tile corner."""
    shapes = [
        ellipse(576, 300, 260, 70, 10),  # across the first vertical seam band, wider than the overlap
        ellipse(1100, 700, 520, 100, 0).difference(ellipse(1100, 700, 400, 50, 0)),  # a long ring over three tiles
        ellipse(1088, 1088, 120, 90, 30).difference(ellipse(1088, 1088, 50, 40, 30)),  # a ring on a 4-tile corner
        ellipse(250, 1300, 80, 40, -20),  # inside one tile
    ]
    image = np.full((1600, 1700), 255, np.uint8)
    for shape in shapes:
        draw(image, shape)
    return image, shapes


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def test_a_segmenter_on_shapes_across_seams_gives_one_polygon_each_with_mask_iou_097():
    image, truths = drawn_scene()
    result = recognize_image(image, Segmenter(), tile=TILE, overlap=OVERLAP)
    found = result.detections
    assert result.tiles == 12 and len(found) == len(truths), found.to_records()
    for truth in truths:
        k = int(np.argmax([iou(mask, truth) for mask in found.masks]))
        assert iou(found.masks[k], truth) >= 0.97
        assert len(getattr(found.masks[k], "geoms", [found.masks[k]])) == 1  # one polygon, not seam pieces
        assert len(found.masks[k].interiors if found.masks[k].geom_type == "Polygon" else []) == len(
            getattr(truth, "interiors", [])
        )
    assert set(found.class_id.tolist()) == {7} and all(p > 0 for p in found.data["pixels"])


def rotated_codes() -> tuple[np.ndarray, list[tuple[str, str, np.ndarray]]]:
    """ArUco markers and QR codes pasted turned by known angles across the seams; truth: label, text, 4 corners."""
    image = np.full((1400, 1500), 255, np.uint8)
    truths = []
    stickers = [
        (aruco_marker(3, 12), 576, 300, 25),
        (aruco_marker(17, 10), 1088, 576, -35),
        (qr_sticker("turned-1", 5, quiet_modules=3), 560, 1000, 20),
        (qr_sticker("turned-2", 5, quiet_modules=3), 1100, 1100, -15),
        (aruco_marker(9, 8), 250, 900, 60),
    ]
    for sticker, cx, cy, angle in stickers:
        picture = sticker.picture
        h, w = picture.shape
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        turn[:, 2] += [cx - w / 2, cy - h / 2]
        warped = cv2.warpAffine(picture, turn, image.shape[::-1], flags=cv2.INTER_LINEAR, borderValue=0)
        inside = cv2.warpAffine(np.full_like(picture, 255), turn, image.shape[::-1], flags=cv2.INTER_NEAREST)
        image[inside > 0] = warped[inside > 0]
        bx, by, bw, bh = sticker.box
        corners = np.array([[bx, by], [bx + bw, by], [bx + bw, by + bh], [bx, by + bh]], np.float64)
        truths.append((sticker.label, sticker.text, corners @ turn[:, :2].T + turn[:, 2]))
    return image, truths


@pytest.mark.parametrize("recognizer", ["aruco", "qrcode"])
def test_rotated_codes_across_seams_come_out_once_with_obb_corners_within_2_px(recognizer):
    image, truths = rotated_codes()
    found = recognize_image(image, recognizer, tile=TILE, overlap=OVERLAP).detections
    wanted = [t for t in truths if t[0] == recognizer]
    assert sorted(found.texts.tolist()) == sorted(text for _, text, _ in wanted)
    corners = obb_corners(found.obb)
    for _, text, truth in wanted:
        [k] = np.flatnonzero(found.texts == text)
        distances = np.linalg.norm(corners[k][:, None] - truth[None], axis=2)
        assert distances.min(axis=1).max() <= 2.0, (text, corners[k], truth)


# --- through Redis and real workers ---


def test_a_worker_carries_masks_class_ids_and_data_through_redis_and_the_merge(worker, images_root, redis_server):
    from tasks import recognize
    from tests.conftest import tilerec_keys

    image, truths = drawn_scene()
    path = images_root / "drawn-shapes.png"
    cv2.imwrite(str(path), image)
    result = recognize.delay(str(path), "tests.shaped:Segmenter", batch_size=2).get(timeout=120)
    assert result["schema"] == "tilerec/recognition@2" and result["tiling"]["batches"] == 6
    found = Detections.from_records(result["detections"])
    assert len(found) == len(truths)
    for truth in truths:
        assert max(iou(mask, truth) for mask in found.masks) >= 0.97
    in_process = recognize_image(image, Segmenter()).to_json()["detections"]
    assert sorted(result["detections"], key=lambda r: r["box"]) == sorted(in_process, key=lambda r: r["box"])
    assert tilerec_keys(redis_server) == []


def test_a_worker_fails_the_tile_of_a_malformed_shape_and_stays_up(worker, images_root, redis_server):
    from tasks import recognize

    image = np.full((1200, 1200), 255, np.uint8)
    cv2.circle(image, (900, 900), 30, 0, -1)
    path = images_root / "one-dark-spot.png"
    cv2.imwrite(str(path), image)
    result = recognize.delay(str(path), "tests.shaped:Malformed", fault="outside", on_tile_error="partial").get(
        timeout=120
    )
    seeing = [w.index for w in grid(1200, 1200, TILE, OVERLAP) if w.x < 930 and w.x2 > 870 and w.y < 930 and w.y2 > 870]
    assert sorted(f["tile"] for f in result["failed_tiles"]) == seeing and len(seeing) > 1
    assert all(f["error"].startswith("ShapeError: masks: detection 0 is outside its") for f in result["failed_tiles"])
    assert result["tiling"]["tiles"] == 9 and worker.process.poll() is None
