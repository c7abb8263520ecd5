import numpy as np
import pytest

from pipeline import OptionsError, RecognizerError, recognize_image
from pipeline.inference import measured_tile_cost, plan
from pipeline.options import parse_options
from pipeline.scenes.codes import qr_code, qr_scene, score
from pipeline.tiling import TAIL_MIN_MS, grid
from tests.scenes import assert_each_code_once


@pytest.fixture(scope="module")
def scene():
    return qr_scene(3000, 2000, count=12, seam_share=0.5, seed=7)


def crosses_a_seam(box, windows) -> bool:
    x, y, w, h = box
    edges_x = {win.x2 for win in windows if win.x2 < 3000} | {win.x for win in windows if win.x > 0}
    edges_y = {win.y2 for win in windows if win.y2 < 2000} | {win.y for win in windows if win.y > 0}
    return any(x < e < x + w for e in edges_x) or any(y < e < y + h for e in edges_y)


def test_the_scene_really_puts_codes_across_seams(scene):
    windows = grid(2000, 3000)
    assert sum(crosses_a_seam(t.box, windows) for t in scene.truths) >= 6


def test_in_process_finds_every_code_once_with_its_box(scene):
    result = recognize_image(scene.image, "qrcode", tile=640, overlap=0.2)
    assert_each_code_once(result.to_json()["detections"], scene.truths)
    assert result.tiles == len(grid(2000, 3000))


def test_without_merging_seam_codes_are_reported_twice(scene):
    """The control for the test above: the overlap really makes tiles see codes twice."""
    result = recognize_image(scene.image, "qrcode", merge="none")
    assert score(result.detections, scene.truths).duplicates > 0


def test_a_one_tile_image():
    picture, (bx, by, bw, bh) = qr_code("solo", 4)
    image = np.full((300, 400, 3), 255, dtype=np.uint8)
    image[50 : 50 + picture.shape[0], 60 : 60 + picture.shape[1]] = picture[:, :, None]
    result = recognize_image(image, "qrcode")
    assert result.tiles == 1
    [found] = result.to_json()["detections"]
    assert found["text"] == "solo"
    assert max(abs(a - b) for a, b in zip(found["box"], (60 + bx, 50 + by, bw, bh), strict=True)) <= 3


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"tile": 0}, OptionsError, "tile must be a positive whole number"),
        ({"overlap": 1.5}, OptionsError, r"overlap must be a ratio in \[0, 1\)"),
        ({"merge": "mean"}, OptionsError, "merge must be one of"),
        ({"min_score": "high"}, OptionsError, "min_score must be a number"),
        ({"batch_size": 0}, OptionsError, "batch_size must be a positive whole number"),
        ({"colour": "red"}, RecognizerError, "has no parameter"),
    ],
)
def test_bad_options_are_refused_with_the_reason(options, error, message):
    with pytest.raises(error, match=message):
        recognize_image(np.zeros((10, 10), dtype=np.uint8), "qrcode", **options)


def test_auto_batches_follow_the_measured_tile_cost():
    options = parse_options("aruco", {})
    # 8000² at 640/0.2: 256 tiles. Measured 50 ms a tile: 8 tiles make 400 ms; the estimate (1.5 ms) would allow
    # 267, so the 16-task floor decides (16 a task); both end in a tapered tail
    costly = plan(8000, 8000, options, tile_cost_ms=50.0)
    assert max(len(batch) for batch in costly) == 8 and len(costly[-1]) == 1
    cheap = plan(8000, 8000, options)
    assert max(len(batch) for batch in cheap) == 16
    assert all(len(batch) == 1 for batch in plan(8000, 8000, options, tile_cost_ms=50.0, min_batches=256))
    # one worker process: nothing to balance, so no halving tail, 256 / 8 = 32 tasks of 8 tiles
    alone = plan(8000, 8000, options, tile_cost_ms=50.0, taper=False)
    assert [len(batch) for batch in alone] == [8] * 32


def test_auto_batches_of_a_streamed_image_stay_within_rows_of_tiles():
    options = parse_options("qrcode", {})
    # 8000² at 640/0.2: 16 rows of 16 tiles. 32 tiles a batch fit the 400 ms and 8-batch targets, but row by row
    # each batch is one row of tiles, its last row tapered down to 3 tiles (37.5 ms, the least above TAIL_MIN_MS):
    # 16 = 7 + 6 + 3
    assert max(len(batch) for batch in plan(8000, 8000, options, 12.5, min_batches=8)) == 32
    streamed = plan(8000, 8000, options, 12.5, min_batches=8, row_by_row=True)
    assert [len(batch) for batch in streamed] == [16] * 15 + [7, 6, 3]
    assert all(len({w.y for w in batch}) == 1 for batch in streamed)
    assert [w for batch in streamed for w in batch] == grid(8000, 8000)
    chosen = parse_options("qrcode", {"batch_size": 20})  # a size asked for is kept as it is
    assert plan(8000, 8000, chosen, row_by_row=True) == plan(8000, 8000, chosen)


def test_the_tail_stops_halving_where_a_batch_would_hold_less_than_tail_min_ms():
    options = parse_options("qrcode", {})
    # 256 tiles of 5 ms on 2 processes: 32 a batch, then a tail for each process down to 6 tiles (30 ms), not 1
    planned = [len(batch) for batch in plan(8000, 8000, options, 5.0, min_batches=8, processes=2)]
    assert planned == [12] + [32] * 5 + [24, 24, 12, 12, 6, 6]
    assert min(planned[1:]) * 5.0 >= TAIL_MIN_MS
    # a costly tile is worth a batch of its own: the tail halves down to one
    assert plan(8000, 8000, options, 50.0, min_batches=8, processes=2)[-1:] == [[grid(8000, 8000)[-1]]]
    # tiles so cheap that even a full batch holds less: no tail at all
    assert {len(batch) for batch in plan(8000, 8000, options, 0.01, min_batches=8, processes=2)} == {32}


def test_measured_tile_cost_is_scaled_to_a_640_tile():
    options = parse_options("aruco", {"tile": 320})
    assert measured_tile_cost([0.010, 0.030], 2000, 2000, options) == pytest.approx(80.0)  # 20 ms × 4
    assert measured_tile_cost([], 2000, 2000, options) is None
    small = parse_options("aruco", {})  # a 300x200 image is one 300x200 tile
    assert measured_tile_cost([0.006], 200, 300, small) == pytest.approx(6 * 640 * 640 / (300 * 200))
