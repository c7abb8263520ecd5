import math

import numpy as np
import pytest

from pipeline.tiling import Window, auto_batch_size, batches, grid, row_batches, tapered_batches, tapered_sizes


def covered(windows: list[Window], height: int, width: int) -> np.ndarray:
    counts = np.zeros((height, width), dtype=np.int32)
    for w in windows:
        counts[w.y : w.y2, w.x : w.x2] += 1
    return counts


def test_step_is_tile_minus_the_overlap_and_last_tile_is_flush():
    windows = grid(1000, 2000, tile=640, overlap=0.2)  # step 640 - 128 = 512
    xs = sorted({w.x for w in windows})
    ys = sorted({w.y for w in windows})
    assert xs == [0, 512, 1024, 1360]  # 1360 = 2000 - 640: flush right, full width
    assert ys == [0, 360]  # 360 = 1000 - 640
    assert all(w.width == 640 and w.height == 640 for w in windows)
    assert [w.index for w in windows] == list(range(len(windows)))


def sahi_slice_bboxes(height: int, width: int, size: int, overlap: float) -> list[list[int]]:
    """SAHI's own loop (sahi/slicing.py, get_slice_bboxes, square slices), the reference for `grid`."""
    slice_bboxes = []
    y_max = y_min = 0
    y_overlap = int(overlap * size)
    x_overlap = int(overlap * size)
    while y_max < height:
        x_min = x_max = 0
        y_max = y_min + size
        while x_max < width:
            x_max = x_min + size
            if y_max > height or x_max > width:
                xmax = min(width, x_max)
                ymax = min(height, y_max)
                xmin = max(0, xmax - size)
                ymin = max(0, ymax - size)
                slice_bboxes.append([xmin, ymin, xmax, ymax])
            else:
                slice_bboxes.append([x_min, y_min, x_max, y_max])
            x_min = x_max - x_overlap
        y_min = y_max - y_overlap
    return slice_bboxes


def test_windows_are_sahis_slices():
    rng = np.random.default_rng(11)
    for _ in range(3000):
        height, width = (int(v) for v in rng.integers(1, 3000, 2))
        tile = int(rng.integers(64, 1024))
        overlap = round(float(rng.uniform(0, 0.9)), int(rng.integers(1, 4)))
        expected = sahi_slice_bboxes(height, width, tile, overlap)
        found = [[w.x, w.y, w.x2, w.y2] for w in grid(height, width, tile, overlap)]
        assert found == expected, (height, width, tile, overlap)
    # where rounding and truncating differ: 100 * 0.29 is 28.999…, a step of 72 as in SAHI (round() gave 71)
    assert sorted({w.x for w in grid(100, 300, 100, 0.29)}) == [0, 72, 144, 200]


def test_every_pixel_is_covered_and_nothing_leaves_the_image():
    for height, width, tile, overlap in [(1000, 2000, 640, 0.2), (777, 1301, 256, 0.35), (641, 641, 640, 0.0)]:
        windows = grid(height, width, tile, overlap)
        assert covered(windows, height, width).min() >= 1
        assert all(w.x >= 0 and w.y >= 0 and w.x2 <= width and w.y2 <= height for w in windows)


def test_exact_fit_has_no_extra_flush_tile():
    windows = grid(1152, 1152, tile=640, overlap=0.2)  # 0 and 512 reach 1152 exactly
    assert sorted({w.x for w in windows}) == [0, 512]
    assert len(windows) == 4


def test_image_smaller_than_a_tile_is_one_tile_of_its_own_size():
    assert grid(300, 500, tile=640) == [Window(0, 0, 0, 500, 300)]


def test_one_side_smaller_than_a_tile():
    windows = grid(200, 1500, tile=640, overlap=0.0)
    assert [(w.x, w.width, w.height) for w in windows] == [(0, 640, 200), (640, 640, 200), (860, 640, 200)]


def test_zero_overlap_tiles_do_not_overlap_except_the_flush_one():
    windows = grid(1280, 1280, tile=640, overlap=0.0)
    assert covered(windows, 1280, 1280).max() == 1


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [(0, 0.2, "tile"), (-5, 0.2, "tile"), (64.5, 0.2, "tile"), ("640", 0.2, "tile"), (True, 0.2, "tile"),
     (640, 1.0, "overlap"), (640, -0.1, "overlap"), (640, "0.2", "overlap")],
)  # fmt: skip
def test_bad_tiling_is_refused_with_the_reason(tile, overlap, message):
    with pytest.raises(ValueError, match=message):
        grid(1000, 1000, tile, overlap)


def test_window_round_trips_through_a_list():
    window = Window(7, 10, 20, 640, 480)
    assert Window.from_list(window.to_list()) == window


def test_batches_keep_order_and_cover_every_window():
    windows = grid(3000, 3000, tile=640)
    planned = batches(windows, 4)
    assert [w for batch in planned for w in batch] == windows
    assert all(len(batch) == 4 for batch in planned[:-1])


def test_auto_batch_size_groups_cheap_tiles_but_keeps_workers_busy():
    assert auto_batch_size(tiles=10000, tile_cost_ms=1.5) == 267  # ceil(400 ms / 1.5 ms) tiles per batch
    assert auto_batch_size(tiles=400, tile_cost_ms=60) == 7  # ceil(400 / 60): even costly tiles share a task
    assert auto_batch_size(tiles=400, tile_cost_ms=500) == 1  # a tile that outweighs the overhead goes alone
    assert auto_batch_size(tiles=32, tile_cost_ms=1.5) == 2  # still 16 tasks to spread
    assert auto_batch_size(tiles=1, tile_cost_ms=1.5) == 1


def test_auto_batch_size_gives_a_big_job_a_few_batches_per_process_of_the_cluster():
    # 10,000 tiles of 200 ms: 2 a batch by cost (400 ms); 64 processes take 8 batches each of 20 tiles (4 s)
    assert auto_batch_size(tiles=10000, tile_cost_ms=200, min_batches=32) == 2
    assert auto_batch_size(tiles=10000, tile_cost_ms=200, min_batches=32, processes=64) == 20  # ceil(10000 / 512)
    # 2 processes: 625 tiles each would be 125 s a batch; 10 s at most (50 tiles), so a growing cluster gets some
    assert auto_batch_size(tiles=10000, tile_cost_ms=200, min_batches=8, processes=2) == 50
    # a small job stays in 400 ms batches, and the tiling node's spread still caps a batch
    assert auto_batch_size(tiles=300, tile_cost_ms=200, min_batches=32, processes=64) == 2
    assert auto_batch_size(tiles=10000, tile_cost_ms=200, min_batches=1000, processes=4) == 10  # ceil(10000 / 1000)


def test_a_tail_of_halving_batches_for_each_process_that_finishes_together():
    # 3 processes: three batches of each halving, 3 * (8 + 4 + 2 + 1) = 45; then 3 * 16, and the remainder first
    assert tapered_sizes(100, 16, lanes=3) == [7] + [16] * 3 + [8] * 3 + [4] * 3 + [2] * 3 + [1] * 3
    assert tapered_sizes(5, 16, lanes=4) == [1] * 5  # too few tiles for every lane: what there is
    assert tapered_sizes(256, 16, lanes=1) == tapered_sizes(256, 16)


def test_tapered_sizes_end_in_halving_batches_and_cover_everything():
    # 256 = 1 + 15 * 16 + (8 + 4 + 2 + 1): the tail halves down to one tile, the remainder goes first
    assert tapered_sizes(256, 16) == [1] + [16] * 15 + [8, 4, 2, 1]
    assert tapered_sizes(10, 1) == [1] * 10
    assert tapered_sizes(0, 4) == []
    for total in range(1, 300, 7):
        for size in (1, 2, 3, 5, 16, 134):
            sizes = tapered_sizes(total, size)
            assert sum(sizes) == total and min(sizes) >= 1 and max(sizes) <= size
            assert sizes[-1] == 1, "the last task is a single tile"
            assert len(sizes) <= math.ceil(total / size) + math.ceil(math.log2(size)) + 1


def test_tapered_batches_keep_order():
    windows = grid(3000, 4000, 640, 0.2)
    planned = tapered_batches(windows, 8)
    assert [w for batch in planned for w in batch] == windows
    assert [len(batch) for batch in planned] == tapered_sizes(len(windows), 8)


def test_row_batches_never_span_two_rows_of_tiles():
    windows = grid(1500, 2500, 640, 0.2)  # rows of tiles at y 0, 512, 860; 5 tiles a row
    assert [w.y for w in windows] == [0] * 5 + [512] * 5 + [860] * 5
    planned = row_batches(windows, 3)
    # each row cut into 3 + 2, the last one tapered (2, 2, 1: it ends in a single tile)
    assert [[w.index for w in batch] for batch in planned] == [
        [0, 1, 2],
        [3, 4],
        [5, 6, 7],
        [8, 9],
        [10, 11],
        [12, 13],
        [14],
    ]
    # a row fits in a batch of 8; the last row is tapered as tapered_sizes(5, 8) == [2, 2, 1]
    assert [[w.index for w in batch] for batch in row_batches(windows, 8)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11],
        [12, 13],
        [14],
    ]
    assert [len(batch) for batch in row_batches(windows, 8, taper=False)] == [5, 5, 5]
    assert row_batches(grid(300, 400, 640, 0.2), 4) == [grid(300, 400, 640, 0.2)]  # one tile
    assert row_batches([], 4) == []
