"""Text lines across tile seams, and the reading order of a page's lines. Pure geometry on oriented boxes.

Joining (`join_lines`): two pieces are one line when they run the same way, are as tall as each other, lie on one
axis (their extents across the line overlap by most of the thinner one's height), and overlap or touch along it. A
seam cuts a line into pieces that overlap in the band both tiles saw; the pieces of a line longer than several
tiles chain; a line seen whole by two tiles is the same line twice. Lines above one another share too little of
their height, and columns side by side leave a gutter wider than `max_gap` heights between them: neither joins.
A seam-cut sliver (a seam running along a line leaves one tile the top half of it) lying inside another line is
dropped into it.

Reading order (`layout`): the page's direction is the lines' dominant reading direction; in that frame, the lines
are cut recursively at gutters (columns, left to right) and at blank bands across the whole region (top to
bottom), bands that continue one gutter being kept together, so two columns are read each whole (but for a blank
band taller than three lines: articles one above the other are read one after the other). Within a column,
lines read top to bottom, those on one row left to right, and a gap taller than a line starts a new block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.model import Detections
from pipeline.shapes import obb_corners, overlapping_pairs

MAX_ANGLE = 10.0  # degrees between two pieces of one line (both long enough to have a direction)
MAX_HEIGHT_RATIO = 1.6  # taller / shorter piece of one line
MIN_AXIS_SHARE = 0.6  # the pieces' extents across the line overlap by this share of the thinner one's
MAX_GAP = 0.3  # along the line, a gap of at most this many heights (negative: an overlap) joins
SLIVER_INSIDE = 0.75  # a seam-cut piece this much inside a thicker line (along and across it) is part of it
ELONGATED = 2.0  # a piece at least this many heights long has a direction of its own


def line_axes(obb: np.ndarray) -> np.ndarray:
    """(N, 5) boxes with the width along the longer side and the angle in (-90, 90]: each line's axis, up to a half
    turn."""
    boxes = np.asarray(obb, dtype=np.float64).reshape(-1, 5).copy()
    tall = boxes[:, 3] > boxes[:, 2]
    boxes[tall, 2], boxes[tall, 3] = boxes[tall, 3], boxes[tall, 2].copy()
    boxes[tall, 4] -= 90
    boxes[:, 4] = 90 - np.mod(90 - boxes[:, 4], 180)
    return boxes


def _extents(corners: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, 2) intervals of each box's corners (K, 4, 2) along the direction `angle` (degrees) and across it."""
    theta = np.radians(angle)[:, None]
    along = corners[..., 0] * np.cos(theta) + corners[..., 1] * np.sin(theta)
    across = -corners[..., 0] * np.sin(theta) + corners[..., 1] * np.cos(theta)
    return np.stack([along.min(1), along.max(1)], 1), np.stack([across.min(1), across.max(1)], 1)


def _share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The length two (K, 2) intervals share (negative: the gap between them)."""
    return np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0])


def joined_pairs(axes: np.ndarray, cut: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Which candidate pairs (i, j) of line boxes are pieces of one line (see the module's docstring).

    Args:
        axes: (N, 5) boxes from `line_axes`.
        cut: (N,) the box touches an inner tile border.
        i, j: the candidate pairs.

    Returns:
        (K,) bool, per pair.
    """
    longer = np.where(axes[i, 2] >= axes[j, 2], i, j)
    shorter = np.where(longer == i, j, i)
    angle = axes[longer, 4]  # the longer piece's direction measures both
    corners = obb_corners(axes)
    along_l, across_l = _extents(corners[longer], angle)
    along_s, across_s = _extents(corners[shorter], angle)
    height_l, height_s = across_l[:, 1] - across_l[:, 0], across_s[:, 1] - across_s[:, 0]
    thinner = np.maximum(np.minimum(height_l, height_s), 1e-6)
    turn = np.abs((axes[i, 4] - axes[j, 4] + 90) % 180 - 90)
    directed = (axes[shorter, 2] >= ELONGATED * axes[shorter, 3]) & (axes[longer, 2] >= ELONGATED * axes[longer, 3])
    aligned = ~directed | (turn <= MAX_ANGLE)
    across = _share(across_l, across_s)
    along = _share(along_l, along_s)
    # two pieces too short to have a direction (a line's last letters at a tile's edge) cannot tell which way the
    # line runs: they join only where they overlap, as one piece seen twice, never by touching end to end
    short_len = np.maximum(along_s[:, 1] - along_s[:, 0], 1e-6)
    reach = np.where(axes[longer, 2] >= ELONGATED * axes[longer, 3], -MAX_GAP * thinner, 0.5 * short_len)
    piece = (
        aligned
        & (np.maximum(height_l, height_s) <= MAX_HEIGHT_RATIO * thinner)
        & (across >= MIN_AXIS_SHARE * thinner)
        & (along >= reach)
    )
    # the thinner piece inside the thicker one, along the line and across it
    thin_is_short = height_s <= height_l
    thin_len = np.where(thin_is_short, along_s[:, 1] - along_s[:, 0], along_l[:, 1] - along_l[:, 0])
    thin_cut = np.where(thin_is_short, cut[shorter], cut[longer])
    sliver = (
        (turn <= MAX_ANGLE)
        & thin_cut
        & (along >= SLIVER_INSIDE * np.maximum(thin_len, 1e-6))
        & (across >= SLIVER_INSIDE * thinner)
    )
    return piece | sliver


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The connected component of each of n nodes joined by edges (i, j), numbered by their smallest node."""
    parent = list(range(n))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(k) for k in range(n)], dtype=np.int64)


def hull_box(corners: np.ndarray, angle: float) -> np.ndarray:
    """The box (cx, cy, w, h, angle) at `angle` around a set of points (M, 2)."""
    along, across = _extents(corners.reshape(1, -1, 2), np.array([angle]))
    (a0, a1), (c0, c1) = along[0], across[0]
    theta = np.radians(angle)
    mid_a, mid_c = (a0 + a1) / 2, (c0 + c1) / 2
    centre = (mid_a * np.cos(theta) - mid_c * np.sin(theta), mid_a * np.sin(theta) + mid_c * np.cos(theta))
    return np.array([centre[0], centre[1], a1 - a0, c1 - c0, angle])


def join_lines(detections: Detections) -> Detections:
    """Detections whose line boxes (`obb`) that are pieces of one line are joined into one: its box around all the
    pieces' corners, along the longest piece's direction; its score the best piece's. Detections without an
    oriented box, and pairs of different labels, are left as they are.

    Args:
        detections: placed tile detections, in image coordinates.

    Returns:
        The joined detections: each joined line once, not cut; the rest unchanged.
    """
    if len(detections) < 2 or not detections.has("obb"):
        return detections
    has = np.flatnonzero(detections.with_obb())
    lines = detections[has]
    axes = line_axes(lines.obb)
    reach = np.maximum(axes[:, 3:4], 1.0) * MAX_GAP  # touching pieces' boxes meet within a gap
    i, j = overlapping_pairs(np.hstack([lines.xyxy[:, :2] - reach, lines.xyxy[:, 2:] + reach]))
    same = lines.labels[i] == lines.labels[j]
    i, j = i[same], j[same]
    keep = joined_pairs(axes, lines.cut, i, j)
    group = _components(len(lines), i[keep], j[keep])
    leaders = np.unique(group)
    if len(leaders) == len(lines):
        return detections
    corners = obb_corners(axes)
    obb, scores, xyxy, cut = axes.copy(), lines.scores.copy(), lines.xyxy.copy(), lines.cut.copy()
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    for members in np.split(order, starts[1:]):
        if len(members) < 2:
            continue
        first = members[0]
        longest = members[np.argmax(axes[members, 2])]
        obb[first] = hull_box(corners[members], axes[longest, 4])
        scores[first] = lines.scores[members].max()
        xyxy[first] = [*corners[members].reshape(-1, 2).min(0), *corners[members].reshape(-1, 2).max(0)]
        cut[first] = False
    joined = lines._with(scores=scores, obb=obb, xyxy=xyxy, cut=cut)[leaders]
    rest = np.setdiff1d(np.arange(len(detections)), has)
    return Detections.concat([joined, detections[rest]])


@dataclass(frozen=True)
class Layout:
    """A page's reading order: `order` lists line indices in reading order; `column` and `block` give each line's
    column and block (paragraph), numbered in reading order; `angle` is the page's reading direction in degrees
    clockwise (0: upright; 90: turned a quarter clockwise; 180: upside down)."""

    order: np.ndarray
    column: np.ndarray
    block: np.ndarray
    angle: float


def page_angle(angles: np.ndarray, lengths: np.ndarray) -> float:
    """The dominant reading direction of lines (degrees in (-180, 180]): the length-weighted mean direction of the
    lines within 30° of the most common one."""
    if not len(angles):
        return 0.0
    bins = np.round(np.mod(angles, 360)).astype(np.int64) % 360
    votes = np.bincount(bins, weights=lengths, minlength=360)
    smoothed = sum(np.roll(votes, k) for k in range(-15, 16))
    mode = float(np.argmax(smoothed))
    offset = (angles - mode + 180) % 360 - 180
    near = np.abs(offset) <= 30
    mean = mode + float(np.average(offset[near], weights=lengths[near])) if near.any() else mode
    return float(180 - np.mod(180 - mean, 360))


def _free(intervals: np.ndarray, low: float, high: float, min_width: float) -> list[tuple[float, float]]:
    """The gaps at least `min_width` wide that (K, 2) intervals leave within [low, high]."""
    gaps, reach = [], low
    for start, stop in intervals[np.argsort(intervals[:, 0])].tolist():
        if start - reach >= min_width:
            gaps.append((reach, start))
        reach = max(reach, stop)
    if high - reach >= min_width:
        gaps.append((reach, high))
    return gaps


def _common(a: list[tuple[float, float]], b: list[tuple[float, float]], min_width: float) -> list[tuple[float, float]]:
    """The parts of two sets of gaps that both have, at least `min_width` wide."""
    shared = [(max(a0, b0), min(a1, b1)) for a0, a1 in a for b0, b1 in b]
    return [(s, e) for s, e in shared if e - s >= min_width]


def _bands(boxes: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    """The members split at blank bands across the whole region, top to bottom."""
    order = members[np.argsort(boxes[members, 1], kind="stable")]
    bands, current, bottom = [], [order[0]], boxes[order[0], 3]
    for k in order[1:].tolist():
        if boxes[k, 1] >= bottom:
            bands.append(np.array(current))
            current = []
        current.append(k)
        bottom = max(bottom, boxes[k, 3]) if len(current) > 1 else boxes[k, 3]
    bands.append(np.array(current))
    return bands


def _columns(boxes: np.ndarray, members: np.ndarray, gutter: float) -> list[np.ndarray]:
    """The members split at gutters (vertical gaps at least `gutter` wide through the whole region), left to right;
    one part when there is none."""
    gaps = _free(boxes[members][:, [0, 2]], boxes[members, 0].min(), boxes[members, 2].max(), gutter)
    if not gaps:
        return [members]
    edges = [stop for _, stop in gaps]
    side = np.searchsorted(np.array(edges), boxes[members, 0], side="right")
    return [members[side == k] for k in range(len(edges) + 1) if (side == k).any()]


def _sections(bands: list[np.ndarray], boxes: np.ndarray, section: float) -> list[np.ndarray]:
    """Bands (top to bottom) joined into sections, a blank band taller than `section` between two sections."""
    parts, bottom = [], -np.inf
    for band in bands:
        if boxes[band, 1].min() - bottom > section or not parts:
            parts.append([band])
        else:
            parts[-1].append(band)
        bottom = max(bottom, boxes[band, 3].max())
    return [np.concatenate(part) for part in parts]


def _cut(boxes: np.ndarray, members: np.ndarray, gutter: float, section: float) -> list[list[np.ndarray]]:
    """The region's columns in reading order, each a list of runs of lines (leaves of the recursive cut), top to
    bottom; bands that are one column each (a heading, then a paragraph) make one column together. Consecutive
    bands that continue one gutter are read as columns together, unless a blank band taller than `section` parts
    them (two articles one above the other)."""
    if len(members) < 2:
        return [[members]]
    sections = _sections(_bands(boxes, members), boxes, section)
    if len(sections) > 1:
        return [column for part in sections for column in _cut(boxes, part, gutter, section)]
    parts = _columns(boxes, members, gutter)
    if len(parts) > 1:
        return [column for part in parts for column in _cut(boxes, part, gutter, section)]
    bands = _bands(boxes, members)
    if len(bands) == 1:
        return [[members]]
    low, high = boxes[members, 0].min(), boxes[members, 2].max()
    groups: list[list[np.ndarray]] = []
    shared: list[tuple[float, float]] = []
    for band in bands:
        free = _free(boxes[band][:, [0, 2]], low, high, gutter)
        # a gutter has text on both sides: a margin that ragged lines leave at the region's edge is none
        common = [(a, b) for a, b in _common(shared, free, gutter) if a > low and b < high] if groups else []
        if common:
            groups[-1].append(band)
            shared = common
        else:
            groups.append([band])
            shared = free
    columns: list[list[np.ndarray]] = []
    single = False
    for group in groups:
        found = _cut(boxes, np.concatenate(group), gutter, section) if len(group) > 1 else [[group[0]]]
        if single and len(found) == 1:
            columns[-1].extend(found[0])
        else:
            columns.extend(found)
        single = len(found) == 1
    return columns


def _rows(boxes: np.ndarray, members: np.ndarray) -> list[np.ndarray]:
    """A column's lines in rows, top to bottom, each row left to right: a line joins the row whose first line's
    middle it covers."""
    order = members[np.argsort(boxes[members, 1], kind="stable")]
    rows: list[list[int]] = []
    for k in order.tolist():
        if rows and boxes[k, 1] <= (boxes[rows[-1][0], 1] + boxes[rows[-1][0], 3]) / 2:
            rows[-1].append(k)
        else:
            rows.append([k])
    return [np.array(sorted(row, key=lambda k: boxes[k, 0])) for row in rows]


def layout(obb: np.ndarray, gutter: float = 1.0, block_gap: float = 0.9, section_gap: float = 3.0) -> Layout:
    """The reading order of a page's lines.

    Args:
        obb: (N, 5) line boxes whose x axis is each line's reading direction (angle in degrees clockwise).
        gutter: the narrowest gap between columns, in median line heights.
        block_gap: a vertical gap between lines wider than this many line heights starts a new block.
        section_gap: a blank band taller than this many line heights ends a run of columns (articles one above the
            other are read one after the other).

    Returns:
        The lines' `Layout`.
    """
    obb = np.asarray(obb, dtype=np.float64).reshape(-1, 5)
    n = len(obb)
    if not n:
        return Layout(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0)
    angle = page_angle(obb[:, 4], obb[:, 2])
    along, across = _extents(obb_corners(obb), np.full(n, angle))
    boxes = np.column_stack([along[:, 0], across[:, 0], along[:, 1], across[:, 1]])  # x1, y1, x2, y2 on the page
    height = float(np.median(boxes[:, 3] - boxes[:, 1]))
    order, column, block = [], np.zeros(n, np.int64), np.zeros(n, np.int64)
    blocks = -1
    for number, runs in enumerate(_cut(boxes, np.arange(n), gutter * height, section_gap * height)):
        bottom = None
        for row in (row for run in runs for row in _rows(boxes, run)):
            top = boxes[row, 1].min()
            if bottom is None or top - bottom > block_gap * height:
                blocks += 1
            bottom = boxes[row, 3].max()
            column[row], block[row] = number, blocks
            order.extend(row.tolist())
    return Layout(np.array(order, dtype=np.int64), column, block, angle)


def page_text(texts: Sequence[str], page: Layout) -> str:
    """The page's text in reading order: a line per line, a blank line between blocks, lines without text left out."""
    parts: list[str] = []
    previous = None
    for k in page.order.tolist():
        text = " ".join(str(texts[k] or "").split())
        if not text:
            continue
        if previous is not None and page.block[k] != previous:
            parts.append("")
        parts.append(text)
        previous = page.block[k]
    return "\n".join(parts)


def word_count(text: str) -> int:
    """Words in a text: runs of characters between white space."""
    return len(text.split())
