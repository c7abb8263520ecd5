import json

import numpy as np
import pytest

from pipeline.model import SCHEMA, Detections, Recognition


def sample() -> Detections:
    return Detections(
        np.array([[10.25, 20.5, 110.125, 220.0], [0, 0, 5, 5]]),
        [0.91, 0.5],
        ["qrcode", "face"],
        ["hello", None],
        [np.array([[10.25, 20.5], [110.125, 20.5], [110.125, 220.0], [10.25, 220.0]]), None],
        np.array([False, True]),
    )


def test_columns_round_trip_exactly_through_json():
    d = sample()
    back = Detections.from_columns(json.loads(json.dumps(d.to_columns())))
    assert np.array_equal(back.xyxy, d.xyxy) and np.array_equal(back.scores, d.scores)
    assert back.labels.tolist() == ["qrcode", "face"] and back.texts.tolist() == ["hello", None]
    assert np.array_equal(back.points[0], d.points[0]) and back.points[1] is None
    assert back.cut.tolist() == [False, True]


def test_records_are_coco_xywh_with_optional_fields():
    records = sample().to_records()
    assert records[0] == {
        "label": "qrcode",
        "score": 0.91,
        "box": [10.25, 20.5, 99.88, 199.5],
        "text": "hello",
        "points": [[10.25, 20.5], [110.12, 20.5], [110.12, 220.0], [10.25, 220.0]],
    }
    assert records[1] == {"label": "face", "score": 0.5, "box": [0, 0, 5, 5], "cut": True}
    back = Detections.from_records(records)
    assert back.xyxy[1].tolist() == [0, 0, 5, 5] and back.cut.tolist() == [False, True]


def test_shift_and_clip():
    d = Detections.from_xywh([[-5, 10, 20, 20], [90, 90, 20, 20], [200, 200, 5, 5]], [1, 1, 1], "x")
    placed = d.shifted(0, 0).clipped(100, 100)
    assert placed.xyxy.tolist() == [[0, 10, 15, 30], [90, 90, 100, 100]]  # the third box lies outside
    moved = d.shifted(100, 50)
    assert moved.xyxy[0].tolist() == [95, 60, 115, 80]


def test_concat_and_index_keep_columns_aligned():
    d = Detections.concat([sample(), Detections.empty(), sample()])
    assert len(d) == 4
    picked = d[np.array([1, 2])]
    assert picked.labels.tolist() == ["face", "qrcode"] and picked.texts.tolist() == [None, "hello"]


def test_columns_must_agree_in_length():
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), [1, 1], ["a"])


def test_recognition_json_has_the_documented_schema_and_round_trips():
    r = Recognition(
        width=4000,
        height=3000,
        detections=sample(),
        recognizer="qrcode",
        source="/data/a.png",
        tiles=30,
        batches=8,
        tasks=2,
    )
    data = json.loads(json.dumps(r.to_json()))
    assert data["schema"] == SCHEMA == "tilerec/recognition@2"
    assert set(data) == {"schema", "image", "recognizer", "tiling", "detections", "failed_tiles", "timings"}
    assert data["image"] == {"width": 4000, "height": 3000, "source": "/data/a.png"}
    assert data["tiling"] == {"tile": 640, "overlap": 0.2, "tiles": 30, "batches": 8, "tasks": 2}
    back = Recognition.from_json(data)
    assert back.detections.to_records() == r.detections.to_records()
    with pytest.raises(ValueError, match="schema"):
        Recognition.from_json({**data, "schema": "other@2"})


def test_equal_shaped_points_stay_one_array_per_detection():
    quads = [np.zeros((4, 2)), np.ones((4, 2))]
    d = Detections(np.zeros((2, 4)), [1, 1], ["a", "b"], None, quads)
    assert d.points[1].tolist() == [[1, 1]] * 4
