"""A job's options, checked once at the edge so every stage can trust them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.merge import MATCH_METRICS, MERGE_METHODS
from pipeline.recognizers import get_spec, resolve_params
from pipeline.tiling import validate_tiling

JOB_OPTIONS = (
    "tile",
    "overlap",
    "min_score",
    "merge",
    "match_metric",
    "match_threshold",
    "batch_size",
    "on_tile_error",
)
ON_TILE_ERROR = ("fail", "partial")


class OptionsError(ValueError):
    """A job option has the wrong type or value."""


@dataclass(frozen=True)
class JobOptions:
    recognizer: str = "faces"
    params: dict[str, Any] = field(default_factory=dict)
    tile: int = 640
    overlap: float = 0.2
    min_score: float = 0.0
    merge: str = "greedy_nmm"
    match_metric: str = "ios"
    match_threshold: float = 0.5
    batch_size: int | None = None  # None: chosen from the recognizer's cost
    on_tile_error: str = "fail"  # "partial": return the other tiles' result and list the failed ones

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobOptions:
        return cls(**data)


def _ratio(name: str, value: Any, upper_open: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
        or (upper_open and value == 1)
    ):
        raise OptionsError(f"{name} must be a number in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def parse_options(recognizer: Any = "faces", options: Mapping[str, Any] | None = None) -> JobOptions:
    """JobOptions from a caller's keyword options: job options by name, everything else a recognizer parameter."""
    options = dict(options or {})
    get_spec(recognizer)
    params = options.pop("params", None) or {}
    if not isinstance(params, Mapping):
        raise OptionsError(f"params must be a mapping of recognizer parameters, got {params!r}")
    params = {**params, **{k: v for k, v in options.items() if k not in JOB_OPTIONS}}
    try:
        tile, overlap = validate_tiling(options.get("tile", 640), options.get("overlap", 0.2))
    except ValueError as error:
        raise OptionsError(str(error)) from None
    merge = options.get("merge", "greedy_nmm")
    if merge not in MERGE_METHODS:
        raise OptionsError(f"merge must be one of {', '.join(MERGE_METHODS)}, got {merge!r}")
    metric = options.get("match_metric", "ios")
    if metric not in MATCH_METRICS:
        raise OptionsError(f"match_metric must be one of {', '.join(MATCH_METRICS)}, got {metric!r}")
    batch_size = options.get("batch_size")
    if batch_size == "auto":
        batch_size = None
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise OptionsError(f"batch_size must be a positive whole number or 'auto', got {batch_size!r}")
    on_tile_error = options.get("on_tile_error", "fail")
    if on_tile_error not in ON_TILE_ERROR:
        raise OptionsError(f"on_tile_error must be one of {', '.join(ON_TILE_ERROR)}, got {on_tile_error!r}")
    return JobOptions(
        recognizer=recognizer,
        params=resolve_params(recognizer, params),
        tile=tile,
        overlap=overlap,
        min_score=_ratio("min_score", options.get("min_score", 0.0)),
        merge=merge,
        match_metric=metric,
        match_threshold=_ratio("match_threshold", options.get("match_threshold", 0.5)),
        batch_size=batch_size,
        on_tile_error=on_tile_error,
    )
