"""Text lines: PP-OCR's detector (DB) on tiles, its angle classifier and recognizer (CTC) on full-resolution crops of
the merged lines, through ONNX Runtime, with the models and the pre- and post-processing of the `rapidocr` wheel
(the `text` extra).

The detector returns each line as an oriented box (`obb`) whose width runs along the line; the merge joins the
pieces of a line that tile seams cut (`pipeline.merge.lines`), and each merged line is then read once from its crop of
the original image (`LineReader`), its box turned so that its x axis is the reading direction.
Other PP-OCR ONNX models are named by path (`det_model`, `rec_model`, `cls_model`, `keys`); on workers they must lie
under the model folders, as every recognizer's files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.recognizers import RecognizerError
from pipeline.recognizers.dnn import _bgr, _session
from pipeline.shapes import obb_corners

DET_FILE = "PP-OCRv6_det_small.onnx"
REC_FILE = "PP-OCRv6_rec_small.onnx"
CLS_FILE = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
REC_HEIGHT = 48  # the recognizer's input height (PP-OCR's rec_img_shape)
CLS_SHAPE = (48, 192)  # the angle classifier's input (PP-OCRv4's cls_image_shape)
MAX_PIECE_RATIO = 40  # a line wider than this many heights is read in pieces: the recognizer's width grows with it
MIN_LINE_PX = 4  # a crop thinner than this has no readable text
MAX_LINE_HEIGHT = 2000  # a crop taller than this is not a text line (the detector merged a block or a picture)
REC_BATCH = 32  # crops a second-stage call reads together (one pass of the classifier, one vote on their way up)
# columns (at the recognizer's height) of one recognizer pass: 8 word-sized crops together, a long line alone; on
# one core a batch of 8 long lines cost 14 % more per line than one at a time, padding and all
REC_COLUMNS = 1536


def models_dir() -> Path:
    """The folder of the ONNX models the `rapidocr` wheel ships.

    Raises:
        RecognizerError: the wheel is not installed.
    """
    try:
        import rapidocr
    except ImportError:
        raise RecognizerError(
            "recognizer 'text' needs the rapidocr wheel (its PP-OCR models): pip install 'tilerec[text]'"
        ) from None
    return Path(rapidocr.__file__).parent / "models"


def _model(param: str, value: str, filename: str) -> Path:
    """The model named by the parameter, else the wheel's own; it must be a file."""
    path = Path(value).expanduser() if value else models_dir() / filename
    if not path.is_file():
        source = f"parameter {param!r}" if value else "the rapidocr wheel"
        raise RecognizerError(f"recognizer 'text': model file {path} (from {source}) does not exist")
    return path


def oriented_lines(quads: np.ndarray) -> np.ndarray:
    """(N, 5) oriented boxes (cx, cy, w, h, angle) of line quads, the width along the longer side, angle in (-90, 90]:
    the line's direction up to a half turn, which the angle classifier settles when the line is read.

    Args:
        quads: (N, 4, 2) corner points, as the DB post-processing gives them.
    """
    boxes = np.zeros((len(quads), 5))
    for k, quad in enumerate(np.asarray(quads, dtype=np.float32).reshape(-1, 4, 2)):
        (cx, cy), (w, h), angle = cv2.minAreaRect(quad)
        if h > w:
            w, h, angle = h, w, angle - 90
        angle = angle - 180 if angle > 90 else angle + 180 if angle <= -90 else angle
        boxes[k] = cx, cy, w, h, angle
    return boxes


def lines_from_obb(obb: np.ndarray, scores: np.ndarray) -> Detections:
    """Detections labelled "text" from oriented line boxes, each box the hull of its corners."""
    corners = obb_corners(obb)
    xyxy = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    return Detections(xyxy, scores, ["text"] * len(obb), obb=obb)


def near_edge(lines: Detections, width: int, height: int) -> np.ndarray:
    """Lines whose box comes within half its height of the tile's edge: a seam may have cut them (DB's boxes stop
    a few pixels short of letters cut at the edge, more than the merge's generic seam margin)."""
    reach = np.maximum(lines.obb[:, 3:4] / 2, 2.0)
    x1, y1, x2, y2 = (lines.xyxy[:, k : k + 1] for k in range(4))
    return ((x1 <= reach) | (y1 <= reach) | (x2 >= width - reach) | (y2 >= height - reach)).reshape(-1)


class TextLines:
    """PP-OCR's DB detector on a tile: text lines as oriented boxes ("text").

    The tile is scaled by `det_scale` (to a multiple of 32 px a side, as PP-OCR does) before the network: 0.5 finds
    the lines of a 300-dpi page at a quarter of the cost; text under about 12 px tall at that scale is missed.
    """

    def __init__(
        self,
        det_model: str,
        rec_model: str,
        cls_model: str,
        keys: str,
        det_scale: float,
        det_threshold: float,
        box_threshold: float,
        unclip_ratio: float,
        text_score: float,
        use_cls: bool,
    ) -> None:
        if not 0.05 <= det_scale <= 4:
            raise RecognizerError(f"recognizer 'text': parameter 'det_scale' must be in [0.05, 4], got {det_scale}")
        self.session = _session(_model("det_model", det_model, DET_FILE), "text", "det_model")
        # the reading models are the second stage's; a wrong path fails the first tile, not every line
        _model("rec_model", rec_model, REC_FILE)
        if use_cls:
            _model("cls_model", cls_model, CLS_FILE)
        if keys and not Path(keys).expanduser().is_file():
            raise RecognizerError(f"recognizer 'text': keys file {keys} (parameter 'keys') does not exist")
        from rapidocr.ch_ppocr_det.utils import DBPostProcess  # the wheel is there: _model found its models

        self.input = self.session.get_inputs()[0].name
        self.scale = det_scale
        self.post = DBPostProcess(
            thresh=det_threshold, box_thresh=box_threshold, unclip_ratio=unclip_ratio, use_dilation=True
        )

    def __call__(self, tile: np.ndarray) -> Detections:
        height, width = tile.shape[:2]
        size = (max(32, round(width * self.scale / 32) * 32), max(32, round(height * self.scale / 32) * 32))
        picture = cv2.resize(_bgr(tile), size, interpolation=cv2.INTER_AREA if self.scale < 1 else cv2.INTER_LINEAR)
        blob = (picture.astype(np.float32).transpose(2, 0, 1)[None] * np.float32(2 / 255)) - np.float32(1)
        prediction = self.session.run(None, {self.input: blob})[0]
        quads, scores = self.post(prediction, (height, width))  # rounded and clipped to the tile, by the ratio
        if not len(quads):
            return Detections.empty()
        found = lines_from_obb(oriented_lines(quads), np.asarray(scores, dtype=np.float64))
        found.cut = near_edge(found, width, height)
        return found


@dataclass(frozen=True)
class Reading:
    """What one line says: its text, the recognizer's mean character confidence, and whether it was read turned
    a half turn from its box's angle (upside down on the page)."""

    text: str
    score: float
    flipped: bool


def piece_bounds(profile: np.ndarray, height: int, max_ratio: float = MAX_PIECE_RATIO) -> list[tuple[int, int]]:
    """Where to cut a long line into pieces the recognizer reads well: at the emptiest column (least ink) near each
    `max_ratio` heights, so a cut falls between letters.

    Args:
        profile: ink per column of the rectified line (higher: more ink).
        height: the line's height in pixels.
        max_ratio: the widest piece, in heights.

    Returns:
        (start, stop) columns of consecutive pieces covering the line.
    """
    width, longest = len(profile), max(1, int(max_ratio * height))
    bounds, start = [], 0
    while width - start > longest:
        low, high = start + longest * 3 // 4, start + longest
        cut = low + int(np.argmin(profile[low:high]))
        bounds.append((start, cut))
        start = cut
    bounds.append((start, width))
    return bounds


def column_chunks(widths: Sequence[int], columns: int = REC_COLUMNS) -> list[list[int]]:
    """Crops grouped for the recognizer's passes: by width, each pass as many as fit in `columns` padded to its
    widest (at least one).

    Args:
        widths: each crop's width at the recognizer's height.
        columns: the most columns of a pass (its crops times its widest).

    Returns:
        Indices into `widths`, a list per pass, narrowest first.
    """
    chunks: list[list[int]] = []
    for k in np.argsort(widths, kind="stable").tolist():
        if chunks and (len(chunks[-1]) + 1) * widths[k] <= columns:
            chunks[-1].append(k)
        else:
            chunks.append([k])
    return chunks


def joined_pieces(texts: Sequence[str], gaps: Sequence[bool]) -> str:
    """The text of a line read in pieces: pieces joined with a space where the cut fell in a blank gap (between
    words), else directly (inside a word), with no doubled spaces."""
    text = texts[0] if texts else ""
    for piece, gap in zip(texts[1:], gaps, strict=True):
        text = f"{text.rstrip()} {piece.lstrip()}" if gap else text + piece
    return " ".join(text.split(" ")).strip()


class LineReader:
    """PP-OCR's angle classifier and recognizer on rectified line crops.

    The crops of one call are first read the way up the classifier finds likelier for them together (each judged
    by its two ends, `classifier_views`; `upside_down_together`); a reading that scores under `sure` is read the
    other way up too and the better kept: upside-down text reads with a low score, so a line turned against its
    neighbours still reads, and the classifier, trained on words, may be unsure of a rare script (without it,
    `use_cls=False`, every crop starts upright).
    """

    def __init__(self, rec_model: str, cls_model: str, keys: str, use_cls: bool, sure: float = 0.9) -> None:
        rec_path = _model("rec_model", rec_model, REC_FILE)
        self.rec = _session(rec_path, "text", "rec_model")
        from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode  # the wheel is there: _model found its models

        metadata = self.rec.get_modelmeta().custom_metadata_map
        if keys:
            key_path = Path(keys).expanduser()
            if not key_path.is_file():
                raise RecognizerError(f"recognizer 'text': keys file {key_path} (parameter 'keys') does not exist")
            self.decode = CTCLabelDecode(character_path=key_path)
        elif "character" in metadata:
            self.decode = CTCLabelDecode(character=metadata["character"].splitlines())
        else:
            raise RecognizerError(
                f"recognizer 'text': model {rec_path} has no 'character' metadata: name its dictionary in 'keys'"
            )
        self.cls = _session(_model("cls_model", cls_model, CLS_FILE), "text", "cls_model") if use_cls else None
        self.sure = sure

    def _recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Text and score of each crop (BGR, any size), the narrowest together, `REC_COLUMNS` columns a pass."""
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        widths = [max(1, math.ceil(REC_HEIGHT * c.shape[1] / max(1, c.shape[0]))) for c in crops]
        for chunk in column_chunks(widths):
            blob = np.zeros((len(chunk), 3, REC_HEIGHT, max(widths[k] for k in chunk)), np.float32)
            for row, k in enumerate(chunk):
                picture = cv2.resize(crops[k], (widths[k], REC_HEIGHT), interpolation=cv2.INTER_LINEAR)
                blob[row, :, :, : widths[k]] = picture.transpose(2, 0, 1) * np.float32(2 / 255) - np.float32(1)
            scores = self.rec.run(None, {self.rec.get_inputs()[0].name: blob})[0]  # (crops, steps, characters)
            best = scores.argmax(axis=2)
            # the wheel's decoder on the best character of each step and its score (one pass over the scores, not
            # its two: they are 18,000 characters wide)
            found, _ = self.decode.decode(
                best, np.take_along_axis(scores, best[..., None], 2)[..., 0], remove_duplicate=True
            )
            for row, k in enumerate(chunk):
                results[k] = (str(found[row][0]), float(found[row][1]))
        return results

    def upside_down(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 2) probabilities of each crop being upright (0°) and upside down (180°): the mean over its views
        (`classifier_views`)."""
        height, width = CLS_SHAPE
        views = [classifier_views(crop) for crop in crops]
        blob = np.zeros((sum(len(v) for v in views), 3, height, width), np.float32)
        for k, picture in enumerate(picture for crop_views in views for picture in crop_views):
            blob[k, :, :, : picture.shape[1]] = picture.transpose(2, 0, 1) * np.float32(2 / 255) - np.float32(1)
        found = self.cls.run(None, {self.cls.get_inputs()[0].name: blob})[0]
        ends = np.cumsum([len(v) for v in views])
        return np.array([found[end - len(v) : end].mean(axis=0) for v, end in zip(views, ends, strict=True)])

    def read_line(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Text and score of upright line crops; a crop wider than `MAX_PIECE_RATIO` heights is read in pieces."""
        pieces, owners, gaps = [], [], []
        for k, crop in enumerate(crops):
            ink = 255 - cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.int32)
            profile = np.abs(ink - np.median(ink, axis=None)).sum(axis=0)
            bounds = piece_bounds(profile, crop.shape[0])
            for start, stop in bounds:
                pieces.append(crop[:, start:stop])
                owners.append(k)
            # a cut in a blank run as wide as a third of the height falls between words
            gaps.append([_blank_around(profile, stop, crop.shape[0] // 3) for _, stop in bounds[:-1]])
        read = self._recognize(pieces)
        results = []
        for k in range(len(crops)):
            mine = [read[i] for i, owner in enumerate(owners) if owner == k]
            text = joined_pieces([t for t, _ in mine], gaps[k])
            results.append((text, float(np.mean([s for _, s in mine]))))
        return results

    def read(self, crops: Sequence[np.ndarray]) -> list[Reading]:
        """Each rectified crop's reading, turned a half turn where that reads better.

        Args:
            crops: BGR pictures of lines, each's x axis along its box's (`pipeline.recognizers.stages.rectify`).
        """
        if not crops:
            return []
        turned = [cv2.rotate(crop, cv2.ROTATE_180) for crop in crops]
        flip = np.zeros(len(crops), dtype=bool)
        if self.cls is not None:
            flip[:] = upside_down_together(
                self.upside_down(crops)[:, 1], [c.shape[1] / max(1, c.shape[0]) for c in crops]
            )
        chosen = self.read_line([t if f else c for c, t, f in zip(crops, turned, flip, strict=True)])
        readings = [Reading(text, score, bool(f)) for (text, score), f in zip(chosen, flip, strict=True)]
        doubtful = [k for k, reading in enumerate(readings) if reading.score < self.sure]
        other = self.read_line([crops[k] if flip[k] else turned[k] for k in doubtful])
        for k, (text, score) in zip(doubtful, other, strict=True):
            if score > readings[k].score:
                readings[k] = Reading(text, score, not flip[k])
        return readings


def upside_down_together(upside_down: np.ndarray, lengths: Sequence[float]) -> bool:
    """Whether lines read together are likelier upside down, by the classifier's votes weighted by each line's
    length (in heights): lines near one another on a page run the same way, and a short word alone can read well
    both ways up ("dopunibi" reads "!qundop" turned a half turn, with a high score), so the page decides for it.

    Args:
        upside_down: each line's probability of being upside down.
        lengths: each line's width over its height.
    """
    weights = np.asarray(lengths, dtype=np.float64)
    return bool(len(weights)) and float(np.dot(np.asarray(upside_down, dtype=np.float64), weights)) > weights.sum() / 2


def classifier_views(crop: np.ndarray, shape: tuple[int, int] = CLS_SHAPE) -> list[np.ndarray]:
    """What the angle classifier sees of a rectified line: the line scaled to the classifier's height, its first
    and its last `shape` width of columns (one view if it fits), unsquashed. Squeezed whole into the input, as
    PP-OCR does, a line of made-up words was judged upside down a third of the time, and every such line cost a
    second reading; its two ends judged at their own proportions, none was.

    Args:
        crop: BGR line, its x axis along the line.
        shape: the classifier's input (height, width).
    """
    height, width = shape
    columns = math.ceil(width * crop.shape[0] / height)  # the crop's columns that fill the input at its height
    if crop.shape[1] <= columns:
        scaled = math.ceil(height * crop.shape[1] / max(1, crop.shape[0]))
        return [cv2.resize(crop, (max(1, min(width, scaled)), height), interpolation=cv2.INTER_LINEAR)]
    return [cv2.resize(end, (width, height), interpolation=cv2.INTER_LINEAR)
            for end in (crop[:, :columns], crop[:, -columns:])]  # fmt: skip


def _blank_around(profile: np.ndarray, column: int, half: int) -> bool:
    """The columns within `half` of `column` carry no ink (a space between words)."""
    window = profile[max(0, column - half) : column + half + 1]
    return bool(len(window)) and float(window.max()) <= 0.02 * float(profile.max() or 1)


def unreadable(obb: Sequence[float]) -> str | None:
    """Why a line's box cannot be read, or None: too thin for letters, or taller than any text line."""
    height = float(obb[3])
    if height < MIN_LINE_PX or float(obb[2]) < MIN_LINE_PX:
        return f"too small to read ({float(obb[2]):.0f}x{height:.0f} px; at least {MIN_LINE_PX} px a side)"
    if height > MAX_LINE_HEIGHT:
        return f"too tall for a text line ({height:.0f} px; at most {MAX_LINE_HEIGHT})"
    return None
