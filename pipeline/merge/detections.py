"""Placing tile detections in the image and merging duplicates across tile seams (NMS, greedy NMM), vectorised.

Candidate pairs come from grid bucketing, so the cost grows with the number of overlapping boxes, not with N².
Pairs are compared by their shapes where both have one: masks by polygon overlap, oriented boxes by rotated-box
overlap (not their axis-aligned hulls, supervision #1339), and boxes otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import shapely

from pipeline.merge.lines import join_lines
from pipeline.model import Detections
from pipeline.shapes import obb_from_points, obb_polygons, overlapping_pairs
from pipeline.tiling import Window

MergeMethod = Literal["greedy_nmm", "nms", "lines", "none"]
MatchMetric = Literal["ios", "iou"]
MERGE_METHODS = ("greedy_nmm", "nms", "lines", "none")
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
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return overlap_ratio(inter_w * inter_h, area_a, area_b, metric)


def overlap_ratio(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray, metric: MatchMetric) -> np.ndarray:
    """IOU or IOS (intersection over the smaller area) from the intersection and the two areas."""
    if metric == "iou":
        denominator = area_a + area_b - inter
    elif metric == "ios":
        denominator = np.minimum(area_a, area_b)
    else:
        raise ValueError(f"match_metric must be one of {MATCH_METRICS}, got {metric!r}")
    return np.divide(inter, denominator, out=np.zeros_like(inter), where=denominator > 0)


def intersection_area(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise area of the intersection of two arrays of polygons.

    The common pairs are the same view twice and a seam-cut piece beside its whole view, and they are GEOS's
    slowest overlays (coincident edges: 100–250 µs a pair, docs/performance.md). Each is recognised first, in a few
    µs: equal polygons, or one equal to the other clipped to its box. Other pairs are intersected with the other's
    box clipped away first, which is the same area on fewer vertices.
    """
    area_a, area_b = shapely.area(a), shapely.area(b)
    inter = np.where(shapely.equals_exact(a, b, 1e-6), area_a, np.nan)
    rest = np.flatnonzero(np.isnan(inter))
    a_in_b = _clipped(a[rest], shapely.bounds(b[rest]))
    b_in_a = _clipped(b[rest], shapely.bounds(a[rest]))
    piece_b = shapely.equals_exact(shapely.normalize(a_in_b), shapely.normalize(b[rest]), 1e-6)
    piece_a = shapely.equals_exact(shapely.normalize(b_in_a), shapely.normalize(a[rest]), 1e-6)
    inter[rest] = np.where(piece_b, area_b[rest], np.where(piece_a, area_a[rest], np.nan))
    overlay = np.isnan(inter[rest])
    inter[rest[overlay]] = shapely.area(shapely.intersection(a_in_b[overlay], b[rest][overlay]))
    return inter


def _clipped(shapes: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each shape clipped to its box (clip_by_rect takes one rectangle a call)."""
    return np.array([shapely.clip_by_rect(s, *box) for s, box in zip(shapes, boxes.tolist(), strict=True)], object)


def shape_metric(a: np.ndarray, b: np.ndarray, metric: MatchMetric = "ios") -> np.ndarray:
    """Element-wise IOU or IOS of two arrays of shapely polygons (masks, or oriented boxes as polygons)."""
    return overlap_ratio(intersection_area(a, b), shapely.area(a), shapely.area(b), metric)


def seam_metric(a: np.ndarray, b: np.ndarray, box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """IOU of two masks within the intersection of their boxes: for two pieces of one object cut by a seam, that is
    the band both tiles saw, where the pieces agree, however far the object reaches beyond the overlap."""
    bands = np.hstack([np.maximum(box_a[:, :2], box_b[:, :2]), np.minimum(box_a[:, 2:], box_b[:, 2:])])
    in_band_a, in_band_b = _clipped(a, bands), _clipped(b, bands)
    return shape_metric(in_band_a, in_band_b, "iou")


def _shape_scores(
    score: np.ndarray,
    shapes: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    metric: MatchMetric,
    threshold: float,
) -> np.ndarray:
    """Put the shape metric of pairs (i, j) whose detections both have a shape into `score`; returns those pairs.

    Polygon intersections are the merge's main cost, so a pair whose bound (its shapes' bounding boxes'
    intersection, capped by the shapes' areas) cannot reach the threshold gets that bound, not an exact
    intersection: it stays unmatched.
    """
    both = np.flatnonzero(shapely.is_geometry(shapes[i]) & shapely.is_geometry(shapes[j]))
    has = shapely.is_geometry(shapes)
    area, bounds = np.zeros(len(shapes)), np.zeros((len(shapes), 4))
    area[has], bounds[has] = shapely.area(shapes[has]), shapely.bounds(shapes[has])
    a, b = bounds[i[both]], bounds[j[both]]
    inter_w = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])).clip(min=0)
    inter_h = (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])).clip(min=0)
    area_a, area_b = area[i[both]], area[j[both]]
    bound = overlap_ratio(np.minimum(inter_w * inter_h, np.minimum(area_a, area_b)), area_a, area_b, metric)
    score[both] = bound
    close = both[bound >= threshold]
    score[close] = shape_metric(shapes[i[close]], shapes[j[close]], metric)
    return both


def _matches(detections: Detections, metric: MatchMetric, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs that are the same object: same label, and the same decoded payload, or a match ≥ threshold of their
    masks, else oriented boxes, else boxes; two seam-cut pieces of a mask also match by `seam_metric`."""
    i, j = overlapping_pairs(detections.xyxy)
    same_label = detections.labels[i] == detections.labels[j]
    i, j = i[same_label], j[same_label]
    text_i, text_j = detections.texts[i], detections.texts[j]
    both_text = np.array([a is not None and b is not None for a, b in zip(text_i, text_j, strict=True)], dtype=bool)
    same_text = both_text & (text_i == text_j)
    score = box_metric(detections.xyxy[i], detections.xyxy[j], metric)
    if detections.has("obb"):
        with_obb = detections.with_obb()
        polygons = np.full(len(detections), None, dtype=object)
        polygons[with_obb] = obb_polygons(detections.obb[with_obb])
        _shape_scores(score, polygons, i, j, metric, threshold)
    if detections.has("masks"):
        exact = _shape_scores(score, detections.masks, i, j, metric, threshold)
        pieces = exact[detections.cut[i[exact]] & detections.cut[j[exact]] & (score[exact] < threshold)]
        a, b = detections.masks[i[pieces]], detections.masks[j[pieces]]
        seam = seam_metric(a, b, detections.xyxy[i[pieces]], detections.xyxy[j[pieces]])
        score[pieces] = np.maximum(score[pieces], seam)
    match = np.where(both_text, same_text, score >= threshold)
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
    detection by what it absorbs: its box to the union of boxes, its mask to the union of masks, its oriented box to
    the smallest one around all their corners, and a cut view's keypoints to the best-scored of each; a whole view
    only grows with other whole views, so a seam-cut fragment never stretches it. Detections with a payload (QR text,
    marker id) match by payload. "lines" joins the pieces of text lines by their geometry along each line
    (`pipeline.merge.lines.join_lines`; the `text` recognizer's merge).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge must be one of {MERGE_METHODS}, got {method!r}")
    if match_metric not in MATCH_METRICS:
        raise ValueError(f"match_metric must be one of {MATCH_METRICS}, got {match_metric!r}")
    if method == "none" or len(detections) < 2:
        return detections
    if method == "lines":
        return join_lines(detections)
    merged, joined = _merge_once(detections, method, match_metric, match_threshold)
    while joined:  # pieces of a mask that crosses several seams join one seam per pass (greedy absorbs neighbours)
        pieces = merged.cut & shapely.is_geometry(merged.masks)  # only they can meet again
        again, joined = _merge_once(merged[np.flatnonzero(pieces)], method, match_metric, match_threshold)
        merged = Detections.concat([merged[np.flatnonzero(~pieces)], again])
    return merged


def _merge_once(
    detections: Detections, method: MergeMethod, match_metric: MatchMetric, match_threshold: float
) -> tuple[Detections, bool]:
    """One greedy pass of `merge_detections`; also says whether it joined seam-cut pieces of masks, after which a
    joined piece may now meet the next piece of its object."""
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
    merged = detections._with(scores=scores)
    joined = False
    if method == "greedy_nmm":
        grow = detections.cut[winners] | ~detections.cut[absorbed]
        merged = _grown(merged, winners[grow], absorbed[grow])
        pieces = detections.cut[winners] & detections.cut[absorbed]
        joined = bool(pieces.any()) and any(detections.masks[k] is not None for k in winners[pieces])
    return merged[np.flatnonzero(owner < 0)], joined


def _grown(detections: Detections, winners: np.ndarray, absorbed: np.ndarray) -> Detections:
    """Each winner grown by the detections it absorbed (pairs `winners[k]`, `absorbed[k]`): box, mask, oriented box,
    keypoints (see `merge_detections`)."""
    xyxy = detections.xyxy.copy()
    np.minimum.at(xyxy[:, 0], winners, detections.xyxy[absorbed, 0])
    np.minimum.at(xyxy[:, 1], winners, detections.xyxy[absorbed, 1])
    np.maximum.at(xyxy[:, 2], winners, detections.xyxy[absorbed, 2])
    np.maximum.at(xyxy[:, 3], winners, detections.xyxy[absorbed, 3])
    columns = {"xyxy": xyxy}
    if len(winners) and detections.has("masks"):
        masks = detections.masks.copy()
        new = ~shapely.equals_exact(masks[winners], masks[absorbed], 1e-6)  # a copy adds nothing (and is slow)
        for winner, group in _groups(winners[new], absorbed[new], detections.masks):
            masks[winner] = shapely.union_all([detections.masks[winner], *detections.masks[group]])
        columns["masks"] = masks
    if len(winners) and detections.has("obb"):
        obb = detections.obb.copy()
        corners = obb_polygons(np.nan_to_num(detections.obb, nan=0.0))
        present = detections.with_obb()
        for winner, group in _groups(winners, absorbed, np.where(present, corners, None)):
            if present[winner]:
                points = shapely.get_coordinates(corners[[winner, *group]])
                obb[winner] = obb_from_points(points)
        columns["obb"] = obb
    if len(winners) and detections.has("keypoints"):
        keypoints = detections.keypoints.copy()
        for winner, group in _groups(winners[detections.cut[winners]], absorbed[detections.cut[winners]], keypoints):
            if keypoints[winner] is not None:
                views = np.stack([keypoints[winner], *keypoints[group]])  # (views, K, 3)
                best = views[:, :, 2].argmax(axis=0)
                keypoints[winner] = views[best, np.arange(views.shape[1])]
        columns["keypoints"] = keypoints
    return detections._with(**columns)


def _groups(winners: np.ndarray, absorbed: np.ndarray, column: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(winner, the detections it absorbed that have a value in `column`), for each winner that absorbed any."""
    has = np.array([value is not None for value in column[absorbed]], dtype=bool)
    winners, absorbed = winners[has], absorbed[has]
    if not len(winners):
        return
    order = np.argsort(winners, kind="stable")
    winners, absorbed = winners[order], absorbed[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(winners)) + 1))
    for start, group in zip(starts.tolist(), np.split(absorbed, starts[1:]), strict=True):
        yield int(winners[start]), group


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
