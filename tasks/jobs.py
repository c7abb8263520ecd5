"""A job's kinds of task, plain Celery tasks on Celery's own canvas:

tilerec.recognize(image, recognizer, **options)   resolves the image, plans the tiles and their batches, stores the
                                                  tiles (unless the workers read a shared TIFF themselves) and the
                                                  job's description, then becomes chord(batch tasks, merge); a job
                                                  of one batch is recognized right there
tilerec.recognize_tiles(job_id, first, stop)      recognizes tiles [first, stop) and stores their records
tilerec.merge(image, recognizer, **options)       runs under the job's id with the job's own arguments (what a
                                                  monitor shows), and merges the records into the Recognition; a
                                                  recognizer's second stage with crops to read: it stores the merged
                                                  detections and their crop plan, and becomes chord(crop batches,
                                                  finish)
tilerec.recognize_crops(job_id, first, stop)      runs the second stage on crops [first, stop) of the merged
                                                  detections, read at full resolution, and stores their records
tilerec.finish(image, recognizer, **options)      under the job's id with its arguments again: the stage's finish over
                                                  all detections and crop records, the Recognition
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import chord, group, signals, states
from celery.exceptions import Ignore

from pipeline.inference import (
    TileOutcome,
    assemble,
    grey_tiles,
    measured_tile_cost,
    plan,
    recognize_windows,
    region,
    stage_reader,
    storable,
    tiles_per_forward_pass,
    windows_of,
)
from pipeline.model import Detections, Recognition, Spatial
from pipeline.options import JobOptions, parse_options
from pipeline.readers import images, remote, sources
from pipeline.readers.sources import FileRef
from pipeline.recognizers import spec_of
from pipeline.recognizers.stages import (
    CropOutcome,
    CropPlan,
    PlannedCrop,
    SecondStage,
    crop_spans,
    finish_stage,
    plan_crops,
    read_crops,
    run_stage,
    stage_of,
)
from pipeline.tiling import Window, row_ends
from tasks import resources, store
from tasks.celery import app, others_recognize, pool_size, settings, store_client

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
MAX_ATTEMPTS = 3  # a tile (or an image) whose worker process dies this many times fails instead of coming back
CANCEL_CHECK_S = 0.25  # a running batch looks for a cancel this often (a round trip each)
STREAM_POLL_S = 0.02  # a batch waiting for a streamed image's rows looks this often
STREAM_STALL_S = 5.0  # ... and gives its process back (retrying later) when neither a row nor a beat came this long
PROGRESS_STEPS = 50  # a job reports its progress at most this many times
PROGRESS_EVERY_S = 0.5  # and a process at most this often for one job (each report: an event and a result write)
# auto batches: at least this many per process of the tiling node (its size is known there, the cluster's is not;
# each batch costs a task of Celery and Redis round trips, docs/performance.md)
BATCHES_PER_PROCESS = 4
DIED = f"the worker process died all {MAX_ATTEMPTS}"
BULKY = ("detections", "per_frame", "tracks")  # what a result's summary leaves out (an image's, a video's)
WAITING = "WAITING"  # the state of a job waiting for room in the tile store
ROOM_RETRY_S = 1.0  # a waiting job asks for room again this often
log = logging.getLogger(__name__)


class JobCancelled(RuntimeError):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class Job:
    """A job as its tiling task planned it: what its batch tasks and merge read from the store."""

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
    def from_json(cls, text: str) -> Job:
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
    """A Spatial from its fields as `Job.to_json` wrote them (JSON lists back to tuples)."""
    if fields is None:
        return None
    return Spatial(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def batch_priority(number: int) -> int:
    """A job's n-th batch goes at level 1 + log2(n + 1), at most 9 (0 is taken first)."""
    return min(9, 1 + number.bit_length())


@app.task(name="tilerec.recognize", bind=True)
def recognize(self: Any, image: str, recognizer: str = "faces", **options: Any) -> Any:
    client, job_id, started = store_client(), self.request.id, time.time()
    redelivered = bool(self.request.delivery_info.get("redelivered"))
    attempts = 1 + (store.count_attempt(client, job_id, "tiling", settings().tile_ttl) if redelivered else 0)
    with contextlib.suppress(LookupError):
        if redelivered and (earlier := Job.from_json(store.get_job(client, job_id))).streamed:
            _decode_streamed(client, earlier, attempts)  # its process died decoding: the chord runs already
            raise Ignore("the job's chord was published by an earlier delivery; its merge gives the job's result")
    try:
        if attempts > MAX_ATTEMPTS:
            raise images.ImageError(f"gave up on {image!r}: {DIED} times it read it")
        if store.is_cancelled(client, job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        if (need := store.waiting_need(client, job_id)) is not None:
            _admit(client, job_id, need)  # before its image is read again
        target = resolve(image)
        job, spans, result = _start(client, job_id, image, target, parse_options(recognizer, options), started,
                                    redelivered)  # fmt: skip
        if result is not None:  # one batch: recognized right here, a chord would only add its round trips
            return result
    except _NoRoom as waiting:
        raise _wait_for_room(self, client, waiting.room) from None
    except redis.OutOfMemoryError:
        store.delete_job(client, job_id)
        raise store.StoreFull(store.FILLED) from None
    except BaseException:
        store.delete_job(client, job_id)  # a job refused or failed while tiling leaves nothing behind
        raise
    header = group(
        recognize_tiles.si(job_id, first, stop).set(priority=batch_priority(number))
        for number, (first, stop) in enumerate(spans)
    )
    try:
        return self.replace(chord(header, merge.si(image, recognizer, **options)))
    except Ignore:  # the chord is published: its batch tasks recognize each row of a streamed image once stored
        if job.streamed:
            _decode_streamed(client, job, attempts, target)
        raise


def _start(
    client: redis.Redis,
    job_id: str,
    image: str,
    target: Path | bytes | remote.RemoteObject,
    options: JobOptions,
    started: float,
    redelivered: bool,
) -> tuple[Job, list[tuple[int, int]], dict[str, Any] | None]:
    """Plan the job of `image` (resolved to `target`) and store it: its description, and its tiles unless the
    batch tasks read a shared file or the image is streamed once the chord is published. Returns the job, its batches
    as [first, stop) tile ranges and, for a job of one batch, its result (recognized here, its second stage too)."""
    channels = 1 if spec_of(options.recognizer).grey else 3
    loaded = time.time()
    source = sources.open_source(target, options.level, settings().max_pixels, options.roi, options.read_spec(),
                                 in_row_order=True, grey=grey_tiles(options))  # fmt: skip
    with contextlib.closing(source):
        decoded = time.time()
        # the tile tasks read an object in storage themselves, and a file when they see the same files
        shared = source.windowed and (isinstance(target, remote.RemoteObject) or
                                      (settings().shared_storage and isinstance(target, Path)))  # fmt: skip
        # an image decoded top to bottom, stored row by row once the chord is published, while other processes
        # recognize its first rows (a node of one process that takes tiles too could only recognize afterwards)
        streams = not shared and not isinstance(source, sources.ArraySource) and others_recognize()
        spans = _spans(client, options, source.height, source.width, row_by_row=streams)
        streams = streams and len(spans) > 1
        job = Job(job_id, image, source.width, source.height, options, len(spans),
                  min(channels, source.channels), started, {"load_s": loaded - started, "decode_s": decoded - loaded},
                  source.level, source.downsample, FileRef.of(target, source.level, source) if shared else None,
                  streamed=streams, spatial=source.spatial)  # fmt: skip
        if streams:
            job = replace(job, timings={"load_s": decoded - started, "decode_s": 0.0, "store_s": 0.0})
            _admit(client, job_id, _need(job))
            store.put_job(client, job_id, job.to_json(), job.tiles, settings().tile_ttl, streamed=True)
            return job, spans, None
        if len(spans) == 1:
            outcomes = _recognize(client, job, job.windows, source.read, redelivered)
            return job, spans, _finish(client, job, outcomes, source.read)  # type: ignore[return-value]
        if job.file is None:
            _admit(client, job_id, _need(job))
            tiles = ((window, storable(source.read(window), options)) for window in job.windows)
            store.put_tiles(client, job_id, tiles, settings().tile_ttl)
    if store.is_cancelled(client, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")
    job = replace(job, timings={**job.timings, "store_s": time.time() - decoded})
    store.put_job(client, job_id, job.to_json(), job.tiles, settings().tile_ttl)
    return job, spans, None


class _NoRoom(Exception):
    """The job's tiles do not fit in the store now: it waits in line (`_wait_for_room`)."""

    def __init__(self, room: store.Room) -> None:
        super().__init__(room.waiting())
        self.room = room


def _need(job: Job) -> int:
    """The bytes the job's tiles and records take in the store."""
    return store.tiles_bytes(window.height * window.width * job.channels for window in job.windows)


def _admit(client: redis.Redis, job_id: str, need: int) -> None:
    """Reserve room in the store for the job's tiles. Raises StoreFull when they can never fit (the message names
    the sizes), _NoRoom when they do not fit now (its need recorded, so its next try asks before reading)."""
    room = store.reserve(client, job_id, need, settings().store_max_bytes, settings().tile_ttl)
    if room.never:
        raise store.StoreFull(room.refusal())
    if not room.granted:
        store.wait(client, job_id, need, settings().tile_ttl)
        raise _NoRoom(room)


def _wait_for_room(task: Any, client: redis.Redis, room: store.Room) -> Ignore:
    """The job waits in line without holding a worker process: its state becomes WAITING (in the result backend for
    any app, and as a task-waiting event, which Flower shows as the job's state), and it is tried again later.
    Returns the Ignore to raise, which ends this try; raises StoreFull once it has waited the tile TTL (its need's
    lifetime) in vain."""
    job_id, message = task.request.id, room.waiting()
    if task.request.retries * ROOM_RETRY_S >= settings().tile_ttl:
        store.delete_job(client, job_id)
        raise store.StoreFull(f"gave up after waiting {settings().tile_ttl} s (TILEREC_TILE_TTL): {message}")
    task.backend.store_result(job_id, {"waiting": message, "need": room.need, "free": room.free}, WAITING)
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send("task-waiting", uuid=job_id, result=message)
    task.retry(countdown=ROOM_RETRY_S, max_retries=10**9, throw=False)  # None would mean Celery's default, 3
    return Ignore(message)


def resolve(image: Any) -> Path | bytes | remote.RemoteObject:
    """What the message names, checked once: a path confined to the allowed roots (a file, or a video's folder of
    frames), an object under an allowed URL prefix (looked at: its size and ETag), or bytes from the store."""
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path, URL or redis: reference (a string), got {image!r}")
    if image.startswith(store.REF_SCHEME):
        return store.get_bytes(store_client(), image)
    if remote.is_url(image):
        return remote.stat(remote.check_allowed(image, settings().allowed_urls))
    return images.confine(image, settings().allowed_roots)


def _allowed(path: str) -> object:
    """The confinement check of a file, or the allow-list check of a URL, before a tile task opens it."""
    if remote.is_url(path):
        return remote.check_allowed(path, settings().allowed_urls)
    return images.confine(path, settings().allowed_roots)


def _spans(
    client: redis.Redis, options: JobOptions, height: int, width: int, row_by_row: bool = False
) -> list[tuple[int, int]]:
    """The job's batches as [first, stop) tile ranges, sized from what tiles cost this recognizer in earlier jobs."""
    # a job of one tile has nothing to size or spread: no round trips for the cost or the cluster (tasks/roster.py)
    several = len(windows_of(height, width, options)) > 1
    measured = store.get_tile_cost(client, options.recognizer, options.params) if several else None
    processes = store.tile_processes(client) if several else 0
    least = options.min_batches or settings().min_batches or BATCHES_PER_PROCESS * pool_size()
    # one batch wanted: no job to balance over processes, so no tapered tail of small batches either
    planned = plan(height, width, options, measured, settings().batch_target_ms, least, taper=least > 1,
                   row_by_row=row_by_row, processes=processes)  # fmt: skip
    return [(batch[0].index, batch[-1].index + 1) for batch in planned]


def _decode_streamed(client: redis.Redis, job: Job, attempts: int, target: Path | bytes | None = None) -> None:
    """Decode the job's image (`target`, or resolved again) top to bottom and store each row of tiles as soon as it
    is decoded; a failure is stored for the waiting batch tasks and the merge (which fails the job with it)."""
    try:
        if attempts > MAX_ATTEMPTS:
            raise images.ImageError(f"gave up on {job.image!r}: {DIED} times it decoded it")
        target = resolve(job.image) if target is None else target
        source = sources.open_source(target, job.level, settings().max_pixels, job.options.roi,  # type: ignore[arg-type]
                                     job.options.read_spec(), in_row_order=True,
                                     grey=grey_tiles(job.options))  # fmt: skip
        with contextlib.closing(source):
            if (source.width, source.height) != (job.width, job.height):
                raise images.ImageError("the image changed while its job was being planned; submit it again")
            tiles = ((window, storable(source.read(window), job.options)) for window in job.windows)
            with store.decoding(client, job.id, settings().tile_ttl):
                store.put_tiles(client, job.id, tiles, settings().tile_ttl, row_ends(job.windows))
    except redis.OutOfMemoryError:
        store.fail_job(client, job.id, job.tiles, store.FILLED, settings().tile_ttl)
    except Exception as error:
        reason = str(error) if isinstance(error, images.ImageError) else f"{type(error).__name__}: {error}"
        client.set(store.job_key(job.id, "failed"), reason, ex=settings().tile_ttl)


@lru_cache(maxsize=16)
def _described(job_id: str) -> Job:
    """A job's description, read once per process: its batches land on the same processes again and again, and a
    description never changes once stored."""
    return Job.from_json(store.get_job(store_client(), job_id))


_open_files = sources.SourceCache()  # per worker process: batch tasks of a job share one open TIFF


@app.task(
    name="tilerec.recognize_tiles", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5,
    track_started=False,
)  # fmt: skip
def recognize_tiles(self: Any, job_id: str, first: int, stop: int) -> dict[str, Any]:
    """Recognize the job's tiles [first, stop) and store their records; returns a summary for monitors.

    A tile's own failure is recorded, not raised (the merge still runs, to clean up and say which region failed);
    store outages are raised and retried with backoff; a redelivered batch counts its tiles' crashes."""
    client = store_client()
    job = _described(job_id)
    if job.streamed:
        _wait_for_rows(self, client, job, stop)
    windows = job.windows[first:stop]
    read = _StoredTiles(client, job, windows) if job.file is None else partial(_read_shared, job.file)
    try:
        outcomes = _recognize(client, job, windows, read, bool(self.request.delivery_info.get("redelivered")))
    finally:
        if isinstance(read, _StoredTiles):
            read.close()
    records = {o.index: json.dumps(o.to_json()) for o in outcomes}
    try:
        done = store.put_records(client, job_id, records, settings().tile_ttl) if records else None
    except redis.OutOfMemoryError:  # the merge fails the job with StoreFull
        store.fail_job(client, job_id, job.tiles, store.FILLED, settings().tile_ttl)
        done = None
    if done is not None:
        _report_progress(self, job.id, done, len(records), job.tiles)
    return {
        "tiles": stop - first,
        "skipped": sum(o.detections is None and o.error is None for o in outcomes),
        "failed": sum(o.error is not None for o in outcomes),
        "detections": sum(len(o.detections) for o in outcomes if o.detections is not None),
        "seconds": round(sum(o.seconds for o in outcomes), 3),
    }


def _read_shared(file: FileRef, window: Window) -> np.ndarray | None:
    """A window of the shared file or object, opened once per process (its path confined, or its URL checked
    against the allow-list, then, as for the tiling task); None: nothing to recognize there (all nodata)."""
    return _open_files.get(file, check=_allowed).read(window)


class _StoredTiles:
    """A batch's tiles from the store, READ_EVERY a round trip in the order they are recognized; the next group is
    fetched by a helper thread while this one is recognized, so the recognizer seldom waits on Redis."""

    def __init__(self, client: redis.Redis, job: Job, windows: list[Window]) -> None:
        self.client, self.job, self.windows = client, job, windows
        self.fetched: dict[int, np.ndarray | None] = {}
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="tilerec-prefetch")
        self.next: tuple[int, Future] | None = None  # (start, its fetch)

    def _fetch(self, start: int) -> dict[int, np.ndarray | None]:
        chunk = self.windows[start : start + store.READ_EVERY]
        tiles = store.get_tiles(self.client, self.job.id, chunk, self.job.channels)
        return {w.index: tile for w, tile in zip(chunk, tiles, strict=True)}

    def __call__(self, window: Window) -> np.ndarray | None:
        if window.index not in self.fetched:
            start = self.windows.index(window)
            ahead = self.next
            self.fetched = ahead[1].result() if ahead is not None and ahead[0] == start else self._fetch(start)
            following = start + store.READ_EVERY
            self.next = (
                (following, self.helper.submit(self._fetch, following)) if following < len(self.windows) else None
            )
        return self.fetched.pop(window.index)

    def close(self) -> None:
        self.helper.shutdown(wait=True, cancel_futures=True)


def _wait_for_rows(task: Any, client: redis.Redis, job: Job, stop: int) -> None:
    """Wait until a streamed image's tiles up to `stop` are stored, its decoding failed, or the job was cancelled.
    A decoding that stalls (its process may have died, and its redelivery needs a process) gets this one back."""
    seen, since = (-1, -1), time.monotonic()
    while True:
        ready, failed, cancelled = store.stream_state(client, job.id)
        if ready is None or ready >= stop or failed or cancelled:
            return
        if (progress := (ready, store.beats(client, job.id))) != seen:  # a row stored, or the decoder still alive
            seen, since = progress, time.monotonic()
        elif time.monotonic() - since > STREAM_STALL_S:
            raise task.retry(countdown=1, max_retries=10**6)
        time.sleep(STREAM_POLL_S)


def _recognize(
    client: redis.Redis, job: Job, windows: list[Window], read: Callable[[Window], Any], careful: bool
) -> list[TileOutcome]:
    """The windows' outcomes, in order, until the job is cancelled (looked at every CANCEL_CHECK_S).

    `careful`: the batch's process died before, so each tile's attempts are counted and a tile that kills its
    process every time ends as a failed tile instead of an endless redelivery (the first delivery is not counted,
    hence MAX_ATTEMPTS - 1)."""
    outcomes: list[TileOutcome] = []
    # stored tiles were judged when stored (blank: None), except for a second stage, whose crops may need them
    judge_blank = not isinstance(read, _StoredTiles) or job.options.second_stage
    # tiles go to the recognizer a forward pass at a time, or one at a time where a crash must name its tile
    per_pass = 1 if careful else tiles_per_forward_pass(job.options)
    for tiles, run in _passes(client, job.id, windows, per_pass, careful, "tile", lambda w: w.index):
        if not run:
            outcomes.append(TileOutcome(tiles[0].index, error=f"gave up: {DIED} times it ran this tile"))
            continue
        found = recognize_windows(read, tiles, job.options, job.width, job.height, TRANSIENT, judge_blank=judge_blank)
        outcomes.extend(found)
        if any(o.error is not None and o.error.startswith("MemoryError") for o in found):
            global _unsound  # its heap may be left half-allocated, or under a limit: the process is replaced
            _unsound = True
    return outcomes


def _passes(
    client: redis.Redis,
    job_id: str,
    units: list[Any],
    per_pass: int,
    careful: bool,
    kind: str,
    index_of: Callable[[Any], int],
) -> Iterator[tuple[list[Any], bool]]:
    """A batch's units (tiles, crops) `per_pass` at a time, until the job is cancelled (looked at every
    CANCEL_CHECK_S), each group with whether to run it. `careful` (the batch's process died before): a unit's
    attempts are counted before it runs and cleared once the caller is done with it, so a unit that kills its
    process every time comes back with False instead of an endless redelivery (the first delivery is not counted,
    hence MAX_ATTEMPTS - 1)."""
    cancelled, checked = store.is_cancelled(client, job_id), time.monotonic()
    for start in range(0, len(units), per_pass):
        if time.monotonic() - checked > CANCEL_CHECK_S:
            cancelled, checked = store.is_cancelled(client, job_id), time.monotonic()
        if cancelled:
            return
        group = units[start : start + per_pass]
        name = f"{kind}:{index_of(group[0])}"
        if careful and store.count_attempt(client, job_id, name, settings().tile_ttl) > MAX_ATTEMPTS - 1:
            yield group, False
            continue
        yield group, True  # resumed once the caller has run the group: its process survived it
        if careful:
            store.clear_attempts(client, job_id, name)


_unsound = False  # a tile ran this process out of memory


@signals.task_postrun.connect
def _replace_if_unsound(**_: Any) -> None:
    """After the task that ran out of memory stored its result (Celery then acknowledges it, seeing the SUCCESS):
    end this process, and the pool starts a fresh one."""
    if _unsound:
        log.warning("worker process %d ran out of memory on a tile; replacing it", os.getpid())
        os._exit(70)


_last_report = ("", "", 0.0)  # this process's last progress report: (job id, unit, time.monotonic())


def _report_progress(task: Any, job_id: str, done: int, count: int, total: int, unit: str = "tiles") -> None:
    """When the job passed another 1/PROGRESS_STEPS of its tiles (or crops: `unit`) with these `count`, and this
    process reported none for it in the last PROGRESS_EVERY_S (or all are done): an event on the job's own row for
    monitors (Flower shows its `result`), and the job's state PROGRESS in the result backend for any app's
    AsyncResult (`info`: done, total and, for crops, `"stage": "crops"`)."""
    global _last_report
    crossed = done * PROGRESS_STEPS // total != (done - count) * PROGRESS_STEPS // total
    recent = _last_report[:2] == (job_id, unit) and time.monotonic() - _last_report[2] < PROGRESS_EVERY_S
    if done < total and (not crossed or recent):
        return
    _last_report, done = (job_id, unit, time.monotonic()), min(done, total)
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send("task-progress", uuid=job_id, done=done, total=total, result=f"{done}/{total} {unit}")
    info = {"done": done, "total": total} if unit == "tiles" else {"done": done, "total": total, "stage": unit}
    task.backend.store_result(job_id, info, "PROGRESS")


@app.task(name="tilerec.merge", bind=True)
def merge(self: Any, image: str, recognizer: str = "faces", **options: Any) -> dict[str, Any]:
    """The job's tile records, read from the store, merged into its Recognition. It runs under the job's id (the
    chord's body inherits it) and carries the job's own arguments, so a job reads as one in a monitor.

    A job whose second stage has crops to read: the merge becomes chord(crop batches, finish) instead, the merged
    detections and crop plan in the store (the finish inherits the job's id and arguments in turn)."""
    client = store_client()
    job = _job_of(self, client)
    done = _finish(client, job, [TileOutcome.from_json(record) for record in store.get_records(client, job.id)])
    if not isinstance(done, Staged):
        return done
    header = group(
        recognize_crops.si(job.id, first, stop).set(priority=batch_priority(number))
        for number, (first, stop) in enumerate(done.spans)
    )
    try:
        return self.replace(chord(header, finish.si(image, recognizer, **options)))
    except Ignore:
        raise
    except BaseException:
        store.delete_job(client, job.id, job.tiles)
        raise


def _job_of(task: Any, client: redis.Redis) -> Job:
    """The job a merge or finish (`task`, under the job's id) ends. A redelivery of one whose process died after
    the job's outcome was stored (or a duplicate) finds the job's keys gone: it is ignored, so it cannot overwrite
    that outcome with a failure of its own."""
    try:
        return Job.from_json(store.get_job(client, task.request.id))
    except LookupError:
        if task.AsyncResult(task.request.id).state in states.READY_STATES:
            raise Ignore(f"job {task.request.id} has ended: its outcome is stored") from None
        raise


def _finish(
    client: redis.Redis, job: Job, outcomes: list[TileOutcome], read: Callable[[Window], Any] | None = None
) -> dict[str, Any] | Staged:
    """The job's result from its tiles' outcomes, its second stage included where it has one: run here on crops of
    `read` (a one-batch job's open source), or, without `read`, planned and stored for the crop batches (returned as
    Staged; the job's keys stay for them). Otherwise its keys go last, whatever the outcome."""
    handed_on = False
    try:
        recognition = _merged(client, job, outcomes)
        stage = stage_of(job.options)
        if stage is not None:
            bounds = region(job.height, job.width, job.options)
            if read is not None:
                recognition = run_stage(recognition, job.options, stage_reader(read, job.options), bounds,
                                        _resources(client, stage, job.options), job.started)  # fmt: skip
            else:
                crops = plan_crops(recognition.detections, stage, bounds, job.options.max_crops)
                if crops.crops:
                    staged = Staged(recognition, crops, _crop_spans(client, job.options, stage, len(crops.crops)))
                    store.put_stage(client, job.id, staged.to_json(), len(crops.crops), job.tiles, settings().tile_ttl)
                    handed_on = True
                    return staged
                recognition = finish_stage(recognition, stage, crops, [], _resources(client, stage, job.options),
                                           started=job.started)  # fmt: skip
        return deliver(client, job.id, recognition.to_json())
    finally:
        if not handed_on:
            store.delete_job(client, job.id, job.tiles)


def _merged(client: redis.Redis, job: Job, outcomes: list[TileOutcome]) -> Recognition:
    """The first stage's Recognition: the tiles' outcomes merged; the measured tile cost recorded."""
    timings = dict(job.timings)
    if store.is_cancelled(client, job.id):
        done = sum(outcome.error is None for outcome in outcomes)
        raise JobCancelled(f"job {job.id} was cancelled ({done} of {job.tiles} tiles had been recognized)")
    _, failed, _ = store.stream_state(client, job.id)
    if failed is not None:
        raise store.StoreFull(failed) if failed == store.FILLED else images.ImageError(failed)
    if job.streamed:
        spent = client.hgetall(store.job_key(job.id, "stream"))
        timings.update({f"streamed_{k.decode()}": float(v) for k, v in spent.items()})
    recognition = assemble(outcomes, job.windows, job.options, job.width, job.height, job.started,
                           source=job.image, level=job.level, downsample=job.downsample, batches=job.batches,
                           timings=timings, spatial=job.spatial)  # fmt: skip
    cost = measured_tile_cost([o.seconds for o in outcomes if o.detections is not None], job.height, job.width,
                              job.options)  # fmt: skip
    if cost is not None:
        store.record_tile_cost(client, job.options.recognizer, job.options.params, cost)
    return recognition


def _resources(client: redis.Redis, stage: SecondStage, options: JobOptions) -> dict[str, Any]:
    return resources.load(client, stage.resources, options)


def _crop_spans(client: redis.Redis, options: JobOptions, stage: SecondStage, crops: int) -> list[tuple[int, int]]:
    """A job's crop batches as [first, stop) ranges: `crop_batch_size` crops each, or about
    TILEREC_BATCH_TARGET_MS of the stage's work each (what crops cost it in earlier jobs, else its `cost_ms`), at
    least as many as tile batches would be."""
    least = options.min_batches or settings().min_batches or BATCHES_PER_PROCESS * pool_size()
    measured = store.get_tile_cost(client, _crops_of(options), options.params)
    cost = stage.cost_ms if measured is None else measured
    processes = store.tile_processes(client)
    return crop_spans(crops, cost, settings().batch_target_ms, least, options.crop_batch_size, processes)


def _crops_of(options: JobOptions) -> str:
    """The name the measured cost of a recognizer's crops is kept under (beside its tiles' cost)."""
    return f"{options.recognizer}#crops"


@lru_cache(maxsize=4)
def _staged(job_id: str) -> Staged:
    """A job's second stage as planned, read once per process (its crop batches land on the same processes)."""
    return Staged.from_json(store.get_stage(store_client(), job_id))


@app.task(
    name="tilerec.recognize_crops", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5,
    track_started=False,
)  # fmt: skip
def recognize_crops(self: Any, job_id: str, first: int, stop: int) -> dict[str, Any]:
    """Run the job's second stage on its crops [first, stop), read at full resolution from the stored tiles or the
    shared file, and store their records; returns a summary for monitors (counts only: records stay in the store).

    As a tile batch: a crop's own failure is recorded, store outages are retried, a redelivered batch counts each
    crop's crashes. A duplicate that comes after its job ended (its finish deleted the job's keys) does nothing: a
    failure of its own would reach the job's id through the duplicate chord and overwrite the job's result."""
    client = store_client()
    try:
        job, staged = _described(job_id), _staged(job_id)
    except LookupError:
        return {"crops": stop - first, "failed": 0, "seconds": 0.0, "ended": True}
    careful = bool(self.request.delivery_info.get("redelivered"))
    outcomes = _recognize_crops(client, job, staged.recognition.detections, staged.plan.crops[first:stop], careful)
    records = {o.index: json.dumps(o.to_json()) for o in outcomes}
    done = store.put_records(client, job_id, records, settings().tile_ttl, "crop_records") if records else None
    if done is not None:
        _report_progress(self, job.id, done, len(records), len(staged.plan.crops), "crops")
    return {
        "crops": stop - first,
        "failed": sum(o.error is not None for o in outcomes),
        "seconds": round(sum(o.seconds for o in outcomes), 3),
    }


def _recognize_crops(
    client: redis.Redis, job: Job, detections: Detections, crops: list[PlannedCrop], careful: bool
) -> list[CropOutcome]:
    """The crops' outcomes, in order, until the job is cancelled (looked at every CANCEL_CHECK_S); `careful`, after
    a crash of the batch's process: one crop at a time, each one's attempts counted (as `_recognize` does tiles)."""
    try:
        stage = stage_of(job.options)
    except Exception as error:  # a stage that cannot be built fails its crops, with the reason
        return [CropOutcome(c.window.index, error=f"{type(error).__name__}: {error}") for c in crops]
    assert stage is not None  # the merge planned crops for it
    if job.file is None:
        windows = [crop.window for crop in crops]
        read = stage_reader(_StoredCrops(client, job, windows, stage.max_crop_pixels), job.options)
    else:
        read = stage_reader(partial(_read_shared, job.file), job.options)
    outcomes: list[CropOutcome] = []
    per_call = 1 if careful else max(1, stage.max_batch)
    for planned, run in _passes(client, job.id, crops, per_call, careful, "crop", lambda c: c.window.index):
        if not run:
            outcomes.append(CropOutcome(planned[0].window.index, error=f"gave up: {DIED} times it ran this crop"))
            continue
        outcomes.extend(read_crops(read, planned, detections, stage, TRANSIENT))
    return outcomes


class _StoredCrops:
    """A crop batch's windows, assembled from the job's stored tiles (a crop may span several), READ_EVERY crops a
    round trip in the order they are read. Overlapping tiles hold the same pixels, so each pixel is taken from one:
    the tile of its column and row of the grid, a column owning the x from its own start to the next column's (a
    row likewise); Redis cuts those parts out of the tiles, so only the crops' bytes travel. Crops larger than
    `largest` pixels are never fetched (the stage refuses them unread)."""

    def __init__(self, client: redis.Redis, job: Job, windows: list[Window], largest: int) -> None:
        self.client, self.job, self.windows, self.largest = client, job, windows, largest
        self.place = {window.index: number for number, window in enumerate(windows)}
        self.columns = _owned(sorted({w.x for w in job.windows}), job.windows[-1].x2)
        self.rows = _owned(sorted({w.y for w in job.windows}), job.windows[-1].y2)
        self.fetched: dict[int, np.ndarray] = {}

    def __call__(self, window: Window) -> np.ndarray:
        if window.index not in self.fetched:
            start = self.place[window.index]
            chunk = self.windows[start : start + store.READ_EVERY]
            self.fetched = self._fetch([w for w in chunk if w.width * w.height <= self.largest])
        return self.fetched.pop(window.index)

    def _fetch(self, windows: list[Window]) -> dict[int, np.ndarray]:
        """The windows' pixels, in one round trip."""
        parts = [(window, *part) for window in windows for part in self._parts(window)]
        stored = store.get_tile_parts(self.client, self.job.id, [(tile, part) for _, tile, part in parts],
                                      self.job.channels)  # fmt: skip
        channels = () if self.job.channels == 1 else (self.job.channels,)
        fetched = {w.index: np.zeros((w.height, w.width, *channels), dtype=np.uint8) for w in windows}
        for (window, _, part), pixels in zip(parts, stored, strict=True):
            if pixels is not None:  # None: nothing to recognize there (all nodata), left black
                fetched[window.index][
                    part.y - window.y : part.y2 - window.y, part.x - window.x : part.x2 - window.x
                ] = pixels
        return fetched

    def _parts(self, window: Window) -> list[tuple[Window, Window]]:
        """(tile, part of the window that tile owns) for each tile the window overlaps."""
        parts = []
        for row in _spanned(self.rows, window.y, window.y2):
            top, bottom = max(self.rows[row][0], window.y), min(self.rows[row][1], window.y2)
            for column in _spanned(self.columns, window.x, window.x2):
                left, right = max(self.columns[column][0], window.x), min(self.columns[column][1], window.x2)
                tile = self.job.windows[row * len(self.columns) + column]
                parts.append((tile, Window(tile.index, left, top, right - left, bottom - top)))
        return parts


def _owned(starts: list[int], end: int) -> list[tuple[int, int]]:
    """The [from, to) each column (or row) of tiles owns: from its start to the next one's, the last to `end`."""
    return list(zip(starts, [*starts[1:], end], strict=True))


def _spanned(owned: list[tuple[int, int]], start: int, stop: int) -> range:
    """The columns (or rows) whose owned ranges meet [start, stop)."""
    starts = [first for first, _ in owned]
    return range(max(0, bisect.bisect_right(starts, start) - 1), bisect.bisect_left(starts, stop))


@app.task(name="tilerec.finish", bind=True)
def finish(self: Any, image: str, recognizer: str = "faces", **options: Any) -> dict[str, Any]:
    """The second stage's finish over the job's merged detections and their crops' records: the job's result. It
    runs under the job's id with the job's own arguments (the chord's body again); the job's keys go last."""
    client = store_client()
    job = _job_of(self, client)
    try:
        staged = Staged.from_json(store.get_stage(client, job.id))
        outcomes = [CropOutcome.from_json(r) for r in store.get_records(client, job.id, "crop_records")]
        if store.is_cancelled(client, job.id):
            done = len({outcome.index for outcome in outcomes})
            raise JobCancelled(f"job {job.id} was cancelled in its second stage ({done} of "
                               f"{len(staged.plan.crops)} crops had been recognized)")  # fmt: skip
        stage = stage_of(job.options)
        assert stage is not None  # the merge planned crops for it
        recognition = finish_stage(staged.recognition, stage, staged.plan, outcomes,
                                   _resources(client, stage, job.options), batches=len(staged.spans),
                                   started=job.started)  # fmt: skip
        seconds = [outcome.seconds for outcome in outcomes if outcome.error is None]
        if seconds:  # ms per crop, for the next job's crop batches
            cost = 1000 * sum(seconds) / len(seconds)
            store.record_tile_cost(client, _crops_of(job.options), job.options.params, cost)
        return deliver(client, job.id, recognition.to_json())
    finally:
        store.delete_job(client, job.id, job.tiles)


def deliver(client: redis.Redis, job_id: str, document: dict[str, Any]) -> dict[str, Any]:
    """The result as is, or, when its JSON is larger than TILEREC_RESULT_INLINE_MAX_BYTES, a summary whose
    `result_ref` names the key holding the whole document (every status check reads the backend's value whole)."""
    limit = settings().result_inline_max_bytes
    text = json.dumps(document) if limit >= 0 else ""
    if limit < 0 or len(text) <= limit:
        return document
    summary = {key: value for key, value in document.items() if key not in BULKY}
    summary.update(
        result_ref=store.put_result(client, job_id, text, settings().result_expires),
        result_bytes=len(text),
        **{f"{key}_count": len(document[key]) for key in BULKY if key in document},
    )
    return summary
