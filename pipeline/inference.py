"""Recognizing tiles and merging them: the same functions run in one process and on Celery workers,
so the two give identical detections."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.merge.detections import merge_detections, place
from pipeline.model import Detections, Recognition, Spatial
from pipeline.options import JobOptions, OptionsError, parse_options
from pipeline.readers.images import normalize
from pipeline.readers.sources import ArraySource, Source
from pipeline.recognizers import Recognizer, get_recognizer, recognize_many, spec_of, tiles_per_pass
from pipeline.recognizers.stages import SecondStage, built_stage, finish_stage, plan_crops, read_crops
from pipeline.tiling import Window, auto_batch_size, batches, grid, row_batches, tail_smallest, tapered_batches


class TileFailure(RuntimeError):
    """One or more tiles of a job could not be recognized."""


@dataclass(frozen=True)
class TileOutcome:
    """What became of one tile: its detections in image coordinates, a skip (blank: neither detections nor an
    error), or the error that stopped it; `seconds` from reading it to its placed detections."""

    index: int
    detections: Detections | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The record a tile task stores for the merge: exact columns, compact JSON."""
        record: dict[str, Any] = {"tile": self.index, "seconds": self.seconds}
        if self.error is not None:
            record["error"] = self.error
        elif self.detections is None:
            record["skipped"] = True
        else:
            record.update(self.detections.to_columns())
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TileOutcome:
        detections = Detections.from_columns(record) if "xyxy" in record else None
        return cls(int(record["tile"]), detections, record.get("error"), float(record.get("seconds", 0.0)))


def crop(image: np.ndarray, window: Window) -> np.ndarray:
    return image[window.y : window.y2, window.x : window.x2]


def region(height: int, width: int, options: JobOptions) -> Window:
    """The part of the image the job covers: its `roi`, checked to lie inside the image, or the whole image."""
    if options.roi is None:
        return Window(0, 0, 0, width, height)
    x, y, w, h = options.roi
    if x + w > width or y + h > height:
        raise OptionsError(f"roi {options.roi} is not inside the {width}x{height} image (level {options.level})")
    return Window(0, x, y, w, h)


def windows_of(height: int, width: int, options: JobOptions) -> list[Window]:
    """The tile grid over the job's region, in the image's coordinates (so detections need no further shift)."""
    covered = region(height, width, options)
    tiles = grid(covered.height, covered.width, options.tile, options.overlap)
    if covered.x == covered.y == 0:
        return tiles
    return [Window(t.index, t.x + covered.x, t.y + covered.y, t.width, t.height) for t in tiles]


def plan(
    height: int,
    width: int,
    options: JobOptions,
    tile_cost_ms: float | None = None,
    target_batch_ms: float = 400.0,
    min_batches: int = 16,
    taper: bool = True,
    row_by_row: bool = False,
    processes: int = 0,
) -> list[list[Window]]:
    """The tile grid cut into batches: `batch_size` tiles each, or (auto) about `target_batch_ms` of work per batch
    and at least `min_batches` batches, with a tapered tail so the workers finish together (`taper=False`: one
    worker process, nothing to balance, and the tail's batches would only add their overhead). With `row_by_row`,
    for an image whose tiles become ready row by row as it decodes, auto batches never span two rows of tiles
    (`tiling.row_batches`).

    `tile_cost_ms` is what a 640x640 tile costs, measured on earlier jobs; by default the recognizer's estimate.
    `processes`: the cluster's tile processes (0: unknown), so a big job gets a few large batches per process
    (`tiling.auto_batch_size`) and a tail of small ones for each process (`tiling.tapered_sizes`).
    A recognizer's `batch` parameter (tiles per forward pass) rounds auto batches up to whole passes; the tail's
    smallest batch holds `tiling.TAIL_MIN_MS` of work (`tiling.tail_smallest`)."""
    windows = windows_of(height, width, options)
    if options.batch_size is not None:
        return batches(windows, options.batch_size)
    per_640 = spec_of(options.recognizer).cost_ms if tile_cost_ms is None else tile_cost_ms
    cost = per_640 * windows[0].width * windows[0].height / (640 * 640)
    size = auto_batch_size(len(windows), cost, target_batch_ms, min_batches, processes)
    per_pass = options.params.get("batch", 1)  # a recognizer's `batch` parameter: tiles per forward pass
    if isinstance(per_pass, int) and per_pass > 1:  # whole passes per task, the last one of the image aside
        size = -(-size // per_pass) * per_pass
    smallest = tail_smallest(cost, size)
    if row_by_row:
        return row_batches(windows, size, taper, max(1, processes), smallest)
    return tapered_batches(windows, size, max(1, processes), smallest) if taper else batches(windows, size)


def measured_tile_cost(seconds: list[float], height: int, width: int, options: JobOptions) -> float | None:
    """The mean time of a job's recognized tiles, scaled to a 640x640 tile (the unit of `plan`), in ms."""
    if not seconds:
        return None
    covered = region(height, width, options)
    area = min(options.tile, covered.width) * min(options.tile, covered.height)
    return 1000 * sum(seconds) / len(seconds) * (640 * 640) / area


def blank(tile: np.ndarray, options: JobOptions) -> bool:
    """The tile is to be skipped: `skip_blank` is on and the tile has no content (`is_blank`)."""
    return options.skip_blank is not None and is_blank(tile, options.skip_blank)


def is_blank(tile: np.ndarray, threshold: float) -> bool:
    """No content: averaged over 4x4 pixel blocks, no channel varies by more than `threshold` grey levels.

    The averaging flattens sensor noise and compression artefacts, while an object keeps its contrast, however
    small it is in the tile; the range tells them apart where the standard deviation cannot (figures:
    docs/performance.md). Default threshold (skip_blank=true): 16.
    """
    block = 4 if min(tile.shape[:2]) >= 8 else 1
    means = cv2.resize(tile, (tile.shape[1] // block, tile.shape[0] // block), interpolation=cv2.INTER_AREA)
    means = means.reshape(means.shape[0] * means.shape[1], -1)
    spread = means.max(axis=0).astype(np.int16) - means.min(axis=0)
    return bool(spread.max() <= threshold)


def compact(tile: np.ndarray, options: JobOptions) -> np.ndarray:
    """The tile in the channels its recognizer reads: grey for a grey-only one. Tiles are stored this way (a third
    of the bytes), and in-process runs convert the same way, so both feed the recognizer identical pixels."""
    if tile.ndim == 3 and spec_of(options.recognizer).grey:
        return cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
    return tile


def storable(tile: np.ndarray | None, options: JobOptions) -> np.ndarray | None:
    """What a tile store keeps of a tile: None for a blank one (skip_blank) or one with nothing to recognize (all
    nodata: None from its source), else the channels the recognizer reads. A job with a second stage keeps blank
    tiles too (its crops may reach into them; its tile tasks judge them blank themselves)."""
    if tile is None or (blank(tile, options) and not options.second_stage):
        return None
    return compact(tile, options)


def grey_tiles(options: JobOptions) -> bool:
    """The job's tiles are grey from the source on: its recognizer reads grey only and no tile is judged blank
    (`skip_blank` looks at every channel), so an image libvips decodes band by band can be opened `grey`
    (`sources.open_source`) and each band converted once rather than tile by tile, overlaps twice: the same pixels."""
    return spec_of(options.recognizer).grey and options.skip_blank is None


def stage_reader(read: Callable[[Window], np.ndarray | None], options: JobOptions) -> Callable[[Window], Any]:
    """A reader of crops for the second stage from a reader of the image's windows: the same channels as the
    tiles (`compact`), so a crop read from the file and one assembled from stored tiles are the same pixels."""

    def read_crop(window: Window) -> np.ndarray | None:
        pixels = read(window)
        return None if pixels is None else compact(pixels, options)

    return read_crop


def stage_of(options: JobOptions) -> SecondStage | None:
    """The job's second stage, built once per process for its recognizer and parameters; None when it has none
    or the job turned it off (`second_stage=False`)."""
    if not options.second_stage or not isinstance(options.recognizer, str):
        return None
    return built_stage(options.recognizer, json.dumps(options.params, sort_keys=True))


def run_stage(
    recognition: Recognition,
    options: JobOptions,
    read: Callable[[Window], np.ndarray | None],
    bounds: Window,
    resources: Mapping[str, Any] | None = None,
    started: float | None = None,
) -> Recognition:
    """Both steps of the job's second stage in this process (in process, and on a one-batch job's tiling task):
    the same planning and finish as on workers. `read` gives a window's full-resolution pixels in the stage's
    channels. Without a second stage, the recognition as it is."""
    stage = stage_of(options)
    if stage is None:
        return recognition
    plan = plan_crops(recognition.detections, stage, bounds, options.max_crops)
    outcomes = read_crops(read, plan.crops, recognition.detections, stage)
    return finish_stage(recognition, stage, plan, outcomes, resources, started=started)


def _placed(found: Any, tile: np.ndarray, window: Window, options: JobOptions, width: int, height: int) -> Detections:
    """A tile's detections checked, filtered by score and placed in image coordinates.

    Raises:
        ShapeError: the recognizer returned a malformed shape (NaN, an invalid polygon, a mask outside the tile),
            named by column and detection; TypeError: it returned something other than `Detections`.
    """
    if not isinstance(found, Detections):
        raise TypeError(f"the recognizer returned {type(found).__name__}, not pipeline.model.Detections")
    found.check(tile.shape[1], tile.shape[0])
    if options.min_score > 0 and len(found):
        found = found[np.flatnonzero(found.scores >= options.min_score)]
    return place(found, window, width, height)


def recognize_windows(
    read: Callable[[Window], np.ndarray | None],
    windows: Sequence[Window],
    options: JobOptions,
    width: int,
    height: int,
    reraise: tuple[type[BaseException], ...] = (),
    judge_blank: bool = True,
) -> list[TileOutcome]:
    """Windows read and recognized, in one process or in a tile task alike; a recognizer that batches gets up to
    `max_batch` tiles per forward pass.

    Args:
        read: gives a window's pixels (None: known blank, skipped).
        windows: the tiles, in image coordinates.
        options: the job's options.
        width, height: the image's size, to clamp boxes and mark seam cuts.
        reraise: errors that are not the tiles' own (a store outage, say) and must reach the caller.
        judge_blank: look for blank tiles (`skip_blank`); False where `read` judged them already.

    Returns:
        Each window's outcome, in order: its detections, a skip (blank under `skip_blank`), or the error that
        stopped it. A pass that fails is run again tile by tile, so an error belongs to the tile that caused it.
    """
    try:
        recognizer = get_recognizer(options.recognizer, options.params)
    except reraise:
        raise
    except Exception as error:  # built on the first tile of a process: a model that cannot load fails its tiles
        return [TileOutcome(window.index, error=describe(error)) for window in windows]
    per_pass = tiles_per_pass(recognizer)
    outcomes: dict[int, TileOutcome] = {}
    pending: list[tuple[Window, np.ndarray, float]] = []  # read, waiting for a full pass: window, tile, seconds
    for window in windows:
        began = time.perf_counter()
        try:
            tile = read(window)
        except reraise:
            raise
        except Exception as error:  # the tile's own failure: reported per tile, the other tiles still count
            outcomes[window.index] = TileOutcome(window.index, error=describe(error), seconds=_since(began))
            continue
        if tile is None or (judge_blank and blank(tile, options)):
            outcomes[window.index] = TileOutcome(window.index, seconds=_since(began))
            continue
        pending.append((window, tile, _since(began)))
        if len(pending) == per_pass:
            outcomes.update(_recognize_pass(recognizer, pending, options, width, height, reraise))
            pending = []
    if pending:
        outcomes.update(_recognize_pass(recognizer, pending, options, width, height, reraise))
    return [outcomes[window.index] for window in windows]


def tiles_per_forward_pass(options: JobOptions) -> int:
    """The job's recognizer's `max_batch`; 1 where it cannot be built (its tiles then fail with the reason)."""
    try:
        return tiles_per_pass(get_recognizer(options.recognizer, options.params))
    except Exception:
        return 1


def _recognize_pass(
    recognizer: Recognizer,
    pending: list[tuple[Window, np.ndarray, float]],
    options: JobOptions,
    width: int,
    height: int,
    reraise: tuple[type[BaseException], ...],
) -> dict[int, TileOutcome]:
    """One forward pass over read tiles; each tile's seconds are its read plus its share of the pass."""
    began = time.perf_counter()
    try:
        found = recognize_many(recognizer, [compact(tile, options) for _, tile, _ in pending])
    except reraise:
        raise
    except Exception as error:
        if len(pending) > 1:  # whose tile was it? each alone says
            return {k: v for one in pending for k, v in _recognize_pass(recognizer, [one], options, width, height,
                                                                         reraise).items()}  # fmt: skip
        window, _, read_s = pending[0]
        return {window.index: TileOutcome(window.index, error=describe(error), seconds=read_s + _since(began))}
    share = _since(began) / len(pending)
    outcomes = {}
    for (window, tile, read_s), detections in zip(pending, found, strict=True):
        try:
            placed = _placed(detections, tile, window, options, width, height)
        except Exception as error:
            outcomes[window.index] = TileOutcome(window.index, error=describe(error), seconds=read_s + share)
        else:
            outcomes[window.index] = TileOutcome(window.index, placed, seconds=read_s + share)
    return outcomes


def _since(began: float) -> float:
    return time.perf_counter() - began


def recognize_window(
    read: Callable[[Window], np.ndarray | None],
    window: Window,
    options: JobOptions,
    width: int,
    height: int,
    reraise: tuple[type[BaseException], ...] = (),
    judge_blank: bool = True,
) -> TileOutcome:
    """One window's outcome (`recognize_windows` of one window)."""
    return recognize_windows(read, [window], options, width, height, reraise, judge_blank)[0]


def describe(error: BaseException) -> str:
    """An exception as a tile's error: its type and message (MemoryError's is usually empty)."""
    detail = str(error) or ("the recognizer ran out of memory on this tile" if isinstance(error, MemoryError) else "")
    return f"{type(error).__name__}: {detail}".rstrip(": ")


def assemble(
    outcomes: Iterable[TileOutcome],
    windows: Sequence[Window],
    options: JobOptions,
    width: int,
    height: int,
    started: float,
    *,
    source: str | None = None,
    level: int = 0,
    downsample: float = 1.0,
    batches: int = 1,
    timings: Mapping[str, float] | None = None,
    spatial: Spatial | None = None,
) -> Recognition:
    """A job's Recognition from its tiles' outcomes: the one assembly, in one process and in the merge task.

    Args:
        outcomes: one or more per tile, in any order; the first of a tile counts (a redone tile counts once).
        windows: the job's tile grid (`windows_of`), to name failed and missing tiles.
        options: the job's options (merge method, on_tile_error, ...).
        width, height: the image's size (at the level read).
        started: when the job started (`time.time()`), for `total_s`.
        source, level, downsample: what was read, as the result reports it.
        batches: how many batches (tile tasks) the tiles were cut into.
        timings: stage times measured before the tiles were recognized (load, decode, store).
        spatial: where the pixels are on a map or a slide (the source's `spatial`).

    Returns:
        The merged Recognition.

    Raises:
        TileFailure: a tile failed or has no outcome and `on_tile_error` is "fail".
    """
    began = time.time()
    by_tile: dict[int, TileOutcome] = {}
    for outcome in outcomes:
        by_tile.setdefault(outcome.index, outcome)
    failed = [by_tile[index] for index in sorted(by_tile) if by_tile[index].error is not None]
    missing = [window for window in windows if window.index not in by_tile]
    if (failed or missing) and options.on_tile_error == "fail":
        described = "; ".join(f"tile {f.index} at {_xywh(windows[f.index])}: {f.error}" for f in failed[:5])
        if missing:
            described += f"{'; ' if described else ''}no result for tiles {[w.index for w in missing[:10]]}"
        raise TileFailure(f"{len(failed) + len(missing)} of {len(windows)} tiles failed: {described}")
    skipped = [index for index, o in sorted(by_tile.items()) if o.detections is None and o.error is None]
    merged = merge_detections(
        Detections.concat(o.detections for _, o in sorted(by_tile.items()) if o.detections is not None),
        options.merge,
        options.match_metric,
        options.match_threshold,
    )
    finished = time.time()
    return Recognition(
        width=width,
        height=height,
        detections=merged,
        recognizer=spec_of(options.recognizer).name,
        params=options.params,
        source=source,
        tile=options.tile,
        overlap=options.overlap,
        tiles=len(windows),
        batches=batches,
        tasks=batches,
        failed_tiles=[{"tile": f.index, "window": _xywh(windows[f.index]), "error": f.error} for f in failed]
        + [{"tile": w.index, "window": _xywh(w), "error": "no result"} for w in missing],
        timings={
            **(timings or {}),
            "recognize_s": sum(outcome.seconds for outcome in by_tile.values()),
            "merge_s": finished - began,
            "total_s": finished - started,
        },
        level=level,
        downsample=downsample,
        roi=options.roi,
        # tiles skipped as blank or all nodata; no count where skip_blank was off and none was skipped
        skipped=len(skipped) if skipped or options.skip_blank is not None else None,
        skipped_tiles=[_xywh(windows[index]) for index in skipped],
        spatial=spatial,
    )


def _xywh(window: Window) -> list[int]:
    return [window.x, window.y, window.width, window.height]


def recognize_image(
    image: np.ndarray,
    recognizer: str | Recognizer = "faces",
    *,
    resources: Mapping[str, Any] | None = None,
    **options: object,
) -> Recognition:
    """Sliced recognition of a whole image in this process (what SAHI does), with tilerec's tiling and merge, and
    the recognizer's second stage on the merged detections' full-resolution crops where it has one.

    Args:
        image: the pixels (grey, BGR or BGRA, 8 or 16 bit).
        recognizer: a recognizer's name (its parameters among `options`), or any callable `tile -> Detections`.
        resources: what the second stage's finish needs by name (`SecondStage.resources`), such as a gallery.
        **options: job options (tile, overlap, merge, second_stage, …) and the named recognizer's parameters.

    Returns:
        The merged recognition, in the image's pixel coordinates: the same as a distributed job's.

    Raises:
        OptionsError: an option is unknown or out of range.
        RecognizerError: the recognizer is unknown or a parameter is wrong.

    Examples:
        >>> import cv2
        >>> from pipeline import recognize_image
        >>> found = recognize_image(cv2.imread("big.jpg"), "qrcode", tile=1024, overlap=0.2)  # doctest: +SKIP
        >>> [(text, box) for text, box in zip(found.detections.texts, found.detections.xyxy)]  # doctest: +SKIP
    """
    return recognize_source(ArraySource(normalize(np.asarray(image))), recognizer, resources=resources, **options)


def recognize_source(
    source: Source,
    recognizer: str | Recognizer = "faces",
    *,
    resources: Mapping[str, Any] | None = None,
    **options: object,
) -> Recognition:
    """`recognize_image` for any source (a TIFF read window by window, say): same tiles, skips, merge and second
    stage as a job.

    The source must be opened at the level the options name (`sources.open_source(path, level)`).
    """
    started = time.time()
    parsed = parse_options(recognizer, options)
    if parsed.mpp is None and parsed.level != source.level:
        raise OptionsError(f"the source is open at level {source.level}, the options ask for level {parsed.level}")
    width, height = source.width, source.height
    windows = windows_of(height, width, parsed)
    outcomes = recognize_windows(source.read, windows, parsed, width, height)
    merged = assemble(outcomes, windows, parsed, width, height, started, level=source.level,
                      downsample=source.downsample, spatial=source.spatial)  # fmt: skip
    return run_stage(merged, parsed, stage_reader(source.read, parsed), region(height, width, parsed), resources,
                     started)  # fmt: skip
