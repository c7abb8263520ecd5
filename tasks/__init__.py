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
from pipeline.recognizers import limit_threads
from pipeline.tiling import Window
from tasks import store

app = Celery("tilerec")
app.config_from_object("celeryconfig")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


class TileFailure(RuntimeError):
    """One or more tiles of a job could not be recognized."""


_worker: Any = None


@signals.worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    global _worker
    _worker = sender


@signals.worker_process_init.connect
def _size_thread_pools(**_: Any) -> None:
    """processes × threads = cores: OpenCV would otherwise give every worker process all the cores."""
    processes = int(getattr(_worker, "concurrency", None) or 1)
    limit_threads(app.conf.tilerec_threads_per_process or max(1, (os.cpu_count() or 1) // processes))


def _tile_store() -> redis.Redis:
    return store.connect(app.conf.tilerec_store_url)


def _load(image: Any) -> bytes:
    if not isinstance(image, str) or not image:
        raise images.ImageError(f"image must be a file path or a redis: reference (a string), got {image!r}")
    if image.startswith(store.REF_SCHEME):
        return store.get_bytes(_tile_store(), image)
    return images.read_file(image, images.allowed_roots_from_env(app.conf.tilerec_allowed_roots))


@app.task(name="tilerec.recognize", bind=True)
def recognize(self: Any, image: str, recognizer: str = "faces", **options: Any) -> Any:
    started = time.time()
    parsed = parse_options(recognizer, options)
    data = _load(image)
    loaded = time.time()
    pixels = images.decode(data, app.conf.tilerec_max_pixels)
    del data
    decoded = time.time()
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    planned = plan(height, width, parsed)
    windows = [window for batch in planned for window in batch]
    client = _tile_store()
    try:
        store.set_total(client, self.request.id, len(windows), app.conf.tilerec_tile_ttl)
        store.put_tiles(client, self.request.id, pixels, windows, app.conf.tilerec_tile_ttl)
    except BaseException:
        store.delete_job(client, self.request.id, len(windows))
        raise
    del pixels
    job = {
        "id": self.request.id,
        "source": image,
        "width": width,
        "height": height,
        "channels": channels,
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
    header = [recognize_tiles.s(job, [window.to_list() for window in batch]) for batch in planned]
    return self.replace(chord(header, merge.s(job)))


@app.task(
    name="tilerec.recognize_tiles",
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    max_retries=3,
)
def recognize_tiles(self: Any, job: dict[str, Any], tiles: list[list[int]]) -> list[dict[str, Any]]:
    """One record per tile: its detections in image coordinates, or the error that stopped it.

    A tile's own failure is reported, not raised, so one bad tile does not silently cancel the chord and the
    merge can say which region failed. Broker and store outages are raised and retried.
    """
    options = JobOptions.from_json(job["options"])
    client = _tile_store()
    records = []
    for values in tiles:
        window = Window.from_list(values)
        began = time.perf_counter()
        try:
            pixels = store.get_tile(client, job["id"], window, job["channels"])
            found = recognize_tile(pixels, window, options, job["width"], job["height"])
        except TRANSIENT:
            raise
        except Exception as error:
            records.append({"tile": window.index, "window": values[1:], "error": f"{type(error).__name__}: {error}"})
            continue
        records.append({"tile": window.index, "seconds": time.perf_counter() - began, **found.to_columns()})
    done = store.add_progress(client, job["id"], len(tiles), app.conf.tilerec_tile_ttl)
    # Flower shows task state only from events: one small event per task, not per tile
    self.send_event("task-progress", job=job["id"], done=min(done, job["tiles"]), total=job["tiles"])
    return records


@app.task(name="tilerec.merge", bind=True)
def merge(self: Any, results: list[list[dict[str, Any]]], job: dict[str, Any]) -> dict[str, Any]:
    began = time.time()
    by_tile: dict[int, dict[str, Any]] = {}
    for record in (record for batch in results for record in batch):
        by_tile.setdefault(record["tile"], record)  # a redelivered tile counts once
    client = _tile_store()
    store.delete_job(client, job["id"], job["tiles"])
    failed = [
        {"tile": record["tile"], "window": record["window"], "error": record["error"]}
        for record in by_tile.values()
        if "error" in record
    ]
    missing = sorted(set(range(job["tiles"])) - set(by_tile))
    if failed or missing:
        described = "; ".join(f"tile {f['tile']} at {f['window']}: {f['error']}" for f in failed[:5])
        if missing:
            described += f"{'; ' if described else ''}no result for tiles {missing[:10]}"
        raise TileFailure(f"{len(failed) + len(missing)} of {job['tiles']} tiles failed: {described}")
    options = JobOptions.from_json(job["options"])
    per_tile = [Detections.from_columns(by_tile[index]) for index in sorted(by_tile)]
    merged = merge_tiles(per_tile, options)
    finished = time.time()
    timings = dict(job["timings"])
    started = timings.pop("started")
    timings.update(
        recognize_s=sum(record["seconds"] for record in by_tile.values()),
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
        timings=timings,
    ).to_json()
