"""Large scenes of pasted pictures: real photos (and drawn objects) at known places and scales, for the neural
recognizers' accuracy tests and benchmarks.

A pasted picture's object box is known from the picture itself (say YuNet's face box on the original photo), so the
ground truth is the paste position plus the scale times that box. A share of the objects cross tile seams, each
small enough to be whole in the neighbouring tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.scenes.codes import Scene, Truth
from pipeline.tiling import Window, grid

# boxes (x, y, w, h) in ../shared/images/astronaut.png (512x512): YuNet's face, FastestDet's person
ASTRONAUT_FACE = (178, 63, 90, 113)
ASTRONAUT_PERSON = (1, 12, 376, 504)


@dataclass(frozen=True)
class Picture:
    """A picture to paste and the box of the one object in it that a recognizer should report."""

    image: np.ndarray
    box: tuple[float, float, float, float]  # x, y, w, h in the picture
    label: str


def clock(size: int) -> Picture:
    """A drawn wall clock (dial, ticks, hands) on grey: FastestDet calls it "clock" at 0.9 from 60 px up."""
    image = np.full((size, size, 3), 200, dtype=np.uint8)
    centre, radius = size // 2, round(size * 0.47)
    cv2.circle(image, (centre, centre), radius, (40, 40, 40), -1, cv2.LINE_AA)
    cv2.circle(image, (centre, centre), round(size * 0.42), (250, 250, 250), -1, cv2.LINE_AA)
    for hour in range(12):
        angle = hour * np.pi / 6
        inner = (round(centre + size * 0.36 * np.cos(angle)), round(centre + size * 0.36 * np.sin(angle)))
        outer = (round(centre + size * 0.41 * np.cos(angle)), round(centre + size * 0.41 * np.sin(angle)))
        cv2.line(image, inner, outer, (0, 0, 0), max(1, size // 60), cv2.LINE_AA)
    cv2.line(image, (centre, centre), (centre, round(centre - size * 0.3)), (0, 0, 0), max(1, size // 40))
    cv2.line(image, (centre, centre), (round(centre + size * 0.2), centre), (0, 0, 0), max(1, size // 30))
    return Picture(image, (centre - radius, centre - radius, 2 * radius, 2 * radius), "clock")


def textured_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Soft colour noise: no edges for a detector to fire on, but not a flat field either."""
    noise = rng.integers(60, 200, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(cv2.GaussianBlur(noise, (0, 0), 2), (width, height), interpolation=cv2.INTER_LINEAR)


def _across_seam(
    windows: list[Window], tile: int, box_w: float, box_h: float, rng: np.random.Generator
) -> tuple[int, int]:
    """A top-left corner for a box (smaller than the overlap) that crosses a vertical or horizontal tile seam, so it
    is whole only in the next tile along."""
    width, height = max(w.x2 for w in windows), max(w.y2 for w in windows)
    columns, rows = sorted({w.x for w in windows}), sorted({w.y for w in windows})
    vertical = len(rows) < 2 or (len(columns) > 1 and rng.random() < 0.5)
    starts = columns if vertical else rows
    along, across = (box_w, height - box_h) if vertical else (box_h, width - box_w)
    seam = starts[int(rng.integers(0, len(starts) - 1))] + tile
    position = int(rng.integers(round(seam - along) + 1, seam))
    other = int(rng.integers(0, round(across)))
    return (position, other) if vertical else (other, position)


def _clear(occupied: list[tuple[int, int, int, int]], x: int, y: int, w: int, h: int, gap: int) -> bool:
    return all(
        x + w + gap <= ox or ox + ow + gap <= x or y + h + gap <= oy or oy + oh + gap <= y
        for ox, oy, ow, oh in occupied
    )


def _whole_in_a_tile(windows: list[Window], x: float, y: float, w: float, h: float) -> bool:
    return any(t.x <= x and x + w <= t.x2 and t.y <= y and y + h <= t.y2 for t in windows)


def photo_scene(
    pictures: Sequence[Picture],
    width: int = 4000,
    height: int = 3000,
    count: int = 8,
    scales: Sequence[float] = (0.5, 0.75, 1.0),
    seam_share: float = 0.5,
    tile: int = 640,
    overlap: float = 0.2,
    seed: int = 0,
) -> Scene:
    """`count` pastes, taking the pictures and the scales in turn, each object whole in at least one tile (what tiling
    promises to see). `seam_share` of them cross a tile seam, taken among the objects smaller than the overlap."""
    rng = np.random.default_rng(seed)
    image = textured_background(width, height, rng)
    occupied: list[tuple[int, int, int, int]] = []
    truths: list[Truth] = []
    seams = 0
    windows = grid(height, width, tile, overlap)
    for _ in range(count * 200):
        if len(truths) == count:
            break
        picture = pictures[len(truths) % len(pictures)]
        scale = scales[len(truths) % len(scales)]
        pasted = cv2.resize(picture.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ph, pw = pasted.shape[:2]
        bx, by, bw, bh = (value * scale for value in picture.box)
        if pw >= width or ph >= height:
            raise ValueError(f"a {width}x{height} scene is too small for a {pw}x{ph} picture")
        on_seam = seams < round(count * seam_share) and max(bw, bh) < round(tile * overlap) and len(windows) > 1
        if on_seam:
            ox, oy = _across_seam(windows, tile, bw, bh, rng)
            x, y = round(ox - bx), round(oy - by)
        else:
            x, y = int(rng.integers(0, width - pw)), int(rng.integers(0, height - ph))
        inside = 0 <= x <= width - pw and 0 <= y <= height - ph
        if (
            not inside
            or not _clear(occupied, x, y, pw, ph, 16)
            or not _whole_in_a_tile(windows, x + bx, y + by, bw, bh)
        ):
            continue
        seams += on_seam
        occupied.append((x, y, pw, ph))
        image[y : y + ph, x : x + pw] = pasted
        truths.append(Truth(picture.label, (round(x + bx), round(y + by), round(bw), round(bh))))
    if len(truths) < count:
        raise ValueError(f"could not place {count} pictures in a {width}x{height} scene")
    return Scene(image, truths)
