"""tilerec's Celery app and its three tasks. Thin: they move references and results and call `pipeline`.

tilerec.recognize(image, recognizer, **options)  plans the tiles and their batches, stores the tiles (unless the
                                                 workers read a shared TIFF themselves) and the job's description,
                                                 then becomes chord(tile tasks, merge); a job of one batch is
                                                 recognized right there; a PNG is decoded and stored band by band
                                                 once the chord is published
tilerec.recognize_tiles(job_id, runner)          takes the job's batches one by one until none is left and
                                                 recognizes their tiles: stored ones, or windows of the file
tilerec.merge(results, job_id)                   merges the tile records into the job's Recognition

A job has as many tile tasks as there are live tile worker processes, not one per batch: a task costs 8-12 ms of
Celery and Redis and leaves its process idle 3-6 ms before the next (measured at W=2), a claim one round trip.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any, NamedTuple

import redis
from celery import Celery, chord, signals
from celery.exceptions import Ignore

from pipeline import images, sources, streaming
from pipeline.inference import (
    blank,
    check_size,
    compact,
    compact_bands,
    measured_tile_cost,
    merge_tiles,
    plan,
    recognize_tile,
    windows_of,
)
from pipeline.memory import keep_freed_buffers
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, parse_options
from pipeline.recognizers import get_spec, limit_threads, restrict_file_params, thread_budget
from pipeline.sources import FileRef, Source
from pipeline.tiling import Window
from tasks import registry, store

app = Celery("tilerec")
app.config_from_object("celeryconfig")
app.steps["worker"].add(registry.TileProcessRegistry)

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
MAX_ATTEMPTS = 3  # a tile (or an image) whose worker process dies this many times fails instead of coming back
# how often a running batch looks for a cancellation: each look is a round trip, 0.6 ms when the cores are busy
# (measured at W=2); every 50 ms that was 4.5 looks and 2.6 ms per task of 300 ms
CANCEL_CHECK_S = 0.25
READY_WAIT_S = 1.0  # a tile task waiting for a streamed PNG's tiles looks again after this long, woken or not
# auto batches: at least this many per live tile worker process, so the processes finish together
BATCHES_PER_PROCESS = 4
# while no tile worker is registered (they may be starting): this many batches, a tile task each
UNKNOWN_CLUSTER_BATCHES = 16


class TileFailure(RuntimeError):
    """One or more tiles of a job could not be recognized."""


class JobCancelled(RuntimeError):
    """The job was cancelled before it finished."""


_worker: Any = None


@signals.worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    global _worker
    _worker = sender


@signals.worker_process_init.connect
def _set_up_process(**_: Any) -> None:
    """processes × threads = cores (OpenCV would give every worker process all the cores), and files named in
    messages confined to the model folders."""
    processes = int(getattr(_worker, "concurrency", None) or 1)
    limit_threads(app.conf.tilerec_threads_per_process or max(1, (os.cpu_count() or 1) // processes))
    restrict_file_params(images.allowed_roots_from_env(app.conf.tilerec_model_roots))
    if app.conf.tilerec_keep_freed_buffers:
        keep_freed_buffers()


def _tile_store() -> redis.Redis:
    return store.connect(app.conf.tilerec_store_url)


def _roots() -> list:
    return _resolved_roots(app.conf.tilerec_allowed_roots)


@lru_cache(maxsize=4)
def _resolved_roots(setting: str) -> list:
    """Resolving the roots costs a system call per path component: once per process, not per tile."""
    return images.allowed_roots_from_env(setting)


def _open(image: Any, options: JobOptions) -> tuple[Source, FileRef | None, float]:
    """The job's image source; the file tile tasks read their own windows from (None: tiles go through the
    store); and when loading ended (the rest of opening is decoding, or reading a TIFF's header)."""
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path or a redis: reference (a string), got {image!r}")
    max_pixels = app.conf.tilerec_max_pixels
    if image.startswith(store.REF_SCHEME):
        data = store.get_bytes(_tile_store(), image)
    elif "://" in image:
        raise images.ImageError(
            f"{image!r}: images are not fetched from URLs (workers would fetch for anyone who can publish); "
            "store the bytes with tasks.client.put_image and pass its redis: reference"
        )
    elif sources.is_tiff_file(real := images.confine(image, _roots())):
        loaded = time.time()
        source = sources.open_source(real, options.level, max_pixels, options.roi)
        shared = source.windowed and app.conf.tilerec_shared_storage
        return source, FileRef.of(real, options.level) if shared else None, loaded
    else:
        data = images.read_file(image, _roots())
    loaded = time.time()
    return sources.open_source(data, options.level, max_pixels, options.roi, thread_budget()), None, loaded


@app.task(name="tilerec.recognize", bind=True)
def recognize(self: Any, image: str, recognizer: str = "faces", **options: Any) -> Any:
    client = _tile_store()
    job_id = self.request.id
    deliveries, cancelled = store.count_delivery(client, job_id, "tiling", _ttl())
    if deliveries > 1 and store.find_job(client, job_id, "stream"):
        # back after its process died while decoding a streamed PNG: the chord runs already, and waits for the rest
        _decode_streamed(client, job_id, deliveries)
        raise Ignore("the job's chord was published by an earlier delivery; its merge gives the job's result")
    try:
        job, records = _start_job(client, job_id, image, recognizer, options, deliveries, cancelled)
        if records is not None:  # one batch: recognized right here, a chord would only add its round trips
            return _conclude(client, job, records)
    except BaseException:
        store.delete_job(client, job_id)  # a job refused or failed while tiling leaves nothing behind
        raise
    header = [recognize_tiles.s(job_id, runner) for runner in range(job["tasks"])]
    try:
        return self.replace(chord(header, merge.s(job_id)))
    except Ignore:  # the chord is published: its tile tasks recognize each batch as soon as its tiles are stored
        if job.get("stream"):
            _decode_streamed(client, job_id, deliveries)
        raise


def _decode_streamed(client: redis.Redis, job_id: str, deliveries: int) -> None:
    """Decode a streamed job's PNG band by band, store each tile as soon as its rows are decoded, and mark each batch
    ready once its tiles are stored: the decoding is serial work, which at 8000² can outlast a cheap recognizer's
    whole job, and this way the tile tasks recognize while the rest decodes.

    A failure is recorded for the merge, which fails the job with it (see _recognition), not raised: the tile tasks
    must stop waiting, and the merge must still run to clean up."""
    view = _jobs.get(client, job_id)
    job = view.job
    try:
        if deliveries > MAX_ATTEMPTS:
            raise images.ImageError(
                f"gave up on {job['source']!r}: the worker process died all {MAX_ATTEMPTS} times it decoded it"
            )
        data = _read_input(job["source"])
        layout = streaming.streamable_png(data[: streaming.HEAD_BYTES])
        if layout is None or (layout.width, layout.height) != (job["width"], job["height"]):
            raise images.ImageError(f"{job['source']!r} changed while the job was being planned; submit it again")
        bands = compact_bands(streaming.decode_png_bands(data, layout, threads=thread_budget()), view.options)
        tiles = ((w, _storable(tile, view.options)) for w, tile in streaming.tiles_from_bands(bands, view.windows))
        store.stream_tiles(client, job_id, tiles, [stop for _, stop in job["batches"]], job["tasks"], _ttl())
    except Exception as error:
        reason = str(error) if isinstance(error, images.ImageError) else f"{type(error).__name__}: {error}"
        store.fail_stream(client, job_id, reason, job["tasks"], _ttl())


def _start_job(
    client: redis.Redis,
    job_id: str,
    image: Any,
    recognizer: Any,
    options: dict[str, Any],
    deliveries: int,
    cancelled: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Check, load, decode and plan the job. Returns its description (with its batches as [first, stop) ranges of
    tile indexes) and, for a job of one batch, the tile records (recognized here); otherwise None, and the
    description and the tiles are in the store for the tile tasks; except tiles the workers read from a shared
    file, and those of a streamed PNG (`stream`), which _decode_streamed stores once the chord is published."""
    started = time.time()
    if cancelled:
        raise JobCancelled(f"job {job_id} was cancelled")
    if deliveries > MAX_ATTEMPTS:
        raise images.ImageError(f"gave up on {image!r}: the worker process died all {MAX_ATTEMPTS} times it read it")
    parsed = parse_options(recognizer, options)
    processes = registry.live_processes(client, app.conf.tiles_queue)
    # streamed, the PNG's tiles are recognized while it decodes: that needs a tile process other than this one
    others = processes - (1 if _worker is None or registry.consumes(_worker, app.conf.tiles_queue) else 0)
    layout = _stream_layout(image, parsed) if others > 0 else None
    if layout is not None:
        job, windows = _describe(client, job_id, image, parsed, layout.height, layout.width, processes, streamed=True)
        if len(job["batches"]) > 1:
            grey = get_spec(parsed.recognizer).grey
            job.update(channels=1 if grey else layout.channels, level=0, downsample=1.0, file=None, stream=True)
            job["timings"] = {"started": started, "load_s": time.time() - started, "decode_s": 0.0, "store_s": 0.0}
            store.start_stream(client, job_id, job["tiles"], _ttl())
            store.put_job(client, job_id, job, _ttl())
            return job, None
    source, file, loaded = _open(image, parsed)
    try:
        decoded = time.time()
        job, windows = _describe(client, job_id, image, parsed, source.height, source.width, processes)
        grey = file is None and get_spec(parsed.recognizer).grey  # stored tiles are compact()ed
        job.update(
            channels=1 if grey else source.channels,
            level=source.level,
            downsample=source.downsample,
            file=file.to_json() if file is not None else None,
            timings={"started": started, "load_s": loaded - started, "decode_s": decoded - loaded},
        )
        if len(job["batches"]) == 1:
            records = _recognize_batch(client, job, parsed, windows, source.read, deliveries, cancelled=False)
            job["timings"]["store_s"] = 0.0
            return job, records
        if file is None:  # no shared file: the tiles travel through the store, read (or cut) one by one
            store.put_tiles(client, job_id, windows, lambda w: _storable(source.read(w), parsed), _ttl())
    finally:
        source.close()
    if store.is_cancelled(client, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")
    job["timings"]["store_s"] = time.time() - decoded
    store.put_job(client, job_id, job, _ttl())
    return job, None


def _describe(
    client: redis.Redis,
    job_id: str,
    image: str,
    options: JobOptions,
    height: int,
    width: int,
    processes: int,
    streamed: bool = False,
) -> tuple[dict[str, Any], list[Window]]:
    """The job's description as far as the image's size decides it (its tiles, batches and tile tasks), and its
    tiles. The batches are sized for the tile worker `processes` alive now (the registry; 0: none registered), and
    for a `streamed` PNG cut row by row of tiles, as the decoding makes them ready."""
    check_size(height, width, options, app.conf.tilerec_max_pixels)
    measured = store.get_tile_cost(client, options.recognizer, options.params)
    target_ms = app.conf.tilerec_batch_target_ms
    planned = plan(
        height, width, options, measured, target_ms, _min_batches(processes), taper=processes != 1, row_by_row=streamed
    )
    windows = [window for batch in planned for window in batch]
    job = {
        "id": job_id,
        "source": image,
        "width": width,
        "height": height,
        "options": options.to_json(),
        "tiles": len(windows),
        "batches": [(batch[0].index, batch[-1].index + 1) for batch in planned],
        "tasks": min(len(planned), _tile_tasks(processes)),
    }
    return job, windows


TAIL_BYTES = 32  # where a PNG's IEND chunk must be (images.check_complete)


def _stream_layout(image: Any, options: JobOptions) -> streaming.PngLayout | None:
    """The layout of a PNG that _decode_streamed can decode band by band while tile tasks recognize the tiles ready
    so far, read from its header (and its end, to refuse a truncated file now); None: decode it whole here."""
    if not isinstance(image, str) or not image or options.level != 0 or "://" in image:
        return None
    if image.startswith(store.REF_SCHEME):
        head, tail = store.get_ends(_tile_store(), image, streaming.HEAD_BYTES, TAIL_BYTES)
    else:
        real = images.confine(image, _roots())
        with images.file_errors(image), open(real, "rb") as handle:
            head = handle.read(streaming.HEAD_BYTES)
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - TAIL_BYTES))
            tail = handle.read()
    layout = streaming.streamable_png(head)
    if layout is not None:
        images.check_pixels(layout.width, layout.height, app.conf.tilerec_max_pixels)
        images.check_complete(head[: len(streaming.PNG_SIGNATURE)] + tail)
    return layout


def _read_input(image: str) -> bytes:
    if image.startswith(store.REF_SCHEME):
        return store.get_bytes(_tile_store(), image)
    return images.read_file(image, _roots())


def _min_batches(processes: int) -> int:
    """TILEREC_MIN_BATCHES, or by default enough batches for the tile worker processes alive now to share."""
    if app.conf.tilerec_min_batches is not None:
        return app.conf.tilerec_min_batches
    return BATCHES_PER_PROCESS * processes if processes else UNKNOWN_CLUSTER_BATCHES


def _tile_tasks(processes: int) -> int:
    """TILEREC_TILE_TASKS, or by default one per tile worker process alive now (a process that starts later gets a
    task of its own at the job's next handover, see _hand_over)."""
    if app.conf.tilerec_tile_tasks is not None:
        return app.conf.tilerec_tile_tasks
    return processes or UNKNOWN_CLUSTER_BATCHES


def _ttl() -> int:
    return app.conf.tilerec_tile_ttl


def _storable(tile: Any, options: JobOptions) -> Any:
    """What the store keeps of a tile: None for a blank one (skip_blank), else the channels the recognizer reads."""
    return None if blank(tile, options) else compact(tile, options)


class _JobView(NamedTuple):
    job: dict[str, Any]
    options: JobOptions
    windows: list[Window]
    file: FileRef | None  # the shared file the tiles are read from; None: from the store


class _Jobs:
    """Job descriptions this worker process has read, with their parsed options, tile grid and file: a job's
    tasks land on the same processes again and again, and a description never changes once stored."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.known: OrderedDict[str, _JobView] = OrderedDict()

    def get(self, client: redis.Redis, job_id: str) -> _JobView:
        if job_id not in self.known:
            job = store.get_job(client, job_id)
            options = JobOptions.from_json(job["options"])
            file = FileRef.from_json(job["file"]) if job.get("file") is not None else None
            self.known[job_id] = _JobView(job, options, windows_of(job["height"], job["width"], options), file)
            while len(self.known) > self.capacity:
                self.known.popitem(last=False)
        self.known.move_to_end(job_id)
        return self.known[job_id]


_jobs = _Jobs()
_open_files = sources.SourceCache()  # per worker process: tile tasks of a job share one open TIFF


def _tile_pixels(client: redis.Redis, view: _JobView, window: Window) -> Any:
    """The tile's pixels from the shared file (its own window, decoded here) or from the store; None: blank."""
    if view.file is None:
        return store.get_tile(client, view.job["id"], window, view.job["channels"])
    sources.check_region(window.width, window.height, app.conf.tilerec_max_pixels)
    # a tile task reads only what a tiling task on this worker could read
    return _open_files.get(view.file, check=_confine).read(window)


def _confine(path: str) -> None:
    images.confine(path, _roots())


def _failed(window: Window, error: str) -> dict[str, Any]:
    return {"tile": window.index, "window": [window.x, window.y, window.width, window.height], "error": error}


def _recognize_batch(
    client: redis.Redis,
    job: dict[str, Any],
    options: JobOptions,
    windows: list[Window],
    read: Callable[[Window], Any],
    deliveries: int,
    cancelled: bool,
) -> list[dict[str, Any]]:
    """One record per tile: its detections in image coordinates, {"skipped": True} for a blank tile, or the error
    that stopped it. A tile's own failure is recorded, not raised (see recognize_tiles); store outages are raised.

    `deliveries` > 1 means the batch's worker process died before: each tile's attempts are then counted, so a tile
    that kills its worker every time ends as a failed tile instead of an endless redelivery. `cancelled`: the job
    was cancelled when the batch started (read with `deliveries`, in the same round trip)."""
    job_id = job["id"]
    last_check = time.monotonic()
    records = []
    for window in windows:
        if time.monotonic() - last_check > CANCEL_CHECK_S:
            cancelled, last_check = store.is_cancelled(client, job_id), time.monotonic()
        if cancelled:
            records.append(_failed(window, "cancelled"))
            continue
        # the first delivery is not counted per tile (no cost in the common case), hence MAX_ATTEMPTS - 1
        careful = deliveries > 1
        if careful and store.count_tile_attempt(client, job_id, window.index) > MAX_ATTEMPTS - 1:
            records.append(
                _failed(window, f"gave up: the worker process died all {MAX_ATTEMPTS} times it ran this tile")
            )
            continue
        began = time.perf_counter()
        try:
            pixels = read(window)
            if pixels is None or blank(pixels, options):
                outcome: dict[str, Any] = {"skipped": True}
            else:
                found = recognize_tile(pixels, window, options, job["width"], job["height"])
                outcome = found.to_columns()
        except TRANSIENT:
            raise
        except Exception as error:  # reported per tile, see recognize_tiles
            records.append(_failed(window, f"{type(error).__name__}: {error}"))
            continue
        if careful:
            store.clear_tile_attempts(client, job_id, window.index)
        records.append({"tile": window.index, "seconds": time.perf_counter() - began, **outcome})
    return records


@app.task(
    name="tilerec.recognize_tiles",
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    max_retries=3,
    # No result of its own in the backend: the chord still gets the records (the Redis backend's chord counting keeps
    # them), and Flower gets them from events. A stored SUCCESS would also make Celery ack, not requeue, a task whose
    # process died after storing it but before the chord counted it: the job would then wait forever (seen in tests).
    ignore_result=True,
)
def recognize_tiles(self: Any, job_id: str, runner: int) -> list[dict[str, Any]]:
    """Takes the job's batches one by one until none is left, and returns one record per tile of them (see
    _recognize_batch); `runner` numbers the job's tile tasks, for people reading a monitor.

    Back after its process died (or after a retry), it first redoes the batches it took before: their records died
    with it. It hands the batches left to a new task it adds to the job's chord, and returns, once its node is
    stopping (warm shutdown: the node left the registry), or after TILEREC_TASK_HANDOVER_S: a crash then redoes at
    most that much work, and no task comes near the broker's visibility timeout.

    A tile's own failure is reported, not raised: a failed chord part would cancel the merge, which must run
    to clean up and to say which region failed. Store outages are raised and retried with backoff.
    """
    began = time.monotonic()
    client = _tile_store()
    view = _jobs.get(client, job_id)
    task_id, spans = self.request.id, view.job["batches"]
    deliveries, cancelled = store.count_delivery(client, job_id, task_id, _ttl())
    read = partial(_tile_pixels, client, view)
    records: list[dict[str, Any]] = []
    tiles_done = 0
    if deliveries > 1:
        for batch in store.claimed_by(client, job_id, task_id):
            first, stop = spans[batch]
            windows = view.windows[first:stop]
            records += _recognize_batch(client, view.job, view.options, windows, read, deliveries, cancelled)
            tiles_done += stop - first
    node_key, watch_node = registry.registry_key(app.conf.tiles_queue), None
    while True:
        claim = store.claim_batch(
            client, job_id, task_id, len(spans), tiles_done, _ttl(), node_key, self.request.hostname, bool(watch_node)
        )
        watch_node = claim.node_live if watch_node is None else watch_node  # a node registered when it began
        _report_progress(self, view.job, claim.done, tiles_done)
        tiles_done = 0
        if claim.waiting:  # the next batch's rows are still being decoded (_decode_streamed)
            store.wait_ready(client, job_id, READY_WAIT_S)
        elif claim.batch is None:  # none left, the job was cancelled or failed, or the node is stopping
            if claim.node_left:
                _hand_over(self, client, view.job, runner)
            break
        else:
            first, stop = spans[claim.batch]
            records += _recognize_batch(client, view.job, view.options, view.windows[first:stop], read, 1, False)
            tiles_done = stop - first
        if time.monotonic() - began > _handover_s():
            _hand_over(self, client, view.job, runner)
            break
    if deliveries > 1:
        _outwait_dead_chord_claim(self)
    return records


def _hand_over(task: Any, client: redis.Redis, job: dict[str, Any], runner: int) -> None:
    """Add a successor to the job's chord for the batches left, and one more task for each tile worker process that
    joined the cluster since the job began (while it has batches left for them)."""
    processes = registry.live_processes(client, app.conf.tiles_queue)
    joined = store.grow_tasks(client, job["id"], job["tasks"], processes, len(job["batches"]), _ttl())
    for number in (runner, *joined):
        task.add_to_chord(recognize_tiles.s(job["id"], number))


def _handover_s() -> float:
    return min(app.conf.tilerec_task_handover_s, app.conf.visibility_timeout / 2)


CHORD_CLAIM_WAIT_S = 120.0  # Celery 5.7's claim on a chord's callback lasts 6 s, 21 s once its publishing started


def _outwait_dead_chord_claim(task: Any) -> None:
    """This batch is back because its process died. If that process was the chord's last part, it may have died
    after claiming the chord's callback (the merge) and before publishing it: Celery lets such a claim lapse, but
    only a part returning after that publishes the callback, and this redelivery is the last part there will be.
    Wait until the claim is released ("done") or lapses, so this part's return publishes the merge (seen in
    tests: without this, the job waited forever)."""
    backend, group = task.backend, task.request.group
    if not group or not hasattr(backend, "client"):
        return
    claim = backend.get_key_for_group(group, ".c")
    deadline = time.monotonic() + CHORD_CLAIM_WAIT_S
    while backend.client.get(claim) not in (None, b"done", "done") and time.monotonic() < deadline:
        time.sleep(0.2)


PROGRESS_STEPS = 50  # a job reports its progress at most this many times (plus once when done)


def _report_progress(task: Any, job: dict[str, Any], done: int, tiles: int) -> None:
    """When the job's count of tiles done (`done`, `tiles` of them just now) crossed another 1/PROGRESS_STEPS of its
    tiles, tell the world: an event for Flower (it sees states only from events), and the job's own state PROGRESS in
    the result backend, so any app can follow the job from its AsyncResult. Throttled: each costs a round trip."""
    total = job["tiles"]
    done = min(done, total)
    if not tiles or (done * PROGRESS_STEPS // total == (done - tiles) * PROGRESS_STEPS // total and done < total):
        return
    progress = {"done": done, "total": total}
    task.send_event("task-progress", job=job["id"], **progress)
    task.backend.store_result(job["id"], progress, "PROGRESS")


@app.task(name="tilerec.merge", bind=True)
def merge(self: Any, results: list[list[dict[str, Any]]], job_id: str) -> dict[str, Any]:
    # result_extended stores a task's arguments beside its result, and these are every tile's detections:
    # 2.3 times the result's size for nothing (measured). The result backend keeps a summary instead.
    self.request.args = [f"<{sum(len(batch) for batch in results)} tile records>", job_id]
    client = _tile_store()
    job = store.get_job(client, job_id)
    return _conclude(client, job, [record for batch in results for record in batch])


def _conclude(client: redis.Redis, job: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's Recognition from its tile records. The job's keys go last, whatever the outcome: a merge whose
    process dies before its result is stored runs again, and needs the job's description then."""
    try:
        return _recognition(client, job, records)
    finally:
        store.delete_job(client, job["id"], job["tiles"])


def _recognition(client: redis.Redis, job: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    began = time.time()
    by_tile: dict[int, dict[str, Any]] = {}
    for record in records:
        by_tile.setdefault(record["tile"], record)  # a redelivered tile counts once
    cancelled = store.is_cancelled(client, job["id"])
    failed = sorted((record for record in by_tile.values() if "error" in record), key=lambda r: r["tile"])
    if cancelled:
        done = len(by_tile) - len(failed)
        raise JobCancelled(f"job {job['id']} was cancelled ({done} of {job['tiles']} tiles had been recognized)")
    decoding = store.stream_failure(client, job["id"]) if job.get("stream") else None
    if decoding is not None:
        raise images.ImageError(decoding)
    options = JobOptions.from_json(job["options"])
    missing = sorted(set(range(job["tiles"])) - set(by_tile))
    if (failed or missing) and options.on_tile_error == "fail":
        described = "; ".join(f"tile {f['tile']} at {f['window']}: {f['error']}" for f in failed[:5])
        if missing:
            described += f"{'; ' if described else ''}no result for tiles {missing[:10]}"
        raise TileFailure(f"{len(failed) + len(missing)} of {job['tiles']} tiles failed: {described}")
    recognized = [by_tile[index] for index in sorted(by_tile) if "xyxy" in by_tile[index]]
    _learn_tile_cost(client, job, options, recognized)
    merged = merge_tiles((Detections.from_columns(record) for record in recognized), options)
    skipped = sum(1 for record in by_tile.values() if record.get("skipped"))
    finished = time.time()
    timings = dict(job["timings"])
    started = timings.pop("started")
    if job.get("stream"):  # decoded and stored by the tiling task while the tile tasks recognized
        streamed = store.stream_timings(client, job["id"])
        timings.update(streamed_decode_s=streamed.get("decode_s", 0.0), streamed_store_s=streamed.get("store_s", 0.0))
    timings.update(
        recognize_s=sum(record.get("seconds", 0.0) for record in by_tile.values()),
        merge_s=finished - began,
        total_s=finished - started,
    )
    document = Recognition(
        width=job["width"],
        height=job["height"],
        detections=merged,
        recognizer=options.recognizer,
        params=options.params,
        source=job["source"],
        tile=options.tile,
        overlap=options.overlap,
        tiles=job["tiles"],
        batches=len(job["batches"]),
        tasks=store.job_tasks(client, job["id"], job["tasks"]),
        failed_tiles=[{"tile": f["tile"], "window": f["window"], "error": f["error"]} for f in failed]
        + [{"tile": index, "window": None, "error": "no result"} for index in missing],
        timings=timings,
        level=job.get("level", 0),
        downsample=job.get("downsample", 1.0),
        roi=options.roi,
        skipped=skipped if options.skip_blank is not None else None,
    ).to_json()
    return _deliver(client, job["id"], document)


def _learn_tile_cost(
    client: redis.Redis, job: dict[str, Any], options: JobOptions, recognized: list[dict[str, Any]]
) -> None:
    """Remember what this job's tiles cost, so the next job's auto batches carry the work they were sized for."""
    cost = measured_tile_cost([record["seconds"] for record in recognized], job["height"], job["width"], options)
    if cost is not None:
        store.record_tile_cost(client, options.recognizer, options.params, cost)


def _deliver(client: redis.Redis, job_id: str, document: dict[str, Any]) -> dict[str, Any]:
    """The result as is, or, when its JSON is larger than TILEREC_RESULT_INLINE_MAX_BYTES, a summary whose
    `result_ref` names the key holding the whole document: every status check of the job reads the result backend's
    value whole, so a large one there slows every client and monitor (measured: about 80 ms per MB)."""
    limit = app.conf.tilerec_result_inline_max_bytes
    if limit < 0:
        return document
    text = json.dumps(document)
    if len(text) <= limit:
        return document
    summary = {key: value for key, value in document.items() if key != "detections"}
    summary.update(
        result_ref=store.put_result(client, job_id, text, app.conf.result_expires),
        result_bytes=len(text),
        detections_count=len(document["detections"]),
    )
    return summary
