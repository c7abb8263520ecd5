"""Shapes a detection may carry besides its box: instance masks as polygons, oriented boxes, keypoints.

Pure functions. Masks are shapely (Multi)Polygons in image (or tile) coordinates, never full-image arrays, so memory
grows with an object's outline, not with the image (SAHI #888, #234). Oriented boxes are rows of
(cx, cy, w, h, angle): the box of width `w` along its own x axis, turned by `angle` degrees clockwise in image
coordinates (y down), as OpenCV's `RotatedRect` and Ultralytics' OBB (which gives radians). Which boxes overlap
(`overlapping_pairs`) is the pair search every merge starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

Ring = list[list[float]]

COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip
# COCO's person skeleton (person_keypoints_*.json), 1-based indices into COCO_KEYPOINTS as COCO writes them
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip


class ShapeError(ValueError):
    """A recognizer returned a shape that is not one: names the column, the detection and the fault."""


def polygon_from_rings(polygons: Sequence[Sequence[Any]]) -> BaseGeometry:
    """A mask from its JSON form: a list of polygons, each a list of rings (outline first, then holes), each ring a
    list of [x, y].

    Args:
        polygons: [[outline, hole, ...], ...]; a single polygon may also be given as [outline, hole, ...].

    Returns:
        A Polygon, or a MultiPolygon for several parts.
    """
    if len(polygons) and len(polygons[0]) and np.ndim(polygons[0][0]) == 1:  # one polygon: [outline, holes...]
        polygons = [polygons]
    parts = [shapely.Polygon(rings[0], rings[1:]) for rings in polygons if len(rings)]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def rings_of(mask: BaseGeometry, ndigits: int | None = None) -> list[list[Ring]]:
    """The JSON form of a mask (see `polygon_from_rings`), coordinates rounded to `ndigits` if given."""

    def ring(coords: Any) -> Ring:
        points = np.asarray(coords)[:-1]  # shapely closes rings; JSON leaves the closing point implicit
        return (points if ndigits is None else points.round(ndigits)).tolist()

    return [[ring(p.exterior.coords), *(ring(h.coords) for h in p.interiors)] for p in getattr(mask, "geoms", [mask])]


def as_mask(value: Any) -> BaseGeometry | None:
    """A mask column entry from what a recognizer may give: a shapely geometry, the JSON rings, or None."""
    if value is None or isinstance(value, BaseGeometry):
        return value
    return polygon_from_rings(value)


def polygons_from_bitmap(bitmap: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> BaseGeometry | None:
    """The polygons (holes included) outlining the set pixels of a small binary mask, moved by `offset`; None when
    nothing is set. Pixel (x, y) is the square [x, x+1] × [y, y+1], so a filled w×h bitmap becomes a w×h square.

    Args:
        bitmap: (h, w) array, non-zero where the object is (an object's crop, not the whole image).
        offset: (x, y) of the bitmap's top-left corner in the output coordinates.
    """
    # twice the resolution, so each contour point lands on a pixel's corner rather than its centre
    doubled = cv2.resize((np.asarray(bitmap) > 0).astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    parts = []
    for index, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent >= 0 or len(contours[index]) < 3:
            continue
        holes, hole = [], child
        while hole >= 0:
            if len(contours[hole]) >= 3:
                holes.append(_corners(contours[hole]))
            hole = hierarchy[0][hole][0]
        parts.append(shapely.Polygon(_corners(contours[index]), holes))
    if not parts:
        return None
    mask = shapely.make_valid(shapely.union_all(parts))
    return shapely.transform(mask, lambda xy: xy + np.asarray(offset, dtype=np.float64))


def _corners(contour: np.ndarray) -> np.ndarray:
    """Contour points of a doubled bitmap back to corner coordinates of the original pixels."""
    return (contour.reshape(-1, 2).astype(np.float64) + 1) // 2


def obb_corners(obb: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners of (N, 5) oriented boxes, in the order (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2)
    of the box's own axes."""
    obb = np.asarray(obb, dtype=np.float64).reshape(-1, 5)
    theta = np.radians(obb[:, 4])
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    half_w, half_h = obb[:, 2:3] / 2, obb[:, 3:4] / 2
    local_x = np.array([-1, 1, 1, -1]) * half_w
    local_y = np.array([-1, -1, 1, 1]) * half_h
    x = obb[:, 0:1] + local_x * cos - local_y * sin
    y = obb[:, 1:2] + local_x * sin + local_y * cos
    return np.stack([x, y], axis=2)


def obb_from_points(points: np.ndarray) -> np.ndarray:
    """The smallest oriented box around a set of points (a marker's quad, the pieces of a merged object), as
    (cx, cy, w, h, angle) with the angle in (-90, 90]."""
    (cx, cy), (w, h), angle = cv2.minAreaRect(np.asarray(points, dtype=np.float32).reshape(-1, 2))
    return np.array([cx, cy, w, h, angle - 180 if angle > 90 else angle], dtype=np.float64)


def obb_polygons(obb: np.ndarray) -> np.ndarray:
    """Shapely polygons of (N, 5) oriented boxes, for rotated-box IoU."""
    return shapely.polygons(obb_corners(obb))


def encode_rle(bitmap: np.ndarray, x: int, y: int, height: int, width: int) -> dict[str, Any]:
    """COCO's compressed RLE of a mask in a `height`×`width` image, from the mask's crop at (x, y): the counts of the
    image's column-major runs, in COCO's string form (pycocotools' `rleToString`). Memory: the crop's size.

    Args:
        bitmap: (h, w) crop of the mask, non-zero inside; the crop must lie inside the image.
        x, y: the crop's top-left corner in the image.
        height, width: the image's size.

    Returns:
        {"size": [height, width], "counts": str}, as `pycocotools.mask.encode` gives.
    """
    crop = np.asarray(bitmap) > 0
    h, w = crop.shape
    flat = np.zeros((w, height), dtype=bool)  # the crop's columns, each as tall as the image
    flat[:, y : y + h] = crop.T
    changes = np.flatnonzero(np.diff(flat.reshape(-1).astype(np.int8), prepend=0))
    # alternating off/on runs over the crop's columns, off first; the end closes the last run, whatever its value
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    runs[0] += x * height  # the columns before the crop are all off
    tail = (width - x - w) * height  # the columns after it
    counts = runs.tolist()
    if len(counts) % 2 == 0:  # ends with an on run: add the off run that follows
        counts.append(tail)
    else:
        counts[-1] += tail
    while len(counts) > 1 and counts[-1] == 0:
        counts.pop()
    return {"size": [height, width], "counts": _rle_string(counts)}


def _rle_string(counts: list[int]) -> str:
    """pycocotools' LEB128-like run encoding (maskApi.c `rleToString`): runs after the second as deltas."""
    out = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = not ((chunk & 0x10 == 0 and value == 0) or (chunk & 0x10 and value == -1))
            if more:
                chunk |= 0x20
            out.append(chr(chunk + 48))
    return "".join(out)


def rasterize(mask: BaseGeometry, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The (h, w) bitmap of a mask over the pixels of the crop at (x, y): a pixel is set when its centre is inside,
    so the outline of `polygons_from_bitmap` gives back its bitmap exactly."""
    shapely.prepare(mask)
    columns, rows = np.meshgrid(np.arange(w) + x + 0.5, np.arange(h) + y + 0.5)
    return shapely.contains_xy(mask, columns, rows).astype(np.uint8)


def check_mask(mask: BaseGeometry, width: float, height: float, tolerance: float = 1.0) -> str | None:
    """What is wrong with a recognizer's mask in a `width`×`height` tile, or None: not a polygon, not valid (a
    self-intersection, say), not finite, or outside the tile."""
    if mask.geom_type not in ("Polygon", "MultiPolygon"):
        return f"a {mask.geom_type}, not a Polygon or MultiPolygon"
    if not np.isfinite(shapely.get_coordinates(mask)).all():
        return "coordinates that are not finite numbers"
    if not mask.is_valid:
        return f"not a valid polygon ({shapely.is_valid_reason(mask)})"
    x1, y1, x2, y2 = mask.bounds
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return f"outside its {width:g}x{height:g} tile (bounds {x1:g}, {y1:g}, {x2:g}, {y2:g})"
    return None


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
