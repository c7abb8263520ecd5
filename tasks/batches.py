"""How a batch task runs its units (tiles, crops, a video's segment): their pixels read from the store (a helper
thread fetching the next group while this one is recognized) or from the shared file, a look for a cancel every
CANCEL_CHECK_S, each unit's attempts counted after a crash, the job's progress reported, and a process that ran
out of memory replaced. What a worker process keeps between its batch tasks is in one object, `PROCESS`."""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import redis
from celery import signals
from kombu.exceptions import OperationalError

from pipeline.inference import TileOutcome, recognize_windows, stage_of, stage_reader, tiles_per_forward_pass
from pipeline.model import Detections
from pipeline.readers import sources
from pipeline.readers.sources import FileRef
from pipeline.recognizers.stages import CropOutcome, PlannedCrop, read_crops
from pipeline.tiling import Window
from tasks import store
from tasks.access import allowed
from tasks.celery import settings
from tasks.job_record import JobRecord

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
MAX_ATTEMPTS = 3  # a tile (or an image) whose worker process dies this many times fails instead of coming back
DIED = f"the worker process died all {MAX_ATTEMPTS}"
CANCEL_CHECK_S = 0.25  # a running batch looks for a cancel this often (a round trip each)
STREAM_POLL_S = 0.02  # a batch waiting for a streamed image's rows looks this often
STREAM_STALL_S = 5.0  # ... and gives its process back (retrying later) when neither a row nor a beat came this long
PROGRESS_STEPS = 50  # a job reports its progress at most this many times
PROGRESS_EVERY_S = 0.5  # and a process at most this often for one job (each report: an event and a result write)
log = logging.getLogger(__name__)


@dataclass
class ProcessState:
    """What a worker process keeps between its batch tasks."""

    open_files: sources.SourceCache = field(default_factory=sources.SourceCache)  # a job's batches share one file
    unsound: bool = False  # a tile ran this process out of memory
    last_report: tuple[str, str, float] = ("", "", 0.0)  # its last progress report: (job id, unit, monotonic time)


PROCESS = ProcessState()


@signals.task_postrun.connect
def _replace_if_unsound(**_: Any) -> None:
    """After the task that ran out of memory stored its result (Celery then acknowledges it, seeing the SUCCESS):
    end this process, and the pool starts a fresh one."""
    if PROCESS.unsound:
        log.warning("worker process %d ran out of memory on a tile; replacing it", os.getpid())
        os._exit(70)


def read_shared(file: FileRef, window: Window) -> np.ndarray | None:
    """A window of the shared file or object, opened once per process (its path confined, or its URL checked
    against the allow-list, then, as for the tiling task); None: nothing to recognize there (all nodata)."""
    return PROCESS.open_files.get(file, check=allowed).read(window)


class StoredTiles:
    """A batch's tiles from the store, READ_EVERY a round trip in the order they are recognized; the next group is
    fetched by a helper thread while this one is recognized, so the recognizer seldom waits on Redis."""

    def __init__(self, client: redis.Redis, job: JobRecord, windows: list[Window]) -> None:
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


class StoredCrops:
    """A crop batch's windows, assembled from the job's stored tiles (a crop may span several), READ_EVERY crops a
    round trip in the order they are read. Overlapping tiles hold the same pixels, so each pixel is taken from one:
    the tile of its column and row of the grid, a column owning the x from its own start to the next column's (a
    row likewise); Redis cuts those parts out of the tiles, so only the crops' bytes travel. Crops larger than
    `largest` pixels are never fetched (the stage refuses them unread)."""

    def __init__(self, client: redis.Redis, job: JobRecord, windows: list[Window], largest: int) -> None:
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


def wait_for_rows(task: Any, client: redis.Redis, job: JobRecord, stop: int) -> None:
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


def run_tiles(
    client: redis.Redis, job: JobRecord, windows: list[Window], read: Callable[[Window], Any], careful: bool
) -> list[TileOutcome]:
    """The windows' outcomes, in order, until the job is cancelled (looked at every CANCEL_CHECK_S).

    `careful`: the batch's process died before, so each tile's attempts are counted and a tile that kills its
    process every time ends as a failed tile instead of an endless redelivery (`passes`)."""
    outcomes: list[TileOutcome] = []
    # stored tiles were judged when stored (blank: None), except for a second stage, whose crops may need them
    judge_blank = not isinstance(read, StoredTiles) or job.options.second_stage
    # tiles go to the recognizer a forward pass at a time, or one at a time where a crash must name its tile
    per_pass = 1 if careful else tiles_per_forward_pass(job.options)
    for tiles, run in passes(client, job.id, windows, per_pass, careful, "tile", lambda w: w.index):
        if not run:
            outcomes.append(TileOutcome(tiles[0].index, error=f"gave up: {DIED} times it ran this tile"))
            continue
        found = recognize_windows(read, tiles, job.options, job.width, job.height, TRANSIENT, judge_blank=judge_blank)
        outcomes.extend(found)
        if any(o.error is not None and o.error.startswith("MemoryError") for o in found):
            PROCESS.unsound = True  # its heap may be left half-allocated, or under a limit: the process is replaced
    return outcomes


def run_crops(
    client: redis.Redis, job: JobRecord, detections: Detections, crops: list[PlannedCrop], careful: bool
) -> list[CropOutcome]:
    """The crops' outcomes, in order, until the job is cancelled (looked at every CANCEL_CHECK_S); `careful`, after
    a crash of the batch's process: one crop at a time, each one's attempts counted (as `run_tiles` does tiles)."""
    try:
        stage = stage_of(job.options)
    except Exception as error:  # a stage that cannot be built fails its crops, with the reason
        return [CropOutcome(c.window.index, error=f"{type(error).__name__}: {error}") for c in crops]
    assert stage is not None  # the merge planned crops for it
    if job.file is None:
        windows = [crop.window for crop in crops]
        read = stage_reader(StoredCrops(client, job, windows, stage.max_crop_pixels), job.options)
    else:
        read = stage_reader(partial(read_shared, job.file), job.options)
    outcomes: list[CropOutcome] = []
    per_call = 1 if careful else max(1, stage.max_batch)
    for planned, run in passes(client, job.id, crops, per_call, careful, "crop", lambda c: c.window.index):
        if not run:
            outcomes.append(CropOutcome(planned[0].window.index, error=f"gave up: {DIED} times it ran this crop"))
            continue
        outcomes.extend(read_crops(read, planned, detections, stage, TRANSIENT))
    return outcomes


class CancelWatch:
    """Whether a job was cancelled, asked of the store at most every CANCEL_CHECK_S (a round trip each); the first
    call asks."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.looked, self.seen = float("-inf"), False

    def __call__(self) -> bool:
        if not self.seen and time.monotonic() - self.looked > CANCEL_CHECK_S:
            self.looked, self.seen = time.monotonic(), store.is_cancelled(self.client, self.job_id)
        return self.seen


@contextlib.contextmanager
def attempt(client: redis.Redis, job_id: str, name: str, careful: bool) -> Iterator[bool]:
    """Whether to run a unit of a batch (`name`: "tile:7", "segment:2"), its attempts counted while it runs.

    `careful` (the batch's process died before): the unit's attempt is counted before it runs and cleared once
    it ran without its process dying, so a unit that kills its process every time comes back with False instead
    of an endless redelivery (the first delivery is not counted, hence MAX_ATTEMPTS - 1)."""
    if careful and store.count_attempt(client, job_id, name, settings().tile_ttl) > MAX_ATTEMPTS - 1:
        yield False
        return
    yield True
    if careful:
        store.clear_attempts(client, job_id, name)


def passes(
    client: redis.Redis,
    job_id: str,
    units: list[Any],
    per_pass: int,
    careful: bool,
    kind: str,
    index_of: Callable[[Any], int],
) -> Iterator[tuple[list[Any], bool]]:
    """A batch's units (tiles, crops) `per_pass` at a time, until the job is cancelled (looked at every
    CANCEL_CHECK_S), each group with whether to run it (`attempt`: resumed once the caller has run the group)."""
    cancelled = CancelWatch(client, job_id)
    for start in range(0, len(units), per_pass):
        if cancelled():
            return
        group = units[start : start + per_pass]
        with attempt(client, job_id, f"{kind}:{index_of(group[0])}", careful) as run:
            yield group, run


def publish_progress(task: Any, job_id: str, done: int, total: int, unit: str, stage: str | None = None) -> None:
    """The job's progress, `done` of `total` `unit`s: an event on the job's own row for monitors (Flower shows its
    `result`), and the job's state PROGRESS in the result backend for any app's AsyncResult (`info`: done, total
    and, in a second stage, `stage`)."""
    # a monitor's event only: one lost while the broker fails over must not fail the batch (the store counts)
    with (
        contextlib.suppress(OperationalError, redis.ConnectionError, redis.TimeoutError),
        task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher,
    ):
        dispatcher.send("task-progress", uuid=job_id, done=done, total=total, result=f"{done}/{total} {unit}")
    info = {"done": done, "total": total} if stage is None else {"done": done, "total": total, "stage": stage}
    task.backend.store_result(job_id, info, "PROGRESS")


def report_progress(task: Any, job_id: str, done: int, count: int, total: int, unit: str = "tiles") -> None:
    """When the job passed another 1/PROGRESS_STEPS of its tiles (or crops: `unit`) with these `count`, and this
    process reported none for it in the last PROGRESS_EVERY_S (or all are done): `publish_progress`, crops as the
    stage "crops"."""
    crossed = done * PROGRESS_STEPS // total != (done - count) * PROGRESS_STEPS // total
    last = PROCESS.last_report
    recent = last[:2] == (job_id, unit) and time.monotonic() - last[2] < PROGRESS_EVERY_S
    if done < total and (not crossed or recent):
        return
    PROCESS.last_report, done = (job_id, unit, time.monotonic()), min(done, total)
    publish_progress(task, job_id, done, total, unit, None if unit == "tiles" else unit)
