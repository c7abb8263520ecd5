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

import contextlib
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from celery import chord, group, states
from celery.exceptions import Ignore

from pipeline.inference import (
    TileOutcome,
    assemble,
    grey_tiles,
    measured_tile_cost,
    region,
    run_stage,
    stage_of,
    stage_reader,
)
from pipeline.model import Recognition
from pipeline.options import JobOptions, parse_options
from pipeline.readers import images, sources
from pipeline.readers.sources import Source
from pipeline.recognizers.stages import CropOutcome, SecondStage, finish_stage, plan_crops
from pipeline.tiling import Window
from tasks import resources, store
from tasks.access import resolve
from tasks.batches import (
    DIED,
    MAX_ATTEMPTS,
    TRANSIENT,
    StoredTiles,
    read_shared,
    report_progress,
    run_crops,
    run_tiles,
    wait_for_rows,
)
from tasks.celery import app, settings, store_client
from tasks.job_record import JobCancelled, JobRecord, Staged, described, planned_stage
from tasks.planning import admit, crop_batches, crops_of, decode_streamed, plan_job, store_job, while_planning
from tasks.stalls import ChordTask

BULKY = ("detections", "per_frame", "tracks")  # what a result's summary leaves out (an image's, a video's)


def batch_priority(number: int) -> int:
    """A job's n-th batch goes at level 1 + log2(n + 1), at most 9 (0 is taken first)."""
    return min(9, 1 + number.bit_length())


@app.task(name="tilerec.recognize", bind=True, base=ChordTask)
def recognize(self: Any, image: str, recognizer: str = "faces", **options: Any) -> Any:
    client, job_id, started = store_client(), self.request.id, time.time()
    redelivered = bool(self.request.delivery_info.get("redelivered"))
    attempts = 1 + (store.count_attempt(client, job_id, "tiling", settings().tile_ttl) if redelivered else 0)
    with contextlib.suppress(LookupError):
        if redelivered and (earlier := JobRecord.from_json(store.get_job(client, job_id))).streamed:
            decode_streamed(client, earlier, attempts)  # its process died decoding: the chord runs already
            raise Ignore("the job's chord was published by an earlier delivery; its merge gives the job's result")
    with while_planning(self, client):
        if attempts > MAX_ATTEMPTS:
            raise images.ImageError(f"gave up on {image!r}: {DIED} times it read it")
        if store.is_cancelled(client, job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        if (needed := store.waiting_need(client, job_id)) is not None:
            admit(client, job_id, needed)  # before its image is read again
        target = resolve(image)
        parsed, loaded = parse_options(recognizer, options), time.time()
        source = sources.open_source(target, parsed.level, settings().max_pixels, parsed.roi, parsed.read_spec(),
                                     in_row_order=True, grey=grey_tiles(parsed))  # fmt: skip
        with contextlib.ExitStack() as held:
            held.callback(source.close)
            decoded = time.time()
            planned = plan_job(client, job_id, image, target, source, parsed, (started, loaded, decoded))
            job, spans = planned.record, planned.spans
            if len(spans) == 1:  # one batch: recognized right here, a chord would only add its round trips
                return _recognize_here(client, job, source, redelivered)
            store_job(client, job, source, decoded)
            if job.streamed:
                held.pop_all()  # its source stays open: it is decoded once the chord is published
    header = group(
        recognize_tiles.si(job_id, first, stop).set(priority=batch_priority(number))
        for number, (first, stop) in enumerate(spans)
    )
    try:
        return self.replace(chord(header, merge.si(image, recognizer, **options)))
    except Ignore:  # the chord is published: its batch tasks recognize each row of a streamed image once stored
        if job.streamed:
            decode_streamed(client, job, attempts, source)
        raise
    except BaseException:
        if job.streamed:
            source.close()
        raise


def _recognize_here(client: redis.Redis, job: JobRecord, source: Source, redelivered: bool) -> dict[str, Any]:
    """A job of one batch, recognized in its tiling task from its open `source`, its second stage too."""
    outcomes = run_tiles(client, job, job.windows, source.read, redelivered)
    return _finish(client, job, outcomes, source.read)  # type: ignore[return-value]


@app.task(
    name="tilerec.recognize_tiles", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5,
    track_started=False,
)  # fmt: skip
def recognize_tiles(self: Any, job_id: str, first: int, stop: int) -> dict[str, Any]:
    """Recognize the job's tiles [first, stop) and store their records; returns a summary for monitors.

    A tile's own failure is recorded, not raised (the merge still runs, to clean up and say which region failed);
    store outages are raised and retried with backoff; a redelivered batch counts its tiles' crashes."""
    client = store_client()
    job = described(JobRecord.from_json, job_id)
    if job.streamed:
        wait_for_rows(self, client, job, stop)
    windows = job.windows[first:stop]
    read = StoredTiles(client, job, windows) if job.file is None else partial(read_shared, job.file)
    try:
        outcomes = run_tiles(client, job, windows, read, bool(self.request.delivery_info.get("redelivered")))
    finally:
        if isinstance(read, StoredTiles):
            read.close()
    records = {o.index: json.dumps(o.to_json()) for o in outcomes}
    try:
        done = store.put_records(client, job_id, records, settings().tile_ttl) if records else None
    except redis.OutOfMemoryError:  # the merge fails the job with StoreFull
        store.fail_job(client, job_id, job.tiles, store.FILLED, settings().tile_ttl)
        done = None
    if done is not None:
        report_progress(self, job.id, done, len(records), job.tiles)
    return {
        "tiles": stop - first,
        "skipped": sum(o.detections is None and o.error is None for o in outcomes),
        "failed": sum(o.error is not None for o in outcomes),
        "detections": sum(len(o.detections) for o in outcomes if o.detections is not None),
        "seconds": round(sum(o.seconds for o in outcomes), 3),
    }


@app.task(name="tilerec.merge", bind=True, base=ChordTask)
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


def _job_of(task: Any, client: redis.Redis) -> JobRecord:
    """The job a merge or finish (`task`, under the job's id) ends. A redelivery of one whose process died after
    the job's outcome was stored (or a duplicate) finds the job's keys gone: it is ignored, so it cannot overwrite
    that outcome with a failure of its own."""
    try:
        return JobRecord.from_json(store.get_job(client, task.request.id))
    except LookupError:
        if task.AsyncResult(task.request.id).state in states.READY_STATES:
            raise Ignore(f"job {task.request.id} has ended: its outcome is stored") from None
        raise


def _finish(
    client: redis.Redis, job: JobRecord, outcomes: list[TileOutcome], read: Callable[[Window], Any] | None = None
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
                    staged = Staged(recognition, crops, crop_batches(client, job.options, stage, len(crops.crops)))
                    store.put_stage(client, job.id, staged.to_json(), len(crops.crops), job.tiles, settings().tile_ttl)
                    handed_on = True
                    return staged
                recognition = finish_stage(recognition, stage, crops, [], _resources(client, stage, job.options),
                                           started=job.started)  # fmt: skip
        return deliver(client, job.id, recognition.to_json())
    finally:
        if not handed_on:
            store.delete_job(client, job.id, job.tiles)


def _merged(client: redis.Redis, job: JobRecord, outcomes: list[TileOutcome]) -> Recognition:
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
        job, staged = described(JobRecord.from_json, job_id), planned_stage(job_id)
    except LookupError:
        return {"crops": stop - first, "failed": 0, "seconds": 0.0, "ended": True}
    careful = bool(self.request.delivery_info.get("redelivered"))
    outcomes = run_crops(client, job, staged.recognition.detections, staged.plan.crops[first:stop], careful)
    records = {o.index: json.dumps(o.to_json()) for o in outcomes}
    done = store.put_records(client, job_id, records, settings().tile_ttl, "crop_records") if records else None
    if done is not None:
        report_progress(self, job.id, done, len(records), len(staged.plan.crops), "crops")
    return {
        "crops": stop - first,
        "failed": sum(o.error is not None for o in outcomes),
        "seconds": round(sum(o.seconds for o in outcomes), 3),
    }


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
            store.record_tile_cost(client, crops_of(job.options), job.options.params, cost)
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
