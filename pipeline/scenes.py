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
