"""Recognizers: the protocol, the registry, and a per-process cache so nothing heavy is rebuilt per tile.

Built-ins live in `opencv` (classical), `dnn` (neural) and `text` (OCR, registered with its second stage in
`text_stage`); third-party ones load by name through `plugins`. A second stage (`stages`) recognizes crops of a first
recognizer's detections: `faces` tells who a face is, `text_stage` reads the text of the lines found.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline.model import Detections


class Recognizer(Protocol):
    """Takes one tile (8-bit grey or BGR array) and returns detections in that tile's coordinates (any column of
    `Detections`: boxes, masks, oriented boxes, keypoints, class ids, data).

    A recognizer that runs several tiles in one forward pass also has `max_batch` (tiles per pass) and
    `recognize_batch(tiles) -> list[Detections]`, equal to calling it on each tile (`recognize_many` uses them).

    Examples:
        A plugin's factory (docs/recognizers.md): its keyword defaults are the recognizer's parameters.

        >>> import cv2
        >>> class BrightSpots:
        ...     'bright blobs'
        ...     def __init__(self, threshold: int = 240) -> None:
        ...         self.threshold = threshold
        ...     def __call__(self, tile):
        ...         grey = tile if tile.ndim == 2 else cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY)
        ...         _, bright = cv2.threshold(grey, self.threshold, 255, cv2.THRESH_BINARY)
        ...         boxes = [cv2.boundingRect(c) for c in cv2.findContours(bright, 0, 2)[0]]
        ...         return Detections.from_xywh(boxes, [1.0] * len(boxes), "spot")
    """

    def __call__(self, tile: np.ndarray) -> Detections: ...


class RecognizerError(ValueError):
    """Unknown recognizer or bad recognizer parameters."""


@dataclass(frozen=True)
class RecognizerSpec:
    """A registered recognizer: how to build it, its parameters with defaults, and what a tile costs.

    `cost_ms` is a rough time for one 640x640 tile on one core; it sets how many tiles a task batches.
    `second_stage`, for a recognizer with one (`pipeline.recognizers.stages`): called with the job's recognizer
    parameters (a dict), it returns the `SecondStage` run on the full-resolution crop of each merged detection; jobs
    run it unless they say `second_stage=False`, or, where `stage_by_default` is False, only when they say
    `second_stage=True`.
    `stage_by_default` may also be a function of the job's recognizer parameters (on where they ask for it).
    """

    name: str
    factory: Callable[..., Recognizer]
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    cost_ms: float = 20.0
    file_params: tuple[str, ...] = ()  # parameters that name files the worker opens (models, label lists)
    grey: bool = False  # it reads grey pixels only: colour tiles are converted before storing (a third of the bytes)
    merge: str = "greedy_nmm"  # the merge its jobs use unless they name one (pipeline.merge.detections.MERGE_METHODS)
    second_stage: Callable[[dict[str, Any]], Any] | None = None  # params -> pipeline.recognizers.stages.SecondStage
    # a job runs the second stage unless it says second_stage=False; or a function of the job's parameters
    stage_by_default: bool | Callable[[Mapping[str, Any]], bool] = True


_REGISTRY: dict[str, RecognizerSpec] = {}


def register(spec: RecognizerSpec) -> RecognizerSpec:
    """Make a recognizer known by its name in this process (the built-ins; plugins load through `plugins`).

    Args:
        spec: the recognizer's name, factory, parameters and cost.

    Returns:
        The spec, registered.
    """
    _REGISTRY[spec.name] = spec
    return spec


def available() -> list[RecognizerSpec]:
    """Every recognizer this process can build.

    Returns:
        The built-ins' and every installed plugin's specs (a plugin that fails to load is left out with a warning).
    """
    for name in plugins.entry_point_names() - set(_REGISTRY):
        try:
            get_spec(name)
        except RecognizerError as error:
            warnings.warn(str(error), stacklevel=2)
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_spec(name: object) -> RecognizerSpec:
    """The spec registered under `name`; installed plugins and allowed `module:factory` names load on first use."""
    if isinstance(name, str) and name not in _REGISTRY:
        found = plugins.find(name)
        if found is not None:
            register(found)
    if not isinstance(name, str) or name not in _REGISTRY:
        known = ", ".join(sorted(set(_REGISTRY) | plugins.entry_point_names()))
        raise RecognizerError(f"unknown recognizer {name!r}; available: {known}")
    return _REGISTRY[name]


def spec_of(recognizer: str | Recognizer) -> RecognizerSpec:
    """The spec of a recognizer name; a callable given in process (supervision's callback style) gets a spec of its
    own: its name, colour tiles, the default cost. Callables cannot travel in a Celery message, names can."""
    if isinstance(recognizer, str) or not callable(recognizer):
        return get_spec(recognizer)
    name = getattr(recognizer, "__name__", None) or type(recognizer).__name__
    return RecognizerSpec(name, lambda: recognizer)


def _coerce(recognizer: str, name: str, value: Any, default: Any) -> Any:
    """A parameter value checked against the type of its default (JSON turns tuples into lists)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int | float) and not isinstance(value, bool) and value == int(value):
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise RecognizerError(
        f"recognizer {recognizer!r}: parameter {name!r} must be {type(default).__name__}, got {value!r}"
    )


def resolve_params(name: str | Recognizer, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recognizer's full parameter set: its defaults overridden by `params`, each checked (a callable takes
    none: bind them with functools.partial)."""
    spec = spec_of(name)
    params = dict(params or {})
    if not isinstance(name, str):
        if params:
            raise RecognizerError(
                f"recognizer {spec.name!r} is a callable: it takes no parameters ({', '.join(sorted(params))}); "
                "bind them with functools.partial"
            )
        return {}
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        known = ", ".join(sorted(spec.params)) or "none"
        raise RecognizerError(
            f"recognizer {name!r} has no parameter(s) {', '.join(unknown)}; it takes: {known}{_takers(unknown)}"
        )
    resolved = {key: _coerce(name, key, params.get(key, default), default) for key, default in spec.params.items()}
    _check_files(name, spec, resolved)
    return resolved


def _takers(params: Sequence[str]) -> str:
    """Where a parameter belongs to other registered recognizers, a clause naming them (`identify`: faces-dnn)."""
    takers = {param: [n for n in sorted(_REGISTRY) if param in _REGISTRY[n].params] for param in params}
    named = [f"{param} is a parameter of {', '.join(names)}" for param, names in takers.items() if names]
    return f" ({'; '.join(named)})" if named else ""


def tiles_per_pass(recognizer: Recognizer) -> int:
    """How many tiles the recognizer takes in one forward pass (`max_batch`; 1 for the one-tile protocol)."""
    return max(1, int(getattr(recognizer, "max_batch", 1) or 1))


def recognize_many(recognizer: Recognizer, tiles: Sequence[np.ndarray]) -> list[Detections]:
    """Each tile's detections: one `recognize_batch` call for a batching recognizer, else one call per tile."""
    batch = getattr(recognizer, "recognize_batch", None)
    found = list(batch(list(tiles))) if batch is not None and len(tiles) > 1 else [recognizer(t) for t in tiles]
    if len(found) != len(tiles):
        raise TypeError(f"the recognizer's recognize_batch returned {len(found)} results for {len(tiles)} tiles")
    return found


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (`docker run --cpus`), which
    os.cpu_count() and so celery's default concurrency ignore."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    return max(1, count)


_thread_budget = 0


def limit_threads(threads: int) -> None:
    """Cap the native thread pools of this process, so worker processes × threads fit the cores.

    OpenCV's pool changes at once; ONNX Runtime sessions read the budget when they are built, which is after this
    (recognizers are built on a worker process's first tile).
    """
    global _thread_budget
    _thread_budget = max(1, int(threads))
    cv2.setNumThreads(_thread_budget)


def thread_budget() -> int:
    """Threads a native library may use per call in this process; 0 until `limit_threads` (the library's default)."""
    return _thread_budget


_file_roots: list[Path] | None = None


def restrict_file_params(roots: Sequence[Path]) -> None:
    """From now on, files named in parameters must lie inside `roots`. Workers call this: a job's message can come
    from anyone who can publish to the broker, and must not make the worker open arbitrary files. In-process use
    (a library caller naming its own model) stays unrestricted."""
    global _file_roots
    _file_roots = [Path(root).resolve() for root in roots]


def _check_files(name: str, spec: RecognizerSpec, params: Mapping[str, Any]) -> None:
    if _file_roots is None:
        return
    for param in spec.file_params:
        value = params.get(param)
        if not value:
            continue
        real = Path(value).expanduser().resolve()
        if not any(real == root or root in real.parents for root in _file_roots):
            shown = os.pathsep.join(str(root) for root in _file_roots) or "none configured"
            raise RecognizerError(
                f"recognizer {name!r}: parameter {param!r} names {value!r}, outside the model folders ({shown}); "
                "workers open only files under TILEREC_MODEL_DIR or TILEREC_MODEL_ROOTS"
            )


@lru_cache(maxsize=16)
def _build(name: str, frozen: tuple[tuple[str, Any], ...]) -> Recognizer:
    return get_spec(name).factory(**dict(frozen))


def get_recognizer(name: str | Recognizer, params: Mapping[str, Any] | None = None) -> Recognizer:
    """A recognizer, built once per process for each name and parameter set.

    Args:
        name: a recognizer's name (a built-in, a plugin, or an allowed `module:factory`), or a callable, which is
            its own recognizer.
        params: the recognizer's parameters; the ones left out keep their defaults.

    Returns:
        The recognizer: call it on a tile to get its `Detections`.

    Raises:
        RecognizerError: the name is unknown, or a parameter is unknown or of the wrong type.

    Examples:
        >>> import numpy as np
        >>> from pipeline.recognizers import get_recognizer
        >>> len(get_recognizer("qrcode")(np.zeros((64, 64, 3), np.uint8)))
        0
    """
    resolved = resolve_params(name, params)
    if not isinstance(name, str):
        return name
    return _build(name, tuple(sorted(resolved.items())))


from pipeline.recognizers import dnn, opencv, plugins, text_stage  # noqa: E402,F401  registers the built-ins
