"""A job's options, checked once at the edge so every stage can trust them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.merge.detections import MATCH_METRICS, MERGE_METHODS
from pipeline.readers.sources import ReadSpec
from pipeline.recognizers import Recognizer, resolve_params, spec_of
from pipeline.tiling import validate_tiling

BLANK_RANGE = 16.0  # skip_blank=True: a tile whose 4x4 block means vary by at most this (grey levels) is blank
JOB_OPTIONS = (
    "tile",
    "overlap",
    "min_score",
    "merge",
    "match_metric",
    "match_threshold",
    "batch_size",
    "min_batches",
    "on_tile_error",
    "level",
    "roi",
    "skip_blank",
    "reader",
    "bands",
    "stretch",
    "mpp",
    "second_stage",
    "max_crops",
    "crop_batch_size",
)
ON_TILE_ERROR = ("fail", "partial")
READERS = ("auto", "tiff", "geo", "slide")  # auto: a georeferenced TIFF is read as geo, a slide file as slide


class OptionsError(ValueError):
    """A job option has the wrong type or value."""


@dataclass(frozen=True)
class JobOptions:
    recognizer: str | Recognizer = "faces"  # a callable only in process
    params: dict[str, Any] = field(default_factory=dict)
    tile: int = 640
    overlap: float = 0.2
    min_score: float = 0.0
    merge: str = "greedy_nmm"
    match_metric: str = "ios"
    match_threshold: float = 0.5
    batch_size: int | None = None  # None: chosen from the recognizer's cost
    min_batches: int | None = None  # auto batch_size: at least this many batches; None: the workers' setting
    on_tile_error: str = "fail"  # "partial": return the other tiles' result and list the failed ones
    level: int = 0  # pyramid level of a TIFF (0: full resolution)
    roi: list[int] | None = None  # [x, y, width, height] in the level's pixels; None: the whole image
    skip_blank: float | None = None  # a tile whose 4x4 block means vary by <= this many grey levels is skipped
    reader: str = "auto"  # how the image is opened (READERS)
    bands: list[int] | None = None  # geo: 1-based bands read as grey (1) or red, green, blue (3); None: the first
    stretch: list[float] | None = None  # geo: [low, high] of band values shown as 0..255; None: 16-bit's high byte
    mpp: float | None = None  # slide: the level whose microns per pixel are nearest this (instead of `level`)
    second_stage: bool = False  # the recognizer's second stage runs on the merged detections' crops
    max_crops: int | None = None  # at most this many crops (the highest-scoring wanted detections); None: all
    crop_batch_size: int | None = None  # crops per crop batch task; None: chosen from the stage's cost

    def read_spec(self) -> ReadSpec:
        """How the job's image is opened: its reader, bands, stretch and mpp."""
        bands = tuple(self.bands) if self.bands else None
        return ReadSpec(self.reader, bands, tuple(self.stretch) if self.stretch else None, self.mpp)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobOptions:
        return cls(**data)


DEFAULTS = JobOptions()  # the defaults of an option the caller leaves out: parsing and the CLI's help read them here


def _ratio(name: str, value: Any, upper_open: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
        or (upper_open and value == 1)
    ):
        raise OptionsError(f"{name} must be a number in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionsError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _roi(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise OptionsError(f"roi must be [x, y, width, height] in pixels, got {value!r}")
    try:
        x, y = (_whole("roi x and y", v, 0) for v in value[:2])
        width, height = (_whole("roi width and height", v, 1) for v in value[2:])
    except OptionsError as error:
        raise OptionsError(f"{error} (roi is [x, y, width, height] in pixels)") from None
    return [x, y, width, height]


def _skip_blank(value: Any) -> float | None:
    """False/None: off; True: the default threshold (BLANK_RANGE); a number: that threshold in grey levels."""
    if value is None or value is False:
        return None
    if value is True:
        return BLANK_RANGE
    if isinstance(value, int | float) and 0 <= value <= 255:
        return float(value)
    raise OptionsError(f"skip_blank must be true, false or a threshold in [0, 255] grey levels, got {value!r}")


def _bands(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) not in (1, 3):
        raise OptionsError(f"bands must list 1 band (grey) or 3 (red, green, blue), 1-based, got {value!r}")
    return [_whole("each band", band, 1) for band in value]


def _stretch(value: Any) -> list[float] | None:
    numbers = isinstance(value, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    if value is None:
        return None
    if not numbers or len(value) != 2 or not value[0] < value[1]:
        raise OptionsError(
            f"scale must be [low, high] with low < high (the band values shown as 0..255), got {value!r}"
        )
    return [float(value[0]), float(value[1])]


def _mpp(value: Any, level: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise OptionsError(f"mpp must be a positive number of microns per pixel, got {value!r}")
    if level not in (None, 0):
        raise OptionsError("give level or mpp, not both (mpp picks the level)")
    return float(value)


def _second_stage(recognizer: Any, value: Any, params: Mapping[str, Any]) -> bool:
    """Whether the job runs its recognizer's second stage: as asked, else as the recognizer declares (for some
    recognizers, by the job's parameters: faces-dnn's with `identify`)."""
    spec = spec_of(recognizer)
    if value is not None and not isinstance(value, bool):
        raise OptionsError(f"second_stage must be true or false, got {value!r}")
    if value and spec.second_stage is None:
        raise OptionsError(f"recognizer {spec.name!r} has no second stage (second_stage=true asks for one)")
    default = spec.stage_by_default(params) if callable(spec.stage_by_default) else spec.stage_by_default
    return spec.second_stage is not None and bool(default if value is None else value)


def _batch_size(name: str, value: Any) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionsError(f"{name} must be a positive whole number or 'auto', got {value!r}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_options(recognizer: Any = "faces", options: Mapping[str, Any] | None = None) -> JobOptions:
    """JobOptions from a caller's keyword options: job options by name, everything else a recognizer parameter."""
    options = dict(options or {})
    spec = spec_of(recognizer)
    params = options.pop("params", None) or {}
    if not isinstance(params, Mapping):
        raise OptionsError(f"params must be a mapping of recognizer parameters, got {params!r}")
    params = {**params, **{k: v for k, v in options.items() if k not in JOB_OPTIONS}}
    try:
        tile, overlap = validate_tiling(options.get("tile", DEFAULTS.tile), options.get("overlap", DEFAULTS.overlap))
    except ValueError as error:
        raise OptionsError(str(error)) from None
    merge = _choice("merge", options.get("merge", spec.merge), MERGE_METHODS)
    metric = _choice("match_metric", options.get("match_metric", DEFAULTS.match_metric), MATCH_METRICS)
    batch_size = _batch_size("batch_size", options.get("batch_size"))
    reader = _choice("reader", options.get("reader", DEFAULTS.reader), READERS)
    on_tile_error = _choice("on_tile_error", options.get("on_tile_error", DEFAULTS.on_tile_error), ON_TILE_ERROR)
    params = resolve_params(recognizer, params)
    return JobOptions(
        recognizer=recognizer,
        params=params,
        tile=tile,
        overlap=overlap,
        min_score=_ratio("min_score", options.get("min_score", DEFAULTS.min_score)),
        merge=merge,
        match_metric=metric,
        match_threshold=_ratio("match_threshold", options.get("match_threshold", DEFAULTS.match_threshold)),
        batch_size=batch_size,
        min_batches=None if options.get("min_batches") is None else _whole("min_batches", options["min_batches"], 1),
        on_tile_error=on_tile_error,
        level=_whole("level", options.get("level", DEFAULTS.level), 0),
        roi=_roi(options.get("roi")),
        skip_blank=_skip_blank(options.get("skip_blank")),
        reader=reader,
        bands=_bands(options.get("bands")),
        stretch=_stretch(options.get("stretch")),
        mpp=_mpp(options.get("mpp"), options.get("level")),
        second_stage=_second_stage(recognizer, options.get("second_stage"), params),
        max_crops=None if options.get("max_crops") is None else _whole("max_crops", options["max_crops"], 1),
        crop_batch_size=_batch_size("crop_batch_size", options.get("crop_batch_size")),
    )


VIDEO_OPTIONS = ("step", "fps", "start", "end", "tiled", "segment_frames", "frame_rate")


@dataclass(frozen=True)
class VideoOptions:
    """A video job's options: how each frame is recognized (`frame`, an image job's options) and which frames."""

    frame: JobOptions
    step: int = 1  # every step-th frame of the time range
    fps: float | None = None  # instead of step: this many frames per second of the clip, evenly in time
    start: float = 0.0  # seconds from the first frame
    end: float | None = None  # seconds; None: to the end
    tiled: bool = True  # False: each frame recognized whole (its roi), one window
    segment_frames: int | None = None  # recognized frames per segment task; None: chosen from the clip
    frame_rate: float | None = None  # a folder of frames' rate (default 30)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "frame": self.frame.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VideoOptions:
        return cls(**{**data, "frame": JobOptions.from_json(data["frame"])})


VIDEO_DEFAULTS = VideoOptions(DEFAULTS)  # as DEFAULTS, for a video's own options


def _seconds(name: str, value: Any, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise OptionsError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _rate(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise OptionsError(f"{name} must be a number of frames per second above 0, got {value!r}")
    return float(value)


def parse_video_options(recognizer: Any = "faces", options: Mapping[str, Any] | None = None) -> VideoOptions:
    """VideoOptions from a caller's keyword options: the video ones by name (VIDEO_OPTIONS), the rest as for an
    image (`parse_options`)."""
    options = dict(options or {})
    video = {name: options.pop(name) for name in VIDEO_OPTIONS if name in options}
    frame = parse_options(recognizer, options)
    if video.get("step") is not None and video.get("fps") is not None:
        raise OptionsError("give step or fps, not both (fps picks the frames by time)")
    tiled = video.get("tiled", VIDEO_DEFAULTS.tiled)
    if not isinstance(tiled, bool):
        raise OptionsError(f"tiled must be true or false, got {tiled!r}")
    start, end = (
        _seconds("start", video.get("start", VIDEO_DEFAULTS.start), False),
        _seconds("end", video.get("end"), True),
    )
    if end is not None and end <= start:
        raise OptionsError(f"end ({end} s) must be after start ({start} s)")
    segment_frames = video.get("segment_frames")
    return VideoOptions(
        frame=frame,
        step=_whole("step", video.get("step") or VIDEO_DEFAULTS.step, 1),
        fps=_rate("fps", video.get("fps")),
        start=start or VIDEO_DEFAULTS.start,
        end=end,
        tiled=tiled,
        segment_frames=None if segment_frames is None else _whole("segment_frames", segment_frames, 1),
        frame_rate=_rate("frame_rate", video.get("frame_rate")),
    )
