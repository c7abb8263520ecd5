"""A job's three kinds of task, plain Celery tasks on Celery's own canvas:

tilerec.recognize(image, recognizer, **options)   resolves the image, plans the tiles and their batches, stores the
                                                  tiles (unless the workers read a shared TIFF themselves) and the
                                                  job's description, then becomes chord(batch tasks, merge); a job
                                                  of one batch is recognized right there
tilerec.recognize_tiles(job_id, first, stop)      recognizes tiles [first, stop) and stores their records
tilerec.merge(image, recognizer, **options)       runs under the job's id with the job's own arguments (what a
                                                  monitor shows), and merges the records into the Recognition
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import chord, group, signals
from celery.exceptions import Ignore

from pipeline import images, sources
from pipeline.inference import (
    TileOutcome,
    assemble,
    measured_tile_cost,
    plan,
    recognize_windows,
    storable,
    tiles_per_forward_pass,
    windows_of,
)
from pipeline.model import Spatial
from pipeline.options import JobOptions, parse_options
from pipeline.readers import remote
from pipeline.recognizers import spec_of
from pipeline.sources import FileRef
from pipeline.tiling import Window, row_ends
from tasks import store
from tasks.celery import app, others_recognize, pool_size, settings, store_client

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
MAX_ATTEMPTS = 3  # a tile (or an image) whose worker process dies this many times fails instead of coming back
CANCEL_CHECK_S = 0.25  # a running batch looks for a cancel this often (a round trip each)
STREAM_POLL_S = 0.02  # a batch waiting for a streamed image's rows looks this often
STREAM_STALL_S = 5.0  # ... and gives its process back (retrying later) when no row came for this long
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
        job, spans, outcomes = _start(client, job_id, image, target, parse_options(recognizer, options), started,
                                      redelivered)  # fmt: skip
        if outcomes is not None:  # one batch: recognized right here, a chord would only add its round trips
            return _finish(client, job, outcomes)
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
) -> tuple[Job, list[tuple[int, int]], list[TileOutcome] | None]:
    """Plan the job of `image` (resolved to `target`) and store it: its description, and its tiles unless the
    batch tasks read a shared file or the image is streamed once the chord is published. Returns the job, its batches
    as [first, stop) tile ranges and, for a job of one batch, its tiles' outcomes (recognized here)."""
    channels = 1 if spec_of(options.recognizer).grey else 3
    loaded = time.time()
    source = sources.open_source(target, options.level, settings().max_pixels, options.roi, options.read_spec(),
                                 in_row_order=True)  # fmt: skip
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
            return job, spans, _recognize(client, job, job.windows, source.read, redelivered)
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
                                     job.options.read_spec(), in_row_order=True)  # fmt: skip
        with contextlib.closing(source):
            if (source.width, source.height) != (job.width, job.height):
                raise images.ImageError("the image changed while its job was being planned; submit it again")
            tiles = ((window, storable(source.read(window), job.options)) for window in job.windows)
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
        _report_progress(self, job, done, len(records))
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
    seen, since = -1, time.monotonic()
    while True:
        ready, failed, cancelled = store.stream_state(client, job.id)
        if ready is None or ready >= stop or failed or cancelled:
            return
        if ready > seen:
            seen, since = ready, time.monotonic()
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
    cancelled, checked = store.is_cancelled(client, job.id), time.monotonic()
    judge_blank = not isinstance(read, _StoredTiles)  # stored tiles were judged when stored (blank: None)
    # tiles go to the recognizer a forward pass at a time, or one at a time where a crash must name its tile
    per_pass = 1 if careful else tiles_per_forward_pass(job.options)
    for start in range(0, len(windows), per_pass):
        if time.monotonic() - checked > CANCEL_CHECK_S:
            cancelled, checked = store.is_cancelled(client, job.id), time.monotonic()
        if cancelled:
            break
        group = windows[start : start + per_pass]
        name = f"tile:{group[0].index}"
        if careful and store.count_attempt(client, job.id, name, settings().tile_ttl) > MAX_ATTEMPTS - 1:
            outcomes.append(TileOutcome(group[0].index, error=f"gave up: {DIED} times it ran this tile"))
            continue
        found = recognize_windows(read, group, job.options, job.width, job.height, TRANSIENT, judge_blank=judge_blank)
        outcomes.extend(found)
        if any(o.error is not None and o.error.startswith("MemoryError") for o in found):
            global _unsound  # its heap may be left half-allocated, or under a limit: the process is replaced
            _unsound = True
        if careful:
            store.clear_attempts(client, job.id, name)
    return outcomes


_unsound = False  # a tile ran this process out of memory


@signals.task_postrun.connect
def _replace_if_unsound(**_: Any) -> None:
    """After the task that ran out of memory stored its result (Celery then acknowledges it, seeing the SUCCESS):
    end this process, and the pool starts a fresh one."""
    if _unsound:
        log.warning("worker process %d ran out of memory on a tile; replacing it", os.getpid())
        os._exit(70)


_last_report = ("", 0.0)  # this process's last progress report: (job id, time.monotonic())


def _report_progress(task: Any, job: Job, done: int, tiles: int) -> None:
    """When the job passed another 1/PROGRESS_STEPS of its tiles, and this process reported none for it in the
    last PROGRESS_EVERY_S (or the job's tiles are all done): an event on the job's own row for monitors (Flower
    shows its `result`), and the job's state PROGRESS in the result backend for any app's AsyncResult."""
    global _last_report
    crossed = done * PROGRESS_STEPS // job.tiles != (done - tiles) * PROGRESS_STEPS // job.tiles
    recent = _last_report[0] == job.id and time.monotonic() - _last_report[1] < PROGRESS_EVERY_S
    if done < job.tiles and (not crossed or recent):
        return
    _last_report, done = (job.id, time.monotonic()), min(done, job.tiles)
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send("task-progress", uuid=job.id, done=done, total=job.tiles, result=f"{done}/{job.tiles} tiles")
    task.backend.store_result(job.id, {"done": done, "total": job.tiles}, "PROGRESS")


@app.task(name="tilerec.merge", bind=True)
def merge(self: Any, image: str, recognizer: str = "faces", **options: Any) -> dict[str, Any]:
    """The job's tile records, read from the store, merged into its Recognition. It runs under the job's id (the
    chord's body inherits it) and carries the job's own arguments, so a job reads as one in a monitor."""
    client = store_client()
    job = Job.from_json(store.get_job(client, self.request.id))
    return _finish(client, job, [TileOutcome.from_json(record) for record in store.get_records(client, job.id)])


def _finish(client: redis.Redis, job: Job, outcomes: list[TileOutcome]) -> dict[str, Any]:
    """The job's result from its tiles' outcomes; its keys go last, whatever the outcome."""
    try:
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
