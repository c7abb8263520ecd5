"""tilerec's Celery app and its three tasks. Thin: they move references and results and call `pipeline`.

tilerec.recognize(image, recognizer, **options)  plans the tiles (storing their pixels, unless the workers read a
                                                 shared TIFF themselves), then becomes chord(tiles, merge)
tilerec.recognize_tiles(job, tiles)              recognizes a batch of tiles: stored ones, or windows of the file
tilerec.merge(results, job)                      merges the tile results into the job's Recognition
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, chord, signals

from pipeline import images, sources
from pipeline.inference import blank, check_size, merge_tiles, plan, recognize_tile
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, parse_options
from pipeline.recognizers import limit_threads, restrict_file_params
from pipeline.sources import FileRef, Source
from pipeline.tiling import Window
from tasks import store

app = Celery("tilerec")
app.config_from_object("celeryconfig")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
MAX_ATTEMPTS = 3  # a tile (or an image) whose worker process dies this many times fails instead of coming back
CANCEL_CHECK_S = 0.05  # how often a running batch looks for a cancellation


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


def _tile_store() -> redis.Redis:
    return store.connect(app.conf.tilerec_store_url)


def _roots() -> list:
    return images.allowed_roots_from_env(app.conf.tilerec_allowed_roots)


def _open(image: Any, options: JobOptions) -> tuple[Source, FileRef | None, float]:
    """The job's image source; the file tile tasks read their own windows from (None: tiles go through the
    store); and when loading ended (the rest of opening is decoding, or reading a TIFF's header)."""
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path or a redis: reference (a string), got {image!r}")
    max_pixels = app.conf.tilerec_max_pixels
    if image.startswith(store.REF_SCHEME):
        data = store.get_bytes(_tile_store(), image)
        return sources.open_source(data, options.level, max_pixels, options.roi), None, time.time()
    if "://" in image:
        raise images.ImageError(
            f"{image!r}: images are not fetched from URLs (workers would fetch for anyone who can publish); "
            "store the bytes with tasks.client.put_image and pass its redis: reference"
        )
    real = images.confine(image, _roots())
    if not sources.is_tiff_file(real):
        data = images.read_file(image, _roots())
        return sources.open_source(data, options.level, max_pixels, options.roi), None, time.time()
    loaded = time.time()
    source = sources.open_source(real, options.level, max_pixels, options.roi)
    shared = source.windowed and app.conf.tilerec_shared_storage
    return source, FileRef.of(real, options.level) if shared else None, loaded


@app.task(name="tilerec.recognize", bind=True)
def recognize(self: Any, image: str, recognizer: str = "faces", **options: Any) -> Any:
    client = _tile_store()
    try:
        job, planned = _tile_into_store(client, self.request.id, image, recognizer, options)
    except BaseException:
        store.delete_job(client, self.request.id)  # a job refused or failed while tiling leaves nothing behind
        raise
    header = [recognize_tiles.s(job, [window.to_list() for window in batch]) for batch in planned]
    return self.replace(chord(header, merge.s(job)))


def _tile_into_store(
    client: redis.Redis, job_id: str, image: Any, recognizer: Any, options: dict[str, Any]
) -> tuple[dict[str, Any], list[list[Window]]]:
    """Check, load, decode and plan the job and store its tiles; returns the job description and the batches."""
    started = time.time()
    deliveries, cancelled = store.count_delivery(client, job_id, "tiling", app.conf.tilerec_tile_ttl)
    if cancelled:
        raise JobCancelled(f"job {job_id} was cancelled")
    if deliveries > MAX_ATTEMPTS:
        raise images.ImageError(f"gave up on {image!r}: the worker process died all {MAX_ATTEMPTS} times it read it")
    parsed = parse_options(recognizer, options)
    source, file, loaded = _open(image, parsed)
    try:
        decoded = time.time()
        height, width = source.height, source.width
        check_size(height, width, parsed, app.conf.tilerec_max_pixels)
        planned = plan(height, width, parsed)
        windows = [window for batch in planned for window in batch]
        if file is None:  # no shared file: the tiles travel through the store, read (or cut) one by one
            skip = (lambda tile: blank(tile, parsed)) if parsed.skip_blank is not None else None
            store.put_tiles(client, job_id, source.read, windows, app.conf.tilerec_tile_ttl, blank=skip)
    finally:
        source.close()
    if store.is_cancelled(client, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")
    job = {
        "id": job_id,
        "source": image,
        "width": width,
        "height": height,
        "channels": source.channels,
        "level": source.level,
        "downsample": source.downsample,
        "file": file.to_json() if file is not None else None,
        "options": parsed.to_json(),
        "tiles": len(windows),
        "tasks": len(planned),
        "timings": {
            "started": started,
            "load_s": loaded - started,
            "decode_s": decoded - loaded,
            "store_s": time.time() - decoded,
        },
    }
    return job, planned


_open_files = sources.SourceCache()  # per worker process: tile tasks of a job share one open TIFF


def _tile_pixels(client: redis.Redis, job: dict[str, Any], window: Window) -> Any:
    """The tile's pixels from the shared file (its own window, decoded here) or from the store; None: blank."""
    if job.get("file") is None:
        return store.get_tile(client, job["id"], window, job["channels"])
    file = FileRef.from_json(job["file"])
    images.confine(file.path, _roots())  # a tile task reads only what a tiling task on this worker could read
    sources.check_region(window.width, window.height, app.conf.tilerec_max_pixels)
    return _open_files.get(file).read(window)


def _recognize_window(client: redis.Redis, job: dict[str, Any], window: Window, options: JobOptions) -> dict[str, Any]:
    """The tile's detections as columns, or {"skipped": True} for a blank tile (skip_blank)."""
    pixels = _tile_pixels(client, job, window)
    if pixels is None or blank(pixels, options):
        return {"skipped": True}
    return recognize_tile(pixels, window, options, job["width"], job["height"]).to_columns()


def _failed(window: Window, error: str) -> dict[str, Any]:
    return {"tile": window.index, "window": [window.x, window.y, window.width, window.height], "error": error}


@app.task(name="tilerec.recognize_tiles", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=3)
def recognize_tiles(self: Any, job: dict[str, Any], tiles: list[list[int]]) -> list[dict[str, Any]]:
    """One record per tile: its detections in image coordinates, or the error that stopped it.

    A tile's own failure is reported, not raised: a failed chord part would cancel the merge, which must run
    to clean up and to say which region failed. Store outages are raised and retried with backoff.
    A redelivered task (its worker process died) counts attempts per tile, so a tile that kills its worker
    every time ends as a failed tile instead of an endless redelivery.
    """
    job_id = job["id"]
    options = JobOptions.from_json(job["options"])
    client = _tile_store()
    deliveries, cancelled = store.count_delivery(client, job_id, self.request.id, app.conf.tilerec_tile_ttl)
    last_check = time.monotonic()
    records = []
    for values in tiles:
        window = Window.from_list(values)
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
            outcome = _recognize_window(client, job, window, options)
        except TRANSIENT:
            raise
        except Exception as error:  # reported per tile, see the docstring
            records.append(_failed(window, f"{type(error).__name__}: {error}"))
            continue
        if careful:
            store.clear_tile_attempts(client, job_id, window.index)
        records.append({"tile": window.index, "seconds": time.perf_counter() - began, **outcome})
    done = store.add_progress(client, job_id, len(tiles), app.conf.tilerec_tile_ttl)
    progress = {"done": min(done, job["tiles"]), "total": job["tiles"]}
    # once per task, not per tile: an event for Flower (it sees states only from events), and the job's own
    # state in the result backend, so any app can follow the job from its AsyncResult (state PROGRESS)
    self.send_event("task-progress", job=job_id, **progress)
    self.backend.store_result(job_id, progress, "PROGRESS")
    return records


@app.task(name="tilerec.merge", bind=True)
def merge(self: Any, results: list[list[dict[str, Any]]], job: dict[str, Any]) -> dict[str, Any]:
    began = time.time()
    # result_extended stores a task's arguments beside its result, and these are every tile's detections:
    # 2.3 times the result's size for nothing (measured). The result backend keeps a summary instead.
    self.request.args = [f"<{sum(len(batch) for batch in results)} tile records>", job]
    by_tile: dict[int, dict[str, Any]] = {}
    for record in (record for batch in results for record in batch):
        by_tile.setdefault(record["tile"], record)  # a redelivered tile counts once
    client = _tile_store()
    cancelled = store.is_cancelled(client, job["id"])
    store.delete_job(client, job["id"], job["tiles"])
    failed = sorted((record for record in by_tile.values() if "error" in record), key=lambda r: r["tile"])
    if cancelled:
        done = len(by_tile) - len(failed)
        raise JobCancelled(f"job {job['id']} was cancelled ({done} of {job['tiles']} tiles had been recognized)")
    options = JobOptions.from_json(job["options"])
    missing = sorted(set(range(job["tiles"])) - set(by_tile))
    if (failed or missing) and options.on_tile_error == "fail":
        described = "; ".join(f"tile {f['tile']} at {f['window']}: {f['error']}" for f in failed[:5])
        if missing:
            described += f"{'; ' if described else ''}no result for tiles {missing[:10]}"
        raise TileFailure(f"{len(failed) + len(missing)} of {job['tiles']} tiles failed: {described}")
    recognized = [by_tile[index] for index in sorted(by_tile) if "xyxy" in by_tile[index]]
    merged = merge_tiles((Detections.from_columns(record) for record in recognized), options)
    skipped = sum(1 for record in by_tile.values() if record.get("skipped"))
    finished = time.time()
    timings = dict(job["timings"])
    started = timings.pop("started")
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
        tasks=job["tasks"],
        failed_tiles=[{"tile": f["tile"], "window": f["window"], "error": f["error"]} for f in failed]
        + [{"tile": index, "window": None, "error": "no result"} for index in missing],
        timings=timings,
        level=job.get("level", 0),
        downsample=job.get("downsample", 1.0),
        roi=options.roi,
        skipped=skipped if options.skip_blank is not None else None,
    ).to_json()
    return _deliver(client, job["id"], document)


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
