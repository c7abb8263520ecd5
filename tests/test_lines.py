"""Text lines joined across seams and put in reading order (pipeline.merge.lines): pure geometry, fast."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.merge.lines import join_lines, layout, line_axes, page_angle, page_text, word_count
from pipeline.model import Detections
from pipeline.recognizers.text import lines_from_obb, oriented_lines
from pipeline.shapes import obb_corners


def pieces(boxes: list[tuple[float, float, float, float, float]], cut: list[bool] | None = None) -> Detections:
    """Line detections from oriented boxes (cx, cy, w, h, angle)."""
    found = lines_from_obb(np.array(boxes, dtype=np.float64), np.full(len(boxes), 0.9))
    if cut is not None:
        found.cut = np.array(cut)
    return found


def along(x1: float, x2: float, y: float, h: float = 30.0, angle: float = 0.0) -> tuple[float, ...]:
    """A horizontal box from x1 to x2 centred on y, turned by `angle` about the page's origin."""
    theta = np.radians(angle)
    cx, cy = (x1 + x2) / 2, y
    return (cx * np.cos(theta) - cy * np.sin(theta), cx * np.sin(theta) + cy * np.cos(theta), x2 - x1, h, angle)


def spans(found: Detections) -> list[tuple[float, float]]:
    """Each line's extent along its axis, sorted."""
    axes = line_axes(found.obb)
    return sorted((round(cx - w / 2, 1), round(cx + w / 2, 1)) for cx, _, w, _, _ in axes)


def test_a_line_cut_by_one_seam_is_one_line() -> None:
    joined = join_lines(pieces([along(100, 640, 300), along(512, 900, 300)], cut=[True, True]))
    assert spans(joined) == [(100.0, 900.0)]
    assert not joined.cut.any()


def test_a_line_cut_by_two_seams_is_one_line() -> None:
    joined = join_lines(pieces([along(100, 640, 300), along(512, 1152, 300), along(1024, 1400, 300)]))
    assert spans(joined) == [(100.0, 1400.0)]


def test_a_line_longer_than_three_tiles_is_one_line_whatever_the_order() -> None:
    chain = [along(512 * k, 512 * k + 640, 300) for k in range(6)]
    for seed in range(5):
        shuffled = [chain[k] for k in np.random.default_rng(seed).permutation(len(chain))]
        assert spans(join_lines(pieces(shuffled))) == [(0.0, 3200.0)]


def test_pieces_that_touch_across_a_small_gap_join_and_a_gutter_does_not() -> None:
    assert spans(join_lines(pieces([along(100, 600, 300), along(605, 900, 300)]))) == [(100.0, 900.0)]
    two_columns = join_lines(pieces([along(100, 600, 300), along(640, 1100, 300)]))  # a gutter of 40 px, 30 px tall
    assert spans(two_columns) == [(100.0, 600.0), (640.0, 1100.0)]


def test_duplicate_views_collapse() -> None:
    joined = join_lines(pieces([along(100, 500, 300), along(100.5, 499, 301), along(99, 500, 299.5)]))
    assert len(joined) == 1


def test_close_lines_above_one_another_stay_apart_even_cut_by_seams() -> None:
    # lines 30 px tall at a 34 px pitch: their boxes overlap by nothing, and pieces of each meet at x = 512..640
    rows = [y for y in (300.0, 334.0, 368.0)]
    found = pieces([box for y in rows for box in (along(100, 640, y), along(512, 1000, y))], cut=[True] * 6)
    joined = join_lines(found)
    assert len(joined) == 3
    assert sorted(np.round(joined.obb[:, 1]).tolist()) == rows
    assert spans(joined) == [(100.0, 1000.0)] * 3


def test_overlapping_boxes_of_neighbouring_lines_stay_apart() -> None:
    # unclipped detector boxes of tight lines overlap by a third of their height
    joined = join_lines(pieces([along(100, 900, 300, h=30), along(100, 900, 320, h=30)]))
    assert len(joined) == 2


def test_a_tall_block_does_not_swallow_the_lines_it_covers() -> None:
    found = pieces([along(100, 900, 300), along(100, 900, 334), along(100, 900, 317, h=64)])
    assert len(join_lines(found)) == 3


def test_a_seam_sliver_inside_a_line_is_dropped_into_it() -> None:
    # a horizontal seam through a line: one tile saw only its top 12 px
    found = pieces([along(100, 900, 300, h=30), along(120, 880, 291, h=12)], cut=[False, True])
    joined = join_lines(found)
    assert len(joined) == 1 and spans(joined) == [(100.0, 900.0)]
    uncut = pieces([along(100, 900, 300, h=30), along(120, 880, 291, h=12)], cut=[False, False])
    assert len(join_lines(uncut)) == 2  # not a seam's doing: left to the detector


@pytest.mark.parametrize("angle", [30.0, 89.0, 90.0, -45.0, 5.0])
def test_turned_lines_join_along_their_own_direction(angle: float) -> None:
    joined = join_lines(pieces([along(100, 640, 300, angle=angle), along(512, 900, 300, angle=angle)]))
    assert len(joined) == 1
    assert joined.obb[0, 2] == pytest.approx(800, abs=1)
    assert joined.obb[0, 3] == pytest.approx(30, abs=1)


def test_line_ends_too_short_for_a_direction_join_their_lines_not_each_other() -> None:
    # a tile's edge at x = 1024 leaves it the last 40 px of three lines 48 px apart: near-square boxes, one taken
    # as upright by its smallest rectangle
    ends = [(1044, 551, 46, 40, 90.0), (1040, 599, 40, 32, 90.0), (1044, 648, 42, 42, 90.0)]
    lines = [along(232, 1060, y) for y in (551, 599, 648)]
    joined = join_lines(pieces(lines + ends, cut=[True] * 6))
    assert len(joined) == 3 and sorted(np.round(joined.obb[:, 1]).tolist()) == [551, 599, 648]
    assert len(join_lines(pieces(ends, cut=[True] * 3))) == 3


def test_lines_crossing_at_an_angle_do_not_join() -> None:
    assert len(join_lines(pieces([along(100, 900, 300), (500, 300, 800, 30, 40)]))) == 2


def test_boxes_without_an_axis_and_other_labels_pass_through() -> None:
    lines = pieces([along(100, 640, 300), along(512, 900, 300)])
    lines.labels[1] = "stamp"
    boxes = Detections(np.array([[0, 0, 50, 50]]), np.array([0.5]), ["seal"])
    assert len(join_lines(Detections.concat([lines, boxes]))) == 3


def test_oriented_lines_run_along_the_longer_side() -> None:
    quads = obb_corners(np.array([[100, 100, 30, 400, 0], [300, 300, 400, 30, 10], [50, 50, 200, 20, -100]]))
    boxes = oriented_lines(quads)
    assert boxes[:, 2] == pytest.approx([400, 400, 200], abs=0.5)
    assert boxes[:, 3] == pytest.approx([30, 30, 20], abs=0.5)
    assert ((boxes[:, 4] > -90) & (boxes[:, 4] <= 90)).all()
    assert boxes[1, 4] == pytest.approx(10, abs=0.5) and boxes[2, 4] == pytest.approx(80, abs=0.5)


def two_column_page(angle: float = 0.0) -> tuple[np.ndarray, list[int]]:
    """A heading over two columns of two paragraphs each, turned by `angle` (reading direction too); the boxes in a
    shuffled order and the reading order as indices into them."""
    placed = [along(100, 1700, 100, angle=angle)]  # the heading
    for x1, x2 in ((100, 850), (950, 1700)):
        for first in (200, 420):
            placed += [along(x1, x2 - 60 * (k == 3), first + 40 * k, angle=angle) for k in range(4)]
    placed.append(along(600, 1200, 700, angle=angle))  # a footer across the gutter
    shuffle = np.random.default_rng(3).permutation(len(placed))
    boxes = np.array([placed[k] for k in shuffle])
    return boxes, [int(np.flatnonzero(shuffle == k)[0]) for k in range(len(placed))]


@pytest.mark.parametrize("angle", [0.0, 90.0, 180.0, -90.0, 4.0, -3.0])
def test_reading_order_goes_down_each_column_then_the_next(angle: float) -> None:
    boxes, expected = two_column_page(angle)
    page = layout(boxes)
    assert page.order.tolist() == expected
    assert page.angle == pytest.approx(angle if angle != -180 else 180, abs=0.5)
    in_order = [(int(page.column[k]), int(page.block[k])) for k in expected]
    # the heading, the first column's paragraphs, the second column's, the footer: each a column of its own
    assert [c for c, _ in in_order] == [0] + [1] * 8 + [2] * 8 + [3]
    assert [b for _, b in in_order] == [0] + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5]


def test_a_shorter_second_column_is_read_after_the_whole_first() -> None:
    boxes = [along(100, 800, 100 + 40 * k) for k in range(10)] + [along(900, 1600, 100 + 40 * k) for k in range(3)]
    assert layout(np.array(boxes)).order.tolist() == list(range(13))


def test_two_column_articles_one_above_the_other_are_read_one_after_the_other() -> None:
    article = [(x1, x2, y) for y in (100, 140, 180) for x1, x2 in ((100, 800), (900, 1600))]
    columnwise = [0, 2, 4, 1, 3, 5]
    boxes = [along(x1, x2, y) for x1, x2, y in article] + [along(x1, x2, y + 250) for x1, x2, y in article]
    assert layout(np.array(boxes)).order.tolist() == columnwise + [6 + k for k in columnwise]


def test_a_ragged_right_margin_is_no_gutter() -> None:
    """A heading whose line ends short of the right column's first line: the margin both leave at the right is not
    a gutter, so the heading does not pull the right column's first line ahead of the left column."""
    heading = along(200, 1240, 160, h=90)
    left = [along(240, 1050, 346 + 48 * k, h=46) for k in range(4)]
    right = [along(1140, 1860 + 50 * (k == 1), 346 + 48 * k, h=46) for k in range(4)]
    assert layout(np.array([heading, *left, *right])).order.tolist() == list(range(9))


def test_words_on_one_row_read_left_to_right() -> None:
    boxes = np.array([along(600, 900, 102), along(100, 400, 100), along(100, 400, 140)])
    assert layout(boxes, gutter=20).order.tolist() == [1, 0, 2]


def test_page_text_and_word_count() -> None:
    boxes, expected = two_column_page()
    texts = [""] * len(boxes)
    for n, k in enumerate(expected):
        texts[k] = f"line {n}"
    texts[expected[2]] = "  spaced \t out  "
    texts[expected[3]] = " "  # read as nothing: left out
    text = page_text(texts, layout(boxes))
    assert text.split("\n")[:7] == ["line 0", "", "line 1", "spaced out", "line 4", "", "line 5"]
    assert word_count(text) == 2 * (len(boxes) - 1)


def test_page_angle_is_the_dominant_direction() -> None:
    angles = np.array([179.0, -179.0, 178.0, 90.0])
    assert abs(page_angle(angles, np.array([100.0, 100.0, 100.0, 50.0]))) == pytest.approx(179.33, abs=0.1)
    assert page_angle(np.zeros(0), np.zeros(0)) == 0.0


def test_an_empty_page_has_no_order() -> None:
    page = layout(np.zeros((0, 5)))
    assert page.order.size == 0 and page_text([], page) == ""
