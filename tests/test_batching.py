"""The batch protocol: a recognizer with `max_batch` and `recognize_batch` gets whole forward passes of tiles, in
process and on workers, with the same detections as one tile at a time, and errors still belong to their tile."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline import recognize_image
from pipeline.tiling import grid
from tests.shaped import BatchedSegmenter, Segmenter

TIMEOUT = 120


def dotted(width: int = 2000, height: int = 1500) -> np.ndarray:
    """Dark discs on white, a few per tile, some across seams."""
    image = np.full((height, width, 3), 255, np.uint8)
    rng = np.random.default_rng(5)
    for x, y in rng.uniform([40, 40], [width - 40, height - 40], (40, 2)):
        cv2.circle(image, (int(x), int(y)), int(rng.integers(8, 25)), (0, 0, 0), -1)
    return image


def comparable(result) -> list:
    records = result.to_json()["detections"]
    for record in records:
        record.get("data", {}).pop("pass_size", None)
        if not record.get("data"):
            record.pop("data", None)
    return sorted(records, key=lambda r: r["box"])


def test_batched_passes_give_the_same_detections_as_one_tile_at_a_time():
    image = dotted()
    tiles = len(grid(1500, 2000, 640, 0.2))
    batched = BatchedSegmenter(max_batch=4)
    result = recognize_image(image, batched)
    assert batched.passes == [4] * (tiles // 4) + ([tiles % 4] if tiles % 4 else [])
    assert comparable(result) == comparable(recognize_image(image, Segmenter()))
    assert len(result.detections) > 20


def test_a_pass_that_fails_is_run_again_tile_by_tile_so_only_the_bad_tile_fails():
    image = dotted()
    image[100, 100] = (0, 0, 255)  # in tile 0 only
    result = recognize_image(image, BatchedSegmenter(max_batch=4), on_tile_error="partial")
    assert [f["tile"] for f in result.failed_tiles] == [0]
    assert result.failed_tiles[0]["error"] == "ValueError: a red pixel in this pass"
    far = [r for r in comparable(recognize_image(image, Segmenter())) if r["box"][0] >= 640 or r["box"][1] >= 640]
    assert far and all(r in comparable(result) for r in far)  # what tile 0 cannot see is all there


def test_a_worker_runs_tiles_a_forward_pass_at_a_time(worker, images_root, redis_server):
    from tasks import recognize
    from tests.conftest import tilerec_keys

    image = dotted()
    path = images_root / "dotted.png"
    cv2.imwrite(str(path), image)
    result = recognize.delay(str(path), "tests.shaped:BatchedSegmenter", max_batch=3, batch_size=7).get(timeout=TIMEOUT)
    sizes = {d["data"].get("pass_size", 1) for d in result["detections"]}  # a pass of one is a plain call
    assert sizes <= {1, 2, 3} and 3 in sizes  # batches of 7 tiles: passes of 3, 3 and 1
    expected = comparable(recognize_image(image, Segmenter()))
    found = [dict(d, data={k: v for k, v in d["data"].items() if k != "pass_size"}) for d in result["detections"]]
    for record in found:
        if not record["data"]:
            record.pop("data")
    assert sorted(found, key=lambda r: r["box"]) == expected
    assert tilerec_keys(redis_server) == []


def test_auto_batches_are_whole_forward_passes_of_the_recognizers_batch():
    from pipeline.inference import plan
    from pipeline.options import JobOptions

    for per_pass in (1, 3, 8):
        options = JobOptions(recognizer="qrcode", params={"batch": per_pass} if per_pass > 1 else {})
        sizes = [len(batch) for batch in plan(8000, 8000, options, taper=False)]
        assert sum(sizes) == len(grid(8000, 8000, 640, 0.2))
        assert all(size % per_pass == 0 for size in sizes[:-1]) and sizes[0] >= per_pass
