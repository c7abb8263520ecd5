"""Drawing detections on an image with OpenCV: box (or rotated box), translucent mask, keypoints and skeleton,
label, score and decoded text (or a face's name), so a person can check a result.

Pure functions on arrays: the input is never modified, and pixels away from the drawn shapes and captions stay
exactly as they were (the tests and `tilerec run --annotate` rely on that).
"""

from __future__ import annotations

import colorsys
import math
import zlib

import cv2
import numpy as np
from shapely.geometry.base import BaseGeometry

from pipeline.model import Detections
from pipeline.outputs.export import mask_crop, skeleton
from pipeline.shapes import obb_corners, rasterize

FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_TEXT = 32  # characters of decoded text shown in a caption; long payloads would hide the picture
MASK_ALPHA = 0.35  # the mask's colour over the picture: enough to see the object's extent, not hide it
SUBPIXEL = 4  # OpenCV's `shift`: outlines drawn at 1/16 pixel, so a polygon is not rounded to whole pixels


def label_color(label: str) -> tuple[int, int, int]:
    """A bright BGR colour fixed by the label's name, so a label has the same colour in every picture and run."""
    hue = (zlib.crc32(label.encode("utf-8", "surrogatepass")) % 360) / 360.0  # any string, undecodable bytes too
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return round(blue * 255), round(green * 255), round(red * 255)


def caption(label: str, score: float, text: str | None = None, max_text: int = MAX_TEXT) -> str:
    """'label 0.97 payload': OpenCV's Hershey fonts draw ASCII only, so other characters (controls too) become
    '?'; the label and the payload, both from the image where a recognizer reads them, are cut to `max_text`."""
    words = f"{_cut(label, max_text)} {score:.2f}"
    if text:
        words += " " + _cut(text, max_text)
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in words)


def _cut(text: str, most: int) -> str:
    """Text on one line (whitespace runs as one space), at most `most` characters."""
    shown = text if len(text) <= most else text[: most - 3] + "..."
    return " ".join(shown.split())


def default_thickness(height: int, width: int) -> int:
    """Line width that stays visible when a 4000 px image is shown scaled to a screen."""
    return max(1, round(max(height, width) / 1500))


def to_bgr(image: np.ndarray) -> np.ndarray:
    """A BGR copy of a grey, BGR or BGRA 8-bit image: colours need three channels."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image.copy()


def _ink(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on the caption's background."""
    blue, green, red = color
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _box_corners(xyxy: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pixel corners of a box whose x2, y2 are exclusive (x + w), so the line lies on the object's border pixels."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    left, top = math.floor(x1), math.floor(y1)
    return (left, top), (max(left, math.ceil(x2) - 1), max(top, math.ceil(y2) - 1))


def _fill_mask(canvas: np.ndarray, mask: BaseGeometry, color: tuple[int, int, int], alpha: float = MASK_ALPHA) -> None:
    """Blend `color` into the pixels whose centres lie inside `mask`, in place; only the mask's bounding-box crop is
    rasterized, never a full-image layer, so a gigapixel picture costs no more than the object."""
    height, width = canvas.shape[:2]
    x, y, w, h = mask_crop(mask, width, height)
    inside = rasterize(mask, x, y, w, h).astype(bool)
    crop = canvas[y : y + h, x : x + w]
    crop[inside] = np.round(crop[inside] * (1 - alpha) + np.asarray(color) * alpha).astype(np.uint8)


def _mask_outlines(mask: BaseGeometry) -> list[np.ndarray]:
    """The mask's rings (outlines and holes) as OpenCV fixed-point polylines: OpenCV's point (x, y) is the centre of
    pixel (x, y), which in mask coordinates (pixel (x, y) is the square [x, x+1] × [y, y+1]) is (x + 0.5, y + 0.5)."""
    rings = [ring for part in getattr(mask, "geoms", [mask]) for ring in (part.exterior, *part.interiors)]
    scale = 2**SUBPIXEL
    return [np.round((np.asarray(ring.coords) - 0.5) * scale).astype(np.int32).reshape(-1, 1, 2) for ring in rings]


def _obb_outline(obb: np.ndarray) -> np.ndarray:
    """Pixel corners of an oriented box (cx, cy, w, h, angle), drawn through the centres of its border pixels, as
    `_box_corners` does for an axis-aligned box: the box half a pixel smaller on each side, moved to pixel centres."""
    cx, cy, w, h, angle = (float(v) for v in obb)
    inner = np.array([cx - 0.5, cy - 0.5, max(w - 1, 0.0), max(h - 1, 0.0), angle])
    return np.round(obb_corners(inner)[0]).astype(np.int32).reshape(-1, 1, 2)


def _draw_keypoints(
    canvas: np.ndarray, keypoints: np.ndarray, pairs: list[list[int]], color: tuple[int, int, int], thickness: int
) -> None:
    """Keypoints whose score is above 0 as dots on the pixels holding them, and the skeleton's lines between such
    pairs (`pairs`: COCO's 1-based index pairs), in place."""
    seen = keypoints[:, 2] > 0
    pixels = np.floor(keypoints[:, :2]).astype(np.int32)
    for first, second in pairs:
        if seen[first - 1] and seen[second - 1]:
            start, end = pixels[first - 1], pixels[second - 1]
            cv2.line(canvas, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), color, thickness, cv2.LINE_AA)
    for x, y in pixels[seen]:
        cv2.circle(canvas, (int(x), int(y)), thickness + 1, color, cv2.FILLED, cv2.LINE_AA)


def _draw_caption(
    canvas: np.ndarray, words: str, corner: tuple[int, int], color: tuple[int, int, int], scale: float, weight: int
) -> None:
    """A filled label above the box, or just inside its top when the box touches the image's top edge."""
    (text_w, text_h), baseline = cv2.getTextSize(words, FONT, scale, weight)
    pad = max(2, weight)
    box_h = text_h + baseline + 2 * pad
    x = int(np.clip(corner[0], 0, max(0, canvas.shape[1] - text_w - 2 * pad)))
    top = corner[1] - box_h if corner[1] - box_h >= 0 else corner[1]
    cv2.rectangle(canvas, (x, top), (x + text_w + 2 * pad - 1, top + box_h - 1), color, thickness=cv2.FILLED)
    cv2.putText(canvas, words, (x + pad, top + pad + text_h), FONT, scale, _ink(color), weight, cv2.LINE_AA)


def draw_detections(
    image: np.ndarray,
    detections: Detections,
    thickness: int | None = None,
    font_scale: float | None = None,
    captions: bool = True,
) -> np.ndarray:
    """A BGR copy of `image` with every detection drawn on it: its mask filled translucent and outlined, its rotated
    box (when it has one) or else its box, its points, its keypoints and skeleton (COCO's person skeleton for COCO's
    17 keypoints, else dots only), and a caption."""
    canvas = to_bgr(image)
    height, width = canvas.shape[:2]
    thickness = thickness or default_thickness(height, width)
    thin = max(1, thickness // 2)
    scale = font_scale or max(0.4, 0.4 * thickness)
    weight = max(1, round(scale * 1.5))
    colors = [label_color(str(label)) for label in detections.labels]
    # a face's identity (faces-dnn with identify) is its caption's text
    names = [n if isinstance(n, str) else None for n in detections.data.get("identity", [None] * len(detections))]
    # every mask before any box or caption: a later detection's fill would otherwise tint an earlier caption
    for mask, color in zip(detections.masks, colors, strict=True):
        if mask is not None:
            _fill_mask(canvas, mask, color)
            cv2.polylines(canvas, _mask_outlines(mask), True, color, thin, cv2.LINE_AA, SUBPIXEL)
    pairs = skeleton(detections.keypoint_names)
    for i, color in enumerate(colors):
        top_left, bottom_right = _box_corners(detections.xyxy[i])
        if np.isnan(detections.obb[i, 0]):
            cv2.rectangle(canvas, top_left, bottom_right, color, thickness)
        else:
            cv2.polylines(canvas, [_obb_outline(detections.obb[i])], True, color, thickness)
        points = detections.points[i]
        if points is not None and len(points) >= 3:
            polygon = np.round(points).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas, [polygon], True, color, thin, cv2.LINE_AA)
        if detections.keypoints[i] is not None:
            _draw_keypoints(canvas, detections.keypoints[i], pairs, color, thin)
        if captions:
            words = caption(str(detections.labels[i]), float(detections.scores[i]), detections.texts[i] or names[i])
            _draw_caption(canvas, words, top_left, color, scale, weight)
    return canvas
