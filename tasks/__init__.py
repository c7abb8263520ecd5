"""tilerec's Celery app and its three tasks. Thin: they move references and results and call `pipeline`.

tilerec.recognize(image, recognizer, **options)  tiles the image into the store, then becomes chord(tiles, merge)
tilerec.recognize_tiles(job, tiles)              recognizes a batch of stored tiles
tilerec.merge(results, job)                      merges the tile results into the job's Recognition
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, chord, signals

from pipeline import images
from pipeline.inference import merge_tiles, plan, recognize_tile
from pipeline.model import Detections, Recognition
from pipeline.options import JobOptions, parse_options
from pipeline.recognizers import limit_threads, restrict_file_params
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


def _load(image: Any) -> bytes:
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path or a redis: reference (a string), got {image!r}")
    if image.startswith(store.REF_SCHEME):
        return store.get_bytes(_tile_store(), image)
    if "://" in image:
        raise images.ImageError(
            f"{image!r}: images are not fetched from URLs (workers would fetch for anyone who can publish); "
            "store the bytes with tasks.client.put_image and pass its redis: reference"
        )
    return images.read_file(image, images.allowed_roots_from_env(app.conf.tilerec_allowed_roots))


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
    data = _load(image)
    loaded = time.time()
    pixels = images.decode(data, app.conf.tilerec_max_pixels)
    del data
    decoded = time.time()
    height, width = pixels.shape[:2]
    planned = plan(height, width, parsed)
    windows = [window for batch in planned for window in batch]
    store.put_tiles(client, job_id, pixels, windows, app.conf.tilerec_tile_ttl)
    if store.is_cancelled(client, job_id):
        raise JobCancelled(f"job {job_id} was cancelled")
    job = {
        "id": job_id,
        "source": image,
        "width": width,
        "height": height,
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
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
            pixels = store.get_tile(client, job_id, window, job["channels"])
            found = recognize_tile(pixels, window, options, job["width"], job["height"])
        except TRANSIENT:
            raise
        except Exception as error:  # reported per tile, see the docstring
            records.append(_failed(window, f"{type(error).__name__}: {error}"))
            continue
        if careful:
            store.clear_tile_attempts(client, job_id, window.index)
        records.append({"tile": window.index, "seconds": time.perf_counter() - began, **found.to_columns()})
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
    per_tile = [Detections.from_columns(by_tile[index]) for index in sorted(by_tile) if "error" not in by_tile[index]]
    merged = merge_tiles(per_tile, options)
    finished = time.time()
    timings = dict(job["timings"])
    started = timings.pop("started")
    timings.update(
        recognize_s=sum(record.get("seconds", 0.0) for record in by_tile.values()),
        merge_s=finished - began,
        total_s=finished - started,
    )
    return Recognition(
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
    ).to_json()
