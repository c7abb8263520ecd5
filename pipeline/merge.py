"""Placing tile detections in the image and merging duplicates across tile seams (NMS, greedy NMM), vectorised.

Candidate pairs come from grid bucketing, so the cost grows with the number of overlapping boxes, not with N².
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.model import Detections
from pipeline.tiling import Window

MergeMethod = Literal["greedy_nmm", "nms", "none"]
MatchMetric = Literal["ios", "iou"]
MERGE_METHODS = ("greedy_nmm", "nms", "none")
MATCH_METRICS = ("ios", "iou")


def place(
    detections: Detections,
    window: Window,
    width: int,
    height: int,
    seam_margin: float = 2.0,
) -> Detections:
    """Tile coordinates to image coordinates, clamped to the image.

    A box within `seam_margin` pixels of a window edge that is not an image edge is marked `cut`: the object
    may go on in the neighbouring tile, which then saw more of it, so the merge prefers that other view.
    """
    if not len(detections):
        return detections
    x1, y1, x2, y2 = detections.xyxy.T
    inner_left, inner_top = window.x > 0, window.y > 0
    inner_right, inner_bottom = window.x2 < width, window.y2 < height
    cut = (
        (inner_left & (x1 <= seam_margin))
        | (inner_top & (y1 <= seam_margin))
        | (inner_right & (x2 >= window.width - seam_margin))
        | (inner_bottom & (y2 >= window.height - seam_margin))
    )
    placed = detections.shifted(window.x, window.y)
    placed.cut = placed.cut | cut
    return placed.clipped(width, height)


def box_metric(a: np.ndarray, b: np.ndarray, metric: MatchMetric = "ios") -> np.ndarray:
    """Element-wise IOU or IOS (intersection over the smaller area) of two (K, 4) xyxy arrays."""
    inter_w = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    inter_h = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    inter = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    if metric == "iou":
        denominator = area_a + area_b - inter
    elif metric == "ios":
        denominator = np.minimum(area_a, area_b)
    else:
        raise ValueError(f"match_metric must be one of {MATCH_METRICS}, got {metric!r}")
    return np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)


def _expand_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each k, the pairs (k, m) with starts[k] <= m < ends[k], as two flat arrays."""
    counts = (ends - starts).clip(min=0)
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offsets


def overlapping_pairs(xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of boxes that intersect, found through a uniform grid of cells.

    Each box is entered into every cell it covers; only boxes sharing a cell are compared. The cell side is
    twice the median box side, so small boxes share few cells and a rare huge box costs only its own cells.
    """
    n = len(xyxy)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sides = np.maximum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])
    cell = max(float(np.median(sides)) * 2.0, 1.0)
    origin = xyxy[:, :2].min(axis=0)
    c1 = np.floor((xyxy[:, :2] - origin) / cell).astype(np.int64)
    c2 = np.floor((xyxy[:, 2:] - origin) / cell).astype(np.int64)
    span = c2 - c1 + 1
    columns = int(c2[:, 0].max()) + 1
    # one entry per (box, covered cell)
    box_of_entry = np.repeat(np.arange(n), span[:, 0] * span[:, 1])
    local = np.arange(len(box_of_entry)) - np.repeat(
        np.cumsum(span[:, 0] * span[:, 1]) - span[:, 0] * span[:, 1],
        span[:, 0] * span[:, 1],
    )
    cx = c1[box_of_entry, 0] + local % span[box_of_entry, 0]
    cy = c1[box_of_entry, 1] + local // span[box_of_entry, 0]
    cell_id = cy * columns + cx
    order = np.lexsort((box_of_entry, cell_id))
    cell_id, box_of_entry = cell_id[order], box_of_entry[order]
    group_end = np.searchsorted(cell_id, cell_id, side="right")
    first, second = _expand_ranges(np.arange(len(cell_id)) + 1, group_end)
    i, j = box_of_entry[first], box_of_entry[second]
    keys = np.sort(np.minimum(i, j) * n + np.maximum(i, j))
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys  # no box shares a cell
    i, j = keys // n, keys % n
    a, b = xyxy[i], xyxy[j]
    touching = (np.maximum(a[:, 0], b[:, 0]) < np.minimum(a[:, 2], b[:, 2])) & (
        np.maximum(a[:, 1], b[:, 1]) < np.minimum(a[:, 3], b[:, 3])
    )
    return i[touching], j[touching]


def _matches(detections: Detections, metric: MatchMetric, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that are the same object: same label, and the same decoded payload or a box match ≥ threshold."""
    i, j = overlapping_pairs(detections.xyxy)
    same_label = detections.labels[i] == detections.labels[j]
    i, j = i[same_label], j[same_label]
    text_i, text_j = detections.texts[i], detections.texts[j]
    both_text = np.array([a is not None and b is not None for a, b in zip(text_i, text_j, strict=True)], dtype=bool)
    same_text = both_text & (text_i == text_j)
    close = box_metric(detections.xyxy[i], detections.xyxy[j], metric) >= threshold
    match = np.where(both_text, same_text, close)
    return i[match], j[match]


def merge_detections(
    detections: Detections,
    method: MergeMethod = "greedy_nmm",
    match_metric: MatchMetric = "ios",
    match_threshold: float = 0.5,
) -> Detections:
    """De-duplicate detections of the same object seen by several tiles.

    Greedy, in priority order (whole views before `cut` ones, then by score): each kept detection absorbs the
    remaining ones that match it. "nms" drops what it absorbs; "greedy_nmm" (SAHI's default) grows the kept
    box to the union of what it absorbs; a whole view only grows with other whole views, so a seam-cut
    fragment never stretches it. Detections with a payload (QR text, marker id) match by payload.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge must be one of {MERGE_METHODS}, got {method!r}")
    if match_metric not in MATCH_METRICS:
        raise ValueError(f"match_metric must be one of {MATCH_METRICS}, got {match_metric!r}")
    if method == "none" or len(detections) < 2:
        return detections
    priority = np.lexsort((-detections.scores, detections.cut))
    rank = np.empty(len(detections), dtype=np.int64)
    rank[priority] = np.arange(len(detections))
    i, j = _matches(detections, match_metric, match_threshold)
    swap = rank[j] < rank[i]
    keeper, other = np.where(swap, j, i), np.where(swap, i, j)
    by_keeper = np.argsort(keeper, kind="stable")
    keeper, other = keeper[by_keeper], other[by_keeper]

    owner = _greedy_owners(priority, keeper, other, len(detections))
    absorbed = np.flatnonzero(owner >= 0)
    winners = owner[absorbed]
    scores = detections.scores.copy()
    np.maximum.at(scores, winners, detections.scores[absorbed])
    xyxy = detections.xyxy.copy()
    if method == "greedy_nmm":
        grow = detections.cut[winners] | ~detections.cut[absorbed]
        np.minimum.at(xyxy[:, 0], winners[grow], detections.xyxy[absorbed[grow], 0])
        np.minimum.at(xyxy[:, 1], winners[grow], detections.xyxy[absorbed[grow], 1])
        np.maximum.at(xyxy[:, 2], winners[grow], detections.xyxy[absorbed[grow], 2])
        np.maximum.at(xyxy[:, 3], winners[grow], detections.xyxy[absorbed[grow], 3])
    kept = np.flatnonzero(owner < 0)
    merged = Detections(xyxy, scores, detections.labels, detections.texts, list(detections.points), detections.cut)
    return merged[kept]


def _greedy_owners(priority: np.ndarray, keeper: np.ndarray, other: np.ndarray, n: int) -> np.ndarray:
    """For each detection, the detection that absorbed it (-1: kept). Pairs are sorted by keeper.

    The one sequential step of the merge, in plain Python over the few detections that have a match:
    a detection absorbed early can no longer absorb others, so the order matters.
    """
    owner = [-1] * n
    if not len(keeper):
        return np.asarray(owner, dtype=np.int64)
    starts = np.searchsorted(keeper, np.arange(n), side="left").tolist()
    ends = np.searchsorted(keeper, np.arange(n), side="right").tolist()
    others = other.tolist()
    for k in priority[np.isin(priority, keeper)].tolist():
        if owner[k] >= 0:
            continue
        for m in others[starts[k] : ends[k]]:
            if owner[m] < 0:
                owner[m] = k
    return np.asarray(owner, dtype=np.int64)
