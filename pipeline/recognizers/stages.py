"""The second stage: after the merge, a recognizer run once on the full-resolution crop of each merged detection.

A recognizer declares one in its spec (`RecognizerSpec.second_stage`: a factory taking the job's recognizer
parameters and returning a `SecondStage`). The same functions run in one process (`inference.recognize_source`)
and on Celery workers (`tilerec.recognize_crops` batches, gathered by `tilerec.finish`), so both give the same
result:

    plan_crops(merged detections)      which detections the stage wants, and each one's crop window
    read_crops(read, crops, …)         each crop's pixels read at full resolution, `SecondStage.recognize` on them
                                       (one JSON record per crop; records never reach the result by themselves)
    finish_stage(recognition, …)       `SecondStage.finish` over all detections and their records, once: the
                                       result's detections (new data columns, labels, scores) and page-level output

No Celery here: resources a `finish` needs that live elsewhere (a gallery of known faces, say) are declared by name
in `SecondStage.resources` and given to `finish_stage` by the caller (in process: `recognize_image(...,
resources={...})`; on workers: loaders registered in `tasks.resources`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from pipeline.model import Detections, Recognition, StageSummary
from pipeline.recognizers import spec_of
from pipeline.shapes import obb_corners, obb_from_points
from pipeline.tiling import Window, auto_batch_size, tapered_sizes


class StageError(ValueError):
    """A second stage cannot run: a resource its finish needs is missing, or it broke its contract."""


@dataclass(frozen=True)
class Crop:
    """What a second stage gets for one detection.

    `pixels` are 8-bit, at the image's full resolution (the job's level), in the channels its tiles were recognized
    in: grey for a grey recognizer (`RecognizerSpec.grey`) or a grey image, else BGR. `detection` is the detection
    (one row of `Detections`, every column: box, obb, mask, points, keypoints, texts, data) moved into the crop's
    coordinates, so its shape lies where it is in `pixels`."""

    index: int  # the crop's number in the job's plan
    row: int  # its detection's row in the merged detections
    window: Window  # where the crop lies in the image (its index: the crop's number)
    pixels: np.ndarray
    detection: Detections


@dataclass(frozen=True)
class StageResult:
    """What `SecondStage.finish` returns: the result's detections and page-level output (JSON values, kept in
    `Recognition.second_stage.output`: the page's text in reading order, a word count, …)."""

    detections: Detections
    output: dict[str, Any] = field(default_factory=dict)


class SecondStage:
    """Base of a second stage; a subclass implements `recognize` and, where records are not to become data columns
    as they are, `finish`. Build models lazily (on the first `recognize`): the stage is also built where only its
    planning and `finish` run (the merge and the final callback).

    Attributes:
        name: shown in the result (`second_stage.name`).
        cost_ms: a rough time for one crop on one core; sizes crop batches (about TILEREC_BATCH_TARGET_MS each).
        max_batch: crops per `recognize` call.
        margin: share of the detection's width and height added around it on each side, for its crop window.
        pad: pixels added on each side, besides `margin`.
        max_crop_pixels: a larger crop fails without being read (it would cost that much memory on a worker).
        resources: names of what `finish` needs beyond the detections and records (see the module's doc).
    """

    name = "second-stage"
    cost_ms = 20.0
    max_batch = 8
    margin = 0.0
    pad = 0
    max_crop_pixels = 50_000_000
    resources: tuple[str, ...] = ()

    def wants(self, detections: Detections) -> np.ndarray:
        """The rows of the merged detections to crop and recognize (all by default)."""
        return np.arange(len(detections))

    def region(self, detections: Detections, row: int) -> np.ndarray:
        """The part of the image to crop for a detection, [x1, y1, x2, y2] in image pixels (before clipping):
        by default its shape's bounds (`shape_bounds`) with `margin` and `pad` around."""
        return expand(shape_bounds(detections, row), self.margin, self.pad)

    def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
        """One JSON-able record per crop, in order (at most `max_batch` crops a call)."""
        raise NotImplementedError(f"{type(self).__name__}.recognize")

    def finish(
        self, detections: Detections, records: Sequence[Mapping[str, Any] | None], resources: Mapping[str, Any]
    ) -> StageResult:
        """The result from all merged detections and, per row, its crop's record (None: not cropped, over
        max_crops, or failed). By default every record field becomes a data column of its detection."""
        names = sorted({key for record in records if record for key in record})
        columns = {name: [None if r is None else r.get(name) for r in records] for name in names}
        return StageResult(detections.with_data(columns))


@dataclass(frozen=True)
class PlannedCrop:
    """A detection's row in the merged detections and its crop window (the window's index: the crop's number)."""

    row: int
    window: Window


@dataclass(frozen=True)
class CropPlan:
    """The crops of a job, in order, and how many wanted detections were left out by `max_crops`."""

    crops: list[PlannedCrop]
    over_limit: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"crops": [[c.row, *c.window.to_list()[1:]] for c in self.crops], "over_limit": self.over_limit}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CropPlan:
        crops = [PlannedCrop(int(row), Window(n, int(x), int(y), int(w), int(h)))
                 for n, (row, x, y, w, h) in enumerate(data["crops"])]  # fmt: skip
        return cls(crops, int(data["over_limit"]))


@dataclass(frozen=True)
class CropOutcome:
    """What became of one crop: its record, or the error that stopped it; `seconds` from reading to record."""

    index: int
    record: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The claim-check record a crop batch stores for the final callback."""
        document: dict[str, Any] = {"crop": self.index, "seconds": self.seconds}
        if self.error is not None:
            document["error"] = self.error
        else:
            document["record"] = self.record
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CropOutcome:
        return cls(int(data["crop"]), data.get("record"), data.get("error"), float(data.get("seconds", 0.0)))


@lru_cache(maxsize=16)
def built_stage(name: str, params: str) -> SecondStage:
    """The second stage of recognizer `name` for its parameters (`params`: their JSON, sorted), built once per
    process."""
    factory = spec_of(name).second_stage
    if factory is None:
        raise StageError(f"recognizer {name!r} has no second stage")
    stage = factory(json.loads(params))
    if not isinstance(stage, SecondStage):
        raise StageError(f"recognizer {name!r}: its second_stage factory returned {type(stage).__name__}, "
                         "not a pipeline.recognizers.stages.SecondStage")  # fmt: skip
    return stage


def shape_bounds(detections: Detections, row: int) -> np.ndarray:
    """[x1, y1, x2, y2] around a detection's box, oriented box and mask, in its coordinates."""
    x1, y1, x2, y2 = detections.xyxy[row].tolist()
    cx, cy, w, h, angle = detections.obb[row].tolist()
    if not math.isnan(cx):  # the oriented box's upright bounds: half extents of the turned sides (per row, in
        # plain floats: a merge plans thousands of crops)
        cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
        half_x, half_y = (w * cos + h * sin) / 2, (w * sin + h * cos) / 2
        x1, y1, x2, y2 = min(x1, cx - half_x), min(y1, cy - half_y), max(x2, cx + half_x), max(y2, cy + half_y)
    mask = detections.masks[row]
    if mask is not None:
        mx1, my1, mx2, my2 = mask.bounds
        x1, y1, x2, y2 = min(x1, mx1), min(y1, my1), max(x2, mx2), max(y2, my2)
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def expand(xyxy: np.ndarray, margin: float = 0.0, pad: float = 0.0) -> np.ndarray:
    """[x1, y1, x2, y2] grown by `margin` times its width and height, plus `pad` pixels, on each side."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    dx, dy = margin * (x2 - x1) + pad, margin * (y2 - y1) + pad
    return np.array([x1 - dx, y1 - dy, x2 + dx, y2 + dy], dtype=np.float64)


def crop_window(xyxy: np.ndarray, bounds: Window, index: int = 0) -> Window | None:
    """The whole pixels covering [x1, y1, x2, y2], clipped to `bounds` (the job's region); None if nothing is
    left."""
    x1, y1 = max(bounds.x, math.floor(xyxy[0])), max(bounds.y, math.floor(xyxy[1]))
    x2, y2 = min(bounds.x2, math.ceil(xyxy[2])), min(bounds.y2, math.ceil(xyxy[3]))
    if x2 <= x1 or y2 <= y1:
        return None
    return Window(index, x1, y1, x2 - x1, y2 - y1)


def plan_crops(detections: Detections, stage: SecondStage, bounds: Window, max_crops: int | None = None) -> CropPlan:
    """The crops of the merged detections: the rows the stage wants (the `max_crops` highest-scoring of them, if
    more), in row order, each with its window clipped to `bounds`; a row whose window is empty is left out.

    Args:
        detections: the merged detections, in image coordinates.
        stage: the job's second stage.
        bounds: the region the job covers (`inference.region`): crops never reach beyond the tiles.
        max_crops: at most this many crops; None: no limit.
    """
    wanted = np.asarray(stage.wants(detections), dtype=np.int64).reshape(-1)
    over = 0
    if max_crops is not None and len(wanted) > max_crops:
        kept = np.argsort(-detections.scores[wanted], kind="stable")[:max_crops]
        over, wanted = len(wanted) - max_crops, np.sort(wanted[kept])
    crops = []
    for row in wanted.tolist():
        window = crop_window(stage.region(detections, row), bounds, len(crops))
        if window is not None:
            crops.append(PlannedCrop(row, window))
    return CropPlan(crops, over)


def crop_spans(
    count: int, cost_ms: float, target_ms: float, least: int, size: int | None = None, processes: int = 0
) -> list[tuple[int, int]]:
    """Crops [0, count) cut into batches as `[first, stop)` ranges: `size` each, or (None) as tile batches are
    (`tiling.auto_batch_size`: about `target_ms` of work each, at least `least` batches, larger ones for a big job
    on a cluster of `processes` tile processes, the last ones tapered for each process so they finish together); but
    no batch but the first (the remainder) holds less than a quarter of `target_ms` (cheap crops: a task's own cost
    must stay a small share of its work)."""
    if count == 0:
        return []
    if size is None:
        smallest = min(count, math.ceil(target_ms / 4 / max(cost_ms, 1e-3)))
        size = max(auto_batch_size(count, cost_ms, target_ms, least, processes), smallest)
        lanes = max(1, processes)
        sizes = (tapered_sizes(count, size, lanes, smallest) if least > 1
                 else [size] * (count // size) + [count % size])  # fmt: skip
    else:
        sizes = [size] * (count // size) + [count % size]
    spans, start = [], 0
    for length in (s for s in sizes if s):
        spans.append((start, start + length))
        start += length
    return spans


def read_crops(
    read: Callable[[Window], np.ndarray | None],
    crops: Sequence[PlannedCrop],
    detections: Detections,
    stage: SecondStage,
    reraise: tuple[type[BaseException], ...] = (),
) -> list[CropOutcome]:
    """Crops read and recognized, in one process or in a crop batch alike.

    Args:
        read: gives a window's pixels at full resolution, in the channels the stage gets (None: nothing there).
        crops: the planned crops to do.
        detections: the merged detections the crops were planned on.
        stage: the job's second stage.
        reraise: errors that are not the crops' own (a store outage) and must reach the caller.

    Returns:
        Each crop's outcome, in order. A `recognize` call that fails is made again crop by crop, so an error
        belongs to the crop that caused it.
    """
    outcomes: dict[int, CropOutcome] = {}
    pending: list[tuple[Crop, float]] = []
    for planned in crops:
        began = time.perf_counter()
        try:
            window = planned.window
            if window.width * window.height > stage.max_crop_pixels:
                raise StageError(f"the crop is {window.width}x{window.height} pixels, more than the stage reads "
                                 f"({stage.max_crop_pixels:,} pixels, its max_crop_pixels)")  # fmt: skip
            pixels = read(planned.window)
            if pixels is None:
                raise StageError("no pixels there to read (all nodata)")
        except reraise:
            raise
        except Exception as error:
            outcomes[planned.window.index] = CropOutcome(planned.window.index, error=_describe(error),
                                                         seconds=time.perf_counter() - began)  # fmt: skip
            continue
        shape = detections[[planned.row]].shifted(-window.x, -window.y)
        pending.append((Crop(window.index, planned.row, window, pixels, shape), time.perf_counter() - began))
        if len(pending) == max(1, stage.max_batch):
            outcomes.update(_recognize_pass(stage, pending, reraise))
            pending = []
    if pending:
        outcomes.update(_recognize_pass(stage, pending, reraise))
    return [outcomes[planned.window.index] for planned in crops]


def _recognize_pass(
    stage: SecondStage, pending: list[tuple[Crop, float]], reraise: tuple[type[BaseException], ...]
) -> dict[int, CropOutcome]:
    """One `recognize` call; each crop's seconds are its read plus its share of the call."""
    began = time.perf_counter()
    try:
        records = stage.recognize([crop for crop, _ in pending])
        if not isinstance(records, list) or len(records) != len(pending):
            got = f"{len(records)} records" if isinstance(records, list) else type(records).__name__
            raise StageError(f"recognize returned {got} for {len(pending)} crops, not a list of one record each")
        for record in records:
            _check_record(record)
    except reraise:
        raise
    except Exception as error:
        if len(pending) > 1:  # whose crop was it? each alone says
            return {k: v for one in pending for k, v in _recognize_pass(stage, [one], reraise).items()}
        crop, read_s = pending[0]
        return {crop.index: CropOutcome(crop.index, error=_describe(error),
                                        seconds=read_s + time.perf_counter() - began)}  # fmt: skip
    share = (time.perf_counter() - began) / len(pending)
    return {crop.index: CropOutcome(crop.index, record, seconds=read_s + share)
            for (crop, read_s), record in zip(pending, records, strict=True)}  # fmt: skip


def _check_record(record: Any) -> None:
    """A record must be a JSON object: it is stored as JSON between the crop batches and the final callback."""
    if not isinstance(record, dict):
        raise StageError(f"a crop's record must be a dict, got {type(record).__name__}")
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise StageError(f"a crop's record is not JSON: {error}") from None


def _describe(error: BaseException) -> str:
    detail = str(error) or ("the stage ran out of memory on this crop" if isinstance(error, MemoryError) else "")
    return f"{type(error).__name__}: {detail}".rstrip(": ")


def finish_stage(
    recognition: Recognition,
    stage: SecondStage,
    plan: CropPlan,
    outcomes: Sequence[CropOutcome],
    resources: Mapping[str, Any] | None = None,
    *,
    batches: int = 1,
    started: float | None = None,
) -> Recognition:
    """The job's result: `stage.finish` over the merged detections and their crops' records, once.

    Args:
        recognition: the first stage's merged result.
        stage: the job's second stage.
        plan: the crops planned (`plan_crops`).
        outcomes: one or more per crop, in any order; the first of a crop counts (a redone crop counts once).
        resources: what `stage.resources` names (its `finish` reads them).
        batches: how many batch tasks the crops were cut into (1 in one process).
        started: when the job started (`time.time()`), for `total_s`; None keeps the first stage's.

    Returns:
        The Recognition with the stage's detections and `second_stage` (crops, failed crops, output).

    Raises:
        StageError: a resource named by the stage is missing, or its finish broke its contract.
    """
    resources = dict(resources or {})
    missing = [name for name in stage.resources if name not in resources]
    if missing:
        raise StageError(f"the second stage {stage.name!r} needs {', '.join(missing)}, which nobody provided "
                         "(in process: recognize_image(..., resources=…); on workers: tasks.resources)")  # fmt: skip
    began = time.time()
    by_crop: dict[int, CropOutcome] = {}
    for outcome in outcomes:
        by_crop.setdefault(outcome.index, outcome)
    records: list[dict[str, Any] | None] = [None] * len(recognition.detections)
    failed = []
    for planned in plan.crops:
        outcome = by_crop.get(planned.window.index)
        if outcome is None or outcome.error is not None:
            box = recognition.detections.xyxy[planned.row]
            failed.append({"crop": planned.window.index, "box": _xywh(box), "window": planned.window.to_list()[1:],
                           "error": "no result" if outcome is None else outcome.error})  # fmt: skip
        else:
            records[planned.row] = outcome.record
    result = stage.finish(recognition.detections, records, {name: resources[name] for name in stage.resources})
    if not isinstance(result, StageResult) or not isinstance(result.detections, Detections):
        raise StageError(f"the second stage {stage.name!r}: finish must return a StageResult of Detections")
    try:
        json.dumps(result.output, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise StageError(f"the second stage {stage.name!r}: its output is not JSON: {error}") from None
    finished = time.time()
    summary = StageSummary(stage.name, crops=len(plan.crops), batches=batches, over_limit=plan.over_limit,
                           failed_crops=failed, output=result.output)  # fmt: skip
    timings = dict(recognition.timings)
    timings.update(crops_s=sum(o.seconds for o in by_crop.values()), finish_s=finished - began)
    if started is not None:
        timings["total_s"] = finished - started
    return replace(recognition, detections=result.detections, second_stage=summary, timings=timings)


def _xywh(xyxy: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (round(float(v), 2) for v in xyxy)
    return [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]


def quad_of(detection: Detections, row: int = 0) -> np.ndarray:
    """(4, 2) corners of a detection's oriented box, in the order (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2)
    of the box's own axes: its obb, else the smallest oriented box around its mask's outline, else its box."""
    if detection.with_obb()[row]:
        return obb_corners(detection.obb[row])[0]
    mask = detection.masks[row]
    if mask is not None:
        outline = np.concatenate([np.asarray(g.exterior.coords) for g in getattr(mask, "geoms", [mask])])
        return obb_corners(obb_from_points(outline))[0]
    x1, y1, x2, y2 = detection.xyxy[row]
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def rectify(pixels: np.ndarray, quad: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """The quadrilateral `quad` of `pixels` warped upright (a rotated text line read straight).

    Args:
        pixels: the crop (or any image) the quad's coordinates refer to.
        quad: (4, 2) corners in the order top-left, top-right, bottom-right, bottom-left of the wanted upright
            image (`quad_of` gives a detection's).
        size: (width, height) of the result; None: the quad's own side lengths.

    Returns:
        The upright pixels, bilinear, with the edge pixels replicated where the quad reaches past `pixels`.
    """
    quad = np.asarray(quad, dtype=np.float32).reshape(4, 2)
    if size is None:
        width = max(np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3]))
        height = max(np.linalg.norm(quad[3] - quad[0]), np.linalg.norm(quad[2] - quad[1]))
        size = (max(1, round(float(width))), max(1, round(float(height))))
    w, h = size
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    # corners of pixels (the quad's, the result's) to OpenCV's coordinates of pixel centres
    matrix = cv2.getPerspectiveTransform(quad - 0.5, target - 0.5)
    return cv2.warpPerspective(pixels, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
