"""A job as its first task described it for the tasks that follow: the record kept in the store, its JSON, and the
second stage's record; read once per process by the tasks that need them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any, TypeVar

from pipeline.inference import windows_of
from pipeline.model import Detections, Recognition, Spatial
from pipeline.options import JobOptions
from pipeline.readers.sources import FileRef
from pipeline.recognizers.stages import CropPlan
from pipeline.tiling import Window
from tasks import store
from tasks.celery import store_client

Described = TypeVar("Described")


class JobCancelled(RuntimeError):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class JobRecord:
    """An image job as its tiling task planned it: what its batch tasks and merge read from the store."""

    id: str
    image: str  # as the caller gave it
    width: int
    height: int
    options: JobOptions
    batches: int
    channels: int  # of the tiles in the store (1: grey, for grey-only recognizers)
    started: float  # time.time() when the tiling task began
    timings: dict[str, float] = field(default_factory=dict)  # the tiling task's load, decode and store
    level: int = 0
    downsample: float = 1.0
    file: FileRef | None = None  # batch tasks read their own windows of this shared file; None: from the store
    streamed: bool = False  # an image the tiling task decodes band by band once the chord is published
    spatial: Spatial | None = None  # where the pixels are on a map or a slide, as the source says

    @cached_property
    def windows(self) -> list[Window]:
        return windows_of(self.height, self.width, self.options)

    @property
    def tiles(self) -> int:
        return len(self.windows)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        data = json.loads(text)
        file, spatial = data.pop("file"), data.pop("spatial", None)
        options = JobOptions.from_json(data.pop("options"))
        return cls(**data, options=options, file=FileRef.from_json(file) if file else None,
                   spatial=_spatial(spatial))  # fmt: skip


@dataclass(frozen=True)
class Staged:
    """A job's second stage as its merge planned it: the merged first-stage result (detections exact), the crops
    and their batches as [first, stop) ranges. The crop batches and the final callback read it from the store."""

    recognition: Recognition
    plan: CropPlan
    spans: list[tuple[int, int]]

    def to_json(self) -> str:
        # the detections as exact columns, not as the result's rounded records
        document = replace(self.recognition, detections=Detections.empty()).to_json()
        columns = self.recognition.detections.to_columns()
        return json.dumps({"recognition": document, "columns": columns, "plan": self.plan.to_json(),
                           "spans": self.spans})  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Staged:
        data = json.loads(text)
        recognition = Recognition.from_json(data["recognition"])
        recognition = replace(recognition, detections=Detections.from_columns(data["columns"]))
        return cls(recognition, CropPlan.from_json(data["plan"]), [(int(a), int(b)) for a, b in data["spans"]])


def _spatial(fields: dict[str, Any] | None) -> Spatial | None:
    """A Spatial from its fields as `JobRecord.to_json` wrote them (JSON lists back to tuples)."""
    if fields is None:
        return None
    return Spatial(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


@lru_cache(maxsize=16)
def described(parse: Callable[[str], Described], job_id: str) -> Described:
    """A job's record (`parse`: its kind's `from_json`), read once per process: its batches land on the same
    processes again and again, and a record never changes once stored.

    Args:
        parse: `JobRecord.from_json` for an image job, `VideoJob.from_json` for a video's.
        job_id: the job's id.

    Returns:
        The record. Raises LookupError when the job's keys are gone (it ended)."""
    return parse(store.get_job(store_client(), job_id))


@lru_cache(maxsize=4)
def planned_stage(job_id: str) -> Staged:
    """A job's second stage as planned, read once per process (its crop batches land on the same processes)."""
    return Staged.from_json(store.get_stage(store_client(), job_id))
