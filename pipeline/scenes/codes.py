"""Synthetic large scenes with known content, and scoring a recognition against that ground truth.

Used by the tests, the demo and the benchmarks: every object's label, payload and box are known, and a share of
them are placed across tile seams, where a naive tiler cuts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.tiling import grid


@dataclass(frozen=True)
class Truth:
    label: str
    box: tuple[int, int, int, int]  # x, y, w, h in image pixels
    text: str | None = None


@dataclass
class Scene:
    image: np.ndarray
    truths: list[Truth]


def qr_code(text: str, module_px: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A grey QR code with its quiet zone, and the box of the code itself inside that picture."""
    code = cv2.QRCodeEncoder.create().encode(text)
    picture = cv2.resize(code, None, fx=module_px, fy=module_px, interpolation=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(picture < 128)
    return picture, (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))


def _free(occupied: list[tuple[int, int, int, int]], x: int, y: int, size: int, gap: int) -> bool:
    return all(
        x + size + gap <= ox or ox + os_ + gap <= x or y + size + gap <= oy or oy + os_ + gap <= y
        for ox, oy, os_, _ in occupied
    )


def _seam_positions(
    width: int, height: int, tile: int, overlap: float, size: int, rng: np.random.Generator
) -> tuple[int, int]:
    """A place where a square of `size` crosses a vertical or horizontal tile seam yet fits whole in the next tile."""
    windows = grid(height, width, tile, overlap)
    xs = sorted({w.x for w in windows})
    ys = sorted({w.y for w in windows})
    if rng.random() < 0.5 and len(xs) > 1:
        k = int(rng.integers(0, len(xs) - 1))
        seam, next_start = xs[k] + tile, xs[k + 1]
        x = int(rng.integers(max(next_start, seam - size + 1), seam))
        return x, int(rng.integers(0, height - size))
    k = int(rng.integers(0, max(1, len(ys) - 1)))
    seam, next_start = ys[k] + tile, ys[min(k + 1, len(ys) - 1)]
    y = (
        int(rng.integers(max(next_start, seam - size + 1), seam))
        if len(ys) > 1
        else int(rng.integers(0, height - size))
    )
    return int(rng.integers(0, width - size)), y


def qr_scene(
    width: int = 3000,
    height: int = 2000,
    count: int = 12,
    seam_share: float = 0.5,
    tile: int = 640,
    overlap: float = 0.2,
    seed: int = 0,
    prefix: str = "tilerec",
) -> Scene:
    """QR codes with distinct payloads on a textured grey background; about `seam_share` of them cross tile
    seams (each small enough to be whole in the neighbouring tile, as the overlap promises)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(150, 230, size=(height, width), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 3)
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    overlap_px = round(tile * overlap)
    occupied: list[tuple[int, int, int, int]] = []
    truths: list[Truth] = []
    for _ in range(count * 200):
        if len(truths) == count:
            break
        text = f"{prefix}-{len(truths):04d}"
        on_seam = len(truths) < round(count * seam_share)
        module_px = int(rng.integers(3, 5))
        picture, (bx, by, bw, bh) = qr_code(text, module_px)
        size = picture.shape[0]
        if on_seam and (bw >= overlap_px - 8 or min(width, height) <= tile):
            module_px = 3
            picture, (bx, by, bw, bh) = qr_code(text, module_px)
            size = picture.shape[0]
        if size >= min(width, height):
            raise ValueError(f"a {width}x{height} scene is too small for QR codes of {size} px")
        if on_seam and min(width, height) > tile:
            x, y = _seam_positions(width, height, tile, overlap, bw, rng)
            x, y = x - bx, y - by  # the code itself, not its quiet zone, crosses the seam
            x, y = int(np.clip(x, 0, width - size)), int(np.clip(y, 0, height - size))
        else:
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        if not _free(occupied, x, y, size, 8):
            continue
        occupied.append((x, y, size, size))
        image[y : y + size, x : x + size] = picture[:, :, None]
        truths.append(Truth("qrcode", (x + bx, y + by, bw, bh), text))
    if len(truths) < count:
        raise ValueError(f"could not place {count} QR codes in a {width}x{height} scene")
    return Scene(image, truths)


def iou_xywh(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax2, bx2) - max(a[0], b[0])) * max(0.0, min(ay2, by2) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Score:
    truths: int
    detections: int
    found: int  # ground-truth objects reported at least once
    duplicates: int  # extra reports of an object already reported
    false_positives: int
    mean_iou: float

    @property
    def recall(self) -> float:
        return self.found / self.truths if self.truths else 1.0

    @property
    def precision(self) -> float:
        return (self.detections - self.false_positives) / self.detections if self.detections else 1.0


def score(detections: Detections, truths: list[Truth], min_iou: float = 0.5) -> Score:
    """Each detection matched to the ground-truth object of the same label it overlaps most (and, for objects with a
    payload, the same payload)."""
    hits = [0] * len(truths)
    ious: list[float] = []
    false_positives = 0
    for record in detections.to_records():
        best, best_iou = -1, min_iou
        for k, truth in enumerate(truths):
            if truth.label != record["label"] or (truth.text is not None and truth.text != record.get("text")):
                continue
            overlap = iou_xywh(truth.box, record["box"])
            if overlap >= best_iou:
                best, best_iou = k, overlap
        if best < 0:
            false_positives += 1
            continue
        hits[best] += 1
        if hits[best] == 1:
            ious.append(best_iou)
    return Score(
        truths=len(truths),
        detections=len(detections),
        found=sum(1 for h in hits if h),
        duplicates=sum(h - 1 for h in hits if h > 1),
        false_positives=false_positives,
        mean_iou=float(np.mean(ious)) if ious else 0.0,
    )


_EAN_L = ["0001101", "0011001", "0010011", "0111101", "0100011", "0110001", "0101111", "0111011", "0110111", "0001011"]
_EAN_G = [code[::-1].translate(str.maketrans("01", "10")) for code in _EAN_L]
_EAN_R = [code.translate(str.maketrans("01", "10")) for code in _EAN_L]
_EAN_PARITY = ["LLLLLL", "LLGLGG", "LLGGLG", "LLGGGL", "LGLLGG", "LGGLLG", "LGGGLL", "LGLGLG", "LGLGGL", "LGGLGL"]


def ean13_digits(first12: str) -> str:
    """The 13 digits of an EAN-13 code: the 12 given and the check digit."""
    if len(first12) != 12 or not first12.isdigit():
        raise ValueError(f"an EAN-13 code starts with 12 digits, got {first12!r}")
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(first12))
    return first12 + str((10 - total % 10) % 10)


def ean13(first12: str, module_px: int = 3, height_px: int = 120) -> tuple[np.ndarray, tuple[int, int, int, int], str]:
    """A grey EAN-13 barcode picture with quiet zones, the box of its bars, and its 13 digits."""
    digits = ean13_digits(first12)
    parity = _EAN_PARITY[int(digits[0])]
    left = "".join((_EAN_L if p == "L" else _EAN_G)[int(d)] for p, d in zip(parity, digits[1:7], strict=True))
    right = "".join(_EAN_R[int(d)] for d in digits[7:])
    modules = "101" + left + "01010" + right + "101"
    quiet = 10
    row = np.array([255] * quiet + [0 if m == "1" else 255 for m in modules] + [255] * quiet, dtype=np.uint8)
    picture = np.repeat(np.repeat(row[None, :], height_px, axis=0), module_px, axis=1)
    picture = cv2.copyMakeBorder(picture, 10, 10, 0, 0, cv2.BORDER_CONSTANT, value=255)
    return picture, (quiet * module_px, 10, len(modules) * module_px, height_px), digits


# --- scenes of ArUco markers, EAN-13 barcodes and QR codes, alone or mixed, up to 16000² and more (tests, datasets) ---

PLACEMENTS = ("seam", "edge", "inside")


@dataclass(frozen=True)
class Sticker:
    """A grey picture to paste (code plus its quiet zone), the box of the code inside it, and what it should read."""

    picture: np.ndarray
    box: tuple[int, int, int, int]  # x, y, w, h inside `picture`
    label: str
    text: str | None


def aruco_marker(marker_id: int, module_px: int, dictionary: str = "DICT_4X4_50") -> Sticker:
    """An ArUco marker (black border included in the box) with a one-module white quiet zone, id as its text."""
    chosen = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, dictionary))
    side = (chosen.markerSize + 2) * module_px
    marker = cv2.aruco.generateImageMarker(chosen, marker_id, side, borderBits=1)
    picture = cv2.copyMakeBorder(marker, module_px, module_px, module_px, module_px, cv2.BORDER_CONSTANT, value=255)
    return Sticker(picture, (module_px, module_px, side, side), "aruco", str(marker_id))


def qr_sticker(text: str, module_px: int, quiet_modules: int = 2) -> Sticker:
    """A QR code with a quiet zone trimmed to `quiet_modules` (the encoder's 4 make seam codes too big to place)."""
    picture, (bx, by, bw, bh) = qr_code(text, module_px)
    quiet = quiet_modules * module_px
    x0, y0 = max(0, bx - quiet), max(0, by - quiet)
    trimmed = np.ascontiguousarray(picture[y0 : by + bh + quiet, x0 : bx + bw + quiet])
    return Sticker(trimmed, (bx - x0, by - y0, bw, bh), "qrcode", text)


def barcode_sticker(first12: str, module_px: int, height_px: int = 100) -> Sticker:
    """An EAN-13 barcode; its text is the 13 digits, as the barcode recognizer reports them."""
    picture, box, digits = ean13(first12, module_px, height_px)
    return Sticker(picture, box, "barcode", digits)


def _sticker(kind: str, serial: int, rng: np.random.Generator, prefix: str) -> Sticker:
    """The `serial`-th object of a kind, at one of a few sizes drawn from `rng`.

    Sizes are ones OpenCV's recognizers read reliably in a 640² tile: EAN-13 at 2 px per module (at 3 px OpenCV's
    barcode detector finds fewer than half), first digit never 0 (that code is reported as a 12-digit UPC-A).
    """
    if kind == "qrcode":
        return qr_sticker(f"{prefix}-{serial:05d}", int(rng.choice([3, 4, 5])))
    if kind == "aruco":
        return aruco_marker(serial % 50, int(rng.choice([6, 10, 16])))
    if kind == "barcode":
        first12 = f"{1 + serial % 9}{serial % 100:02d}{int(rng.integers(0, 10**9)):09d}"
        return barcode_sticker(first12, 2, int(rng.choice([80, 100, 120])))
    raise ValueError(f"unknown code kind {kind!r}; known: qrcode, aruco, barcode")


def _tile_starts(width: int, height: int, tile: int, overlap: float) -> tuple[list[int], list[int]]:
    """The grid's tile starts along x and along y (tiles are their product)."""
    windows = grid(height, width, tile, overlap)
    return sorted({w.x for w in windows}), sorted({w.y for w in windows})


def _whole_in_a_tile(start: int, extent: int, starts: list[int], tile: int) -> bool:
    """Some tile along this axis holds [start, start + extent) whole: the overlap's promise for this object."""
    return any(s <= start and start + extent <= s + tile for s in starts)


def _axis_position(
    size: int, extent: int, starts: list[int], tile: int, rng: np.random.Generator, tries: int = 50
) -> int | None:
    """A random start along one axis where the extent lies whole in some tile; None if none was found."""
    if extent > min(size, tile):
        return None
    for _ in range(tries):
        start = int(rng.integers(0, size - extent + 1))
        if _whole_in_a_tile(start, extent, starts, tile):
            return start
    return None


def _seam_start(
    size: int,
    sticker_extent: int,
    box_offset: int,
    box_extent: int,
    starts: list[int],
    tile: int,
    rng: np.random.Generator,
) -> int | None:
    """A start for the picture along one axis where the code's box crosses the end of one tile (so that tile cuts it)
    and the whole picture lies inside the next tile; None where the axis has one tile or the picture is too big."""
    if len(starts) < 2:
        return None
    k = int(rng.integers(0, len(starts) - 1))
    seam, next_start = starts[k] + min(tile, size), starts[k + 1]
    low = max(next_start, seam - box_offset - box_extent + 1)  # picture start: box end past the seam
    high = min(seam - box_offset - 1, next_start + tile - sticker_extent)  # box start before the seam, picture whole
    if low > high:
        return None
    return int(rng.integers(low, high + 1))


def _place(
    sticker: Sticker,
    where: str,
    width: int,
    height: int,
    tile: int,
    xs: list[int],
    ys: list[int],
    rng: np.random.Generator,
) -> tuple[int, int] | None:
    """Top-left corner of the picture for a placement kind, or None if this sticker cannot go there."""
    ph, pw = sticker.picture.shape[:2]
    bx, by, bw, bh = sticker.box
    if where == "seam":
        axes = ["x", "y"] if rng.random() < 0.5 else ["y", "x"]
        for axis in axes:
            if axis == "x":
                x = _seam_start(width, pw, bx, bw, xs, tile, rng)
                y = _axis_position(height, ph, ys, tile, rng)
            else:
                y = _seam_start(height, ph, by, bh, ys, tile, rng)
                x = _axis_position(width, pw, xs, tile, rng)
            if x is not None and y is not None:
                return x, y
        return None
    if where == "edge":
        side = int(rng.integers(0, 4))
        if side in (0, 1):  # left or right edge
            y = _axis_position(height, ph, ys, tile, rng)
            return None if y is None else (0 if side == 0 else width - pw, y)
        x = _axis_position(width, pw, xs, tile, rng)
        return None if x is None else (x, 0 if side == 2 else height - ph)
    x, y = _axis_position(width, pw, xs, tile, rng), _axis_position(height, ph, ys, tile, rng)
    return None if x is None or y is None else (x, y)


def textured_grey(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Soft grey noise, BGR: drawn at 1/4 size and scaled up, so a 16000² background takes a second, not a minute."""
    small = rng.integers(150, 230, size=(height // 4 + 1, width // 4 + 1), dtype=np.uint8)
    small = cv2.GaussianBlur(small, (0, 0), 1)
    grey = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def code_scene(
    width: int = 4000,
    height: int = 4000,
    kinds: tuple[str, ...] = ("qrcode", "aruco", "barcode"),
    count: int | None = None,
    seam_share: float = 0.3,
    edge_share: float = 0.15,
    tile: int = 640,
    overlap: float = 0.2,
    seed: int = 0,
    per_megapixel: float = 2.0,
) -> Scene:
    """QR codes, ArUco markers and EAN-13 barcodes (one kind or a mix, taken in turn) at a few sizes each.

    `count` objects in all (default: `per_megapixel` per million pixels, at least 4 per kind). About `seam_share` of
    them cross a tile seam of the (tile, overlap) grid yet lie whole in the next tile, `edge_share` touch an image
    edge, and the rest lie anywhere some tile holds them whole: every object is findable by a tiled pass, so a miss
    or a duplicate is the recognizer's or the merge's doing, not the scene's. Seeded: the same arguments give the
    same pixels and truths.
    """
    if not kinds:
        raise ValueError("code_scene needs at least one kind")
    if count is None:
        count = max(4 * len(kinds), round(per_megapixel * width * height / 1e6))
    rng = np.random.default_rng(seed)
    image = textured_grey(width, height, rng)
    xs, ys = _tile_starts(width, height, tile, overlap)
    occupied: list[tuple[int, int, int, int]] = []
    truths: list[Truth] = []
    wanted = {"seam": round(count * seam_share), "edge": round(count * edge_share)}
    wanted["inside"] = count - wanted["seam"] - wanted["edge"]
    placed = dict.fromkeys(PLACEMENTS, 0)
    misses = dict.fromkeys(PLACEMENTS, 0)
    for _ in range(count * 200):
        if len(truths) == count:
            break
        where = next(kind for kind in PLACEMENTS if placed[kind] < wanted[kind])
        kind = kinds[len(truths) % len(kinds)]
        sticker = _sticker(kind, len(truths), rng, f"tilerec-{seed}")
        corner = _place(sticker, where, width, height, tile, xs, ys, rng)
        ph, pw = sticker.picture.shape[:2]
        if corner is None or not _free_rect(occupied, *corner, pw, ph, 8):
            misses[where] += 1
            if where != "inside" and misses[where] > 20 + count:  # e.g. one tile along an axis: no seams
                wanted["inside"] += wanted[where] - placed[where]
                wanted[where] = placed[where]
            continue
        x, y = corner
        occupied.append((x, y, pw, ph))
        image[y : y + ph, x : x + pw] = sticker.picture[:, :, None]
        bx, by, bw, bh = sticker.box
        truths.append(Truth(sticker.label, (x + bx, y + by, bw, bh), sticker.text))
        placed[where] += 1
    if len(truths) < count:
        raise ValueError(f"could not place {count} codes in a {width}x{height} scene (placed {len(truths)})")
    return Scene(image, truths)


def _free_rect(occupied: list[tuple[int, int, int, int]], x: int, y: int, w: int, h: int, gap: int) -> bool:
    return all(
        x + w + gap <= ox or ox + ow + gap <= x or y + h + gap <= oy or oy + oh + gap <= y
        for ox, oy, ow, oh in occupied
    )


def _cut_along(start: int, extent: int, starts: list[int], tile: int) -> bool:
    """Some tile along this axis overlaps [start, start + extent) without holding it whole."""
    return any(
        s < start + extent and start < s + tile and not (s <= start and start + extent <= s + tile) for s in starts
    )


def placement_of(truth: Truth, width: int, height: int, tile: int = 640, overlap: float = 0.2) -> str:
    """Where an object lies relative to the grid, for recall by placement: "edge" (within 16 px of an image edge),
    "seam" (some tile cuts its box, so only a neighbour sees it whole) or "inside"."""
    x, y, w, h = truth.box
    if min(x, y) <= 16 or x + w >= width - 16 or y + h >= height - 16:
        return "edge"
    xs, ys = _tile_starts(width, height, tile, overlap)
    cut = _cut_along(x, w, xs, min(tile, width)) or _cut_along(y, h, ys, min(tile, height))
    return "seam" if cut else "inside"


@dataclass(frozen=True)
class Mover:
    """A sticker moving in a straight line at whole pixels per frame; after `turn` frames (if set) it goes back the
    way it came, so one that left the frame comes back into it."""

    sticker: Sticker
    start: tuple[int, int]  # the sticker picture's top-left corner at frame 0
    velocity: tuple[int, int]  # pixels per frame
    turn: int | None = None

    def at(self, frame: int) -> tuple[int, int]:
        """The sticker picture's top-left corner at `frame`."""
        steps = frame if self.turn is None or frame <= self.turn else 2 * self.turn - frame
        return self.start[0] + self.velocity[0] * steps, self.start[1] + self.velocity[1] * steps


@dataclass(frozen=True)
class MovingTruth:
    """Where a mover's code is in one frame, and whether its quiet zone is whole there too (a reader needs it: the
    code is certain to be read only then)."""

    frame: int
    truth: Truth
    whole: bool


def moving_frame(width: int, height: int, movers: list[Mover], frame: int,
                 background: int = 160) -> tuple[np.ndarray, list[MovingTruth]]:  # fmt: skip
    """One grey frame with every mover pasted where it is at `frame` (cut at the frame's edges), and the truth of
    each code wholly inside the frame."""
    image = np.full((height, width), background, np.uint8)
    truths = []
    for mover in movers:
        picture = mover.sticker.picture
        x, y = mover.at(frame)
        h, w = picture.shape
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 < x2 and y1 < y2:
            image[y1:y2, x1:x2] = picture[y1 - y : y2 - y, x1 - x : x2 - x]
        bx, by, bw, bh = mover.sticker.box
        box = (x + bx, y + by, bw, bh)
        if box[0] >= 0 and box[1] >= 0 and box[0] + bw <= width and box[1] + bh <= height:
            whole = x >= 0 and y >= 0 and x + w <= width and y + h <= height
            truths.append(MovingTruth(frame, Truth(mover.sticker.label, box, mover.sticker.text), whole))
    return image, truths
