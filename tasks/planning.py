"""How an image job is planned by its tiling task: its batches sized from what tiles cost in earlier jobs, room
reserved in the store for its tiles (or a wait in line for it), and one of its modes chosen and stored:

streamed   its record stored; its image decoded top to bottom once the chord is published, stored row by row while
           other processes recognize its first rows (`decode_streamed`)
shared     a tiled file or object its batch tasks read themselves: only the record is stored
stored     its tiles stored, then its record
one batch  recognized right in the tiling task, where a chord would only add its round trips (tasks.jobs)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import Ignore

from pipeline.inference import grey_tiles, plan, region, storable
from pipeline.options import JobOptions
from pipeline.readers import remote, sources
from pipeline.readers.images import ImageError
from pipeline.readers.sources import FileRef
from pipeline.recognizers import spec_of
from pipeline.recognizers.stages import SecondStage, crop_spans
from pipeline.tiling import row_ends
from tasks import store
from tasks.access import resolve
from tasks.batches import DIED, MAX_ATTEMPTS
from tasks.celery import others_recognize, pool_size, settings
from tasks.job_record import JobCancelled, JobRecord

# auto batches: at least this many per process of the tiling node (its size is known there, the cluster's is not;
# each batch costs a task of Celery and Redis round trips, docs/performance.md)
BATCHES_PER_PROCESS = 4
WAITING = "WAITING"  # the state of a job waiting for room in the tile store
ROOM_RETRY_S = 1.0  # a waiting job asks for room again this often


@dataclass(frozen=True)
class JobPlan:
    """A planned job: its record and its batches as [first, stop) tile ranges."""

    record: JobRecord
    spans: list[tuple[int, int]]


def plan_job(
    client: redis.Redis,
    job_id: str,
    image: str,
    target: Path | bytes | remote.RemoteObject,
    source: sources.Source,
    options: JobOptions,
    times: tuple[float, float, float],
) -> JobPlan:
    """The job of `image` (resolved to `target`, opened as `source`), its mode chosen (module docstring).

    Args:
        client: the store.
        job_id: the job's id.
        image: the image as the caller gave it.
        target: what it resolved to.
        source: the image, opened (in row order).
        options: the job's options.
        times: time.time() when the tiling task began, when it began opening the image, and when it was open.

    Returns:
        The job's record (not stored yet) and its batches."""
    started, loaded, decoded = times
    channels = 1 if spec_of(options.recognizer).grey else 3
    # the tile tasks read an object in storage themselves, and a file when they see the same files
    shared = source.windowed and (isinstance(target, remote.RemoteObject) or
                                  (settings().shared_storage and isinstance(target, Path)))  # fmt: skip
    # a node of one process that takes tiles too could only recognize a streamed image's rows afterwards
    streams = not shared and not isinstance(source, sources.ArraySource) and others_recognize()
    spans = tile_spans(client, options, source.height, source.width, row_by_row=streams)
    streams = streams and len(spans) > 1
    timings = {"load_s": loaded - started, "decode_s": decoded - loaded}
    if streams:
        timings = {"load_s": decoded - started, "decode_s": 0.0, "store_s": 0.0}
    record = JobRecord(job_id, image, source.width, source.height, options, len(spans),
                       min(channels, source.channels), started, timings, source.level, source.downsample,
                       FileRef.of(target, source.level, source) if shared else None, streamed=streams,
                       spatial=source.spatial)  # fmt: skip
    return JobPlan(record, spans)


def store_job(client: redis.Redis, job: JobRecord, source: sources.Source, decoded: float) -> None:
    """Store what the job's batch tasks need, by its mode (module docstring): a streamed job's room and record (its
    tiles follow the chord: `decode_streamed`), a stored job's room, tiles and record, a shared job's record. The
    record goes last, with the time spent storing since the image was open (`decoded`), unless the job was
    cancelled meanwhile."""
    if job.streamed or job.file is None:
        admit(client, job.id, need(job))
    if job.streamed:
        store.put_job(client, job.id, job.to_json(), job.tiles, settings().tile_ttl, streamed=True)
        return
    if job.file is None:
        _put_tiles(client, job, source)
    if store.is_cancelled(client, job.id):
        raise JobCancelled(f"job {job.id} was cancelled")
    job = replace(job, timings={**job.timings, "store_s": time.time() - decoded})
    store.put_job(client, job.id, job.to_json(), job.tiles, settings().tile_ttl)


def decode_streamed(client: redis.Redis, job: JobRecord, attempts: int, source: sources.Source | None = None) -> None:
    """Decode a streamed job's image (its open `source`, or opened again after a redelivery) top to bottom and store
    each row of tiles as soon as it is decoded; a failure is stored for the waiting batch tasks and the merge (which
    fails the job with it)."""
    try:
        if attempts > MAX_ATTEMPTS:
            raise ImageError(f"gave up on {job.image!r}: {DIED} times it decoded it")
        with contextlib.closing(source or _reopen(job)) as opened, store.decoding(client, job.id, settings().tile_ttl):
            _put_tiles(client, job, opened, row_ends(job.windows))
    except redis.OutOfMemoryError:
        store.fail_job(client, job.id, job.tiles, store.FILLED, settings().tile_ttl)
    except Exception as error:
        reason = str(error) if isinstance(error, ImageError) else f"{type(error).__name__}: {error}"
        client.set(store.job_key(job.id, "failed"), reason, ex=settings().tile_ttl)


def _reopen(job: JobRecord) -> sources.Source:
    """The job's image opened again as it was planned, checked to be the same size."""
    source = sources.open_source(resolve(job.image), job.level, settings().max_pixels, job.options.roi,
                                 job.options.read_spec(), in_row_order=True, grey=grey_tiles(job.options))  # fmt: skip
    if (source.width, source.height) != (job.width, job.height):
        source.close()
        raise ImageError("the image changed while its job was being planned; submit it again")
    return source


def _put_tiles(client: redis.Redis, job: JobRecord, source: sources.Source, rows: set[int] | None = None) -> None:
    """The job's tiles read from `source` in row order and stored (`rows`: a streamed job's, made ready row by
    row)."""
    tiles = ((window, storable(source.read(window), job.options)) for window in job.windows)
    store.put_tiles(client, job.id, tiles, settings().tile_ttl, rows or ())


def tile_spans(
    client: redis.Redis, options: JobOptions, height: int, width: int, row_by_row: bool = False
) -> list[tuple[int, int]]:
    """The job's batches as [first, stop) tile ranges, sized from what tiles cost this recognizer in earlier jobs."""
    # a job of one tile (`tiling.grid` gives one where no side is longer than a tile) has nothing to size or spread:
    # no round trips for the cost or the cluster (tasks/roster.py)
    covered = region(height, width, options)
    several = max(covered.width, covered.height) > options.tile
    measured = store.get_tile_cost(client, options.recognizer, options.params) if several else None
    processes = store.tile_processes(client) if several else 0
    least = options.min_batches or settings().min_batches or BATCHES_PER_PROCESS * pool_size()
    # one batch wanted: no job to balance over processes, so no tapered tail of small batches either
    planned = plan(height, width, options, measured, settings().batch_target_ms, least, taper=least > 1,
                   row_by_row=row_by_row, processes=processes)  # fmt: skip
    return [(batch[0].index, batch[-1].index + 1) for batch in planned]


def crop_batches(client: redis.Redis, options: JobOptions, stage: SecondStage, crops: int) -> list[tuple[int, int]]:
    """A job's crop batches as [first, stop) ranges: `crop_batch_size` crops each, or about
    TILEREC_BATCH_TARGET_MS of the stage's work each (what crops cost it in earlier jobs, else its `cost_ms`), at
    least as many as tile batches would be."""
    least = options.min_batches or settings().min_batches or BATCHES_PER_PROCESS * pool_size()
    measured = store.get_tile_cost(client, crops_of(options), options.params)
    cost = stage.cost_ms if measured is None else measured
    processes = store.tile_processes(client)
    return crop_spans(crops, cost, settings().batch_target_ms, least, options.crop_batch_size, processes)


def crops_of(options: JobOptions) -> str:
    """The name the measured cost of a recognizer's crops is kept under (beside its tiles' cost)."""
    return f"{options.recognizer}#crops"


class NoRoom(Exception):
    """The job's tiles do not fit in the store now: it waits in line (`wait_for_room`)."""

    def __init__(self, room: store.Room) -> None:
        super().__init__(room.waiting())
        self.room = room


def need(job: JobRecord) -> int:
    """The bytes the job's tiles and records take in the store."""
    return store.tiles_bytes(window.height * window.width * job.channels for window in job.windows)


def admit(client: redis.Redis, job_id: str, need: int) -> None:
    """Reserve room in the store for the job's tiles. Raises StoreFull when they can never fit (the message names
    the sizes), NoRoom when they do not fit now (its need recorded, so its next try asks before reading)."""
    room = store.reserve(client, job_id, need, settings().store_max_bytes, settings().tile_ttl)
    if room.never:
        raise store.StoreFull(room.refusal())
    if not room.granted:
        store.wait(client, job_id, need, settings().tile_ttl)
        raise NoRoom(room)


@contextlib.contextmanager
def while_planning(task: Any, client: redis.Redis) -> Iterator[None]:
    """A job's first task while it reads and plans its input (an image's or a video's): a job without room in the
    store waits in line (`wait_for_room`); one refused or failed leaves nothing behind, its keys deleted (a store out
    of memory said as StoreFull)."""
    try:
        yield
    except NoRoom as waiting:
        raise wait_for_room(task, client, waiting.room) from None
    except redis.OutOfMemoryError:
        store.delete_job(client, task.request.id)
        raise store.StoreFull(store.FILLED) from None
    except BaseException:
        store.delete_job(client, task.request.id)
        raise


def wait_for_room(task: Any, client: redis.Redis, room: store.Room) -> Ignore:
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
