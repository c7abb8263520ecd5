"""Submitting jobs from Python: store bytes or arrays in Redis, submit, follow progress, get the result; many
images at a time with a bounded number of jobs in flight (`submit_many`); and the galleries of people that jobs
with `identify` match faces against (`gallery_add`, `gallery_list`, `gallery_rename`, `gallery_remove`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery.exceptions import TimeoutError
from celery.result import AsyncResult

from pipeline.model import Recognition
from pipeline.readers.images import encode_array
from pipeline.readers.remote import is_url
from pipeline.video.clips import VideoRecognition
from tasks import gallery, store
from tasks.celery import settings, store_client
from tasks.jobs import recognize
from tasks.planning import WAITING
from tasks.video import recognize_video

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)  # a Redis restarting, loading its data or failing over
LOST_AFTER_S = 10.0  # a planned job whose keys are gone this long, with no result, is lost
IN_FLIGHT_PER_PROCESS = 3  # jobs per worker process: one running, the next ones queued so no process waits
IN_FLIGHT_FALLBACK = 8  # when no worker answers the stats request (one starting, or a busy cluster)
OUTAGE_S = 60.0  # a Redis unreachable this long is gone, not restarting


class JobLost(RuntimeError):
    """The job's state vanished from Redis before it finished."""


def put_image(image: bytes | np.ndarray, ttl: int | None = None) -> str:
    """Store an image in Redis for jobs to read.

    Args:
        image: encoded image bytes (PNG, JPEG, TIFF, …) or a NumPy array.
        ttl: seconds the stored image lives (default: the tile TTL); several jobs may use it meanwhile.

    Returns:
        Its `redis:` reference, which `submit` and `tilerec.recognize` take in place of a path.
    """
    data = encode_array(image) if isinstance(image, np.ndarray) else bytes(image)
    return store.put_bytes(store_client(), data, ttl or settings().tile_ttl)


@dataclass
class Job:
    """A submitted recognition: its AsyncResult, plus progress read from the tile store while it runs.

    Examples:
        >>> from tasks.client import submit
        >>> job = submit("/data/big.tif", "qrcode", tile=1024)  # doctest: +SKIP
        >>> job.progress()  # doctest: +SKIP
        (12, 48)
        >>> recognition = job.get(timeout=600)  # doctest: +SKIP
        >>> recognition.to_json()["detections"][0]["text"]  # doctest: +SKIP
    """

    result: AsyncResult
    _done: int = field(default=0, init=False, repr=False)
    _total: int | None = field(default=None, init=False, repr=False)
    _gone_since: float | None = field(default=None, init=False, repr=False)
    waiting: str | None = field(default=None, init=False, repr=False)  # why it waits for room, as progress() saw

    @property
    def id(self) -> str:
        """The job's id: what `cancel`, `tilerec cancel` and the result backend know it by."""
        return self.result.id

    def progress(self) -> tuple[int, int | None]:
        """How far the job is, read from the tile store.

        Never goes backwards, though the merge deletes the job's counters just before the result lands. A job
        waiting for room in the tile store says so in `waiting`.

        Returns:
            (tiles done, tiles in all); the total is None until the tiling task has planned the grid.
        """
        meta = self.result.backend.get_task_meta(self.id)
        info = meta.get("result")
        self.waiting = info.get("waiting") if meta["status"] == WAITING and isinstance(info, dict) else None
        if meta["status"] == "SUCCESS":
            self._total = _units(info)
            self._done = self._total
            return self._done, self._total
        done, total = store.progress(store_client(), self.id)
        if total is None and self._total is not None:  # planned, and its keys are gone: ending, or lost
            self._gone_since = self._gone_since or time.monotonic()
        else:
            self._gone_since = None
        self._total = total or self._total
        self._done = max(self._done, min(done, self._total) if self._total else done)
        return self._done, self._total

    def crops(self) -> tuple[int, int] | None:
        """(crops done, crops in all) once the job's second stage has planned its crops; None before that, or for a
        job without one."""
        if self.result.successful():
            stage = self.result.info.get("second_stage")
            return None if stage is None else (stage["crops"], stage["crops"])
        return store.crop_progress(store_client(), self.id)

    @property
    def seen(self) -> tuple[int, int | None]:
        """The progress `progress()` last read, without asking Redis again."""
        return self._done, self._total

    def lost(self) -> bool:
        """Its keys have been gone from the store for LOST_AFTER_S with no result (see `progress`): a Redis that
        failed over and lost its latest writes, or restarted without persistence, or the job outlived its TTL."""
        return self._gone_since is not None and time.monotonic() - self._gone_since > LOST_AFTER_S

    def get(self, timeout: float | None = None, interval: float = 0.1) -> Recognition:
        """The job's recognition, fetched whole even when the result backend holds only its summary; a failed job
        raises its error (ImageError, TileFailure, …).

        It looks at the job's state every `interval` s rather than waiting on Celery's pub/sub, and a Redis that
        restarts or fails over meanwhile is a pause, not an error (Celery's own `get` gives up on a connection
        after about 20 retries of 1 s).

        Args:
            timeout: seconds to wait at most (None: for ever).
            interval: seconds between looks at the job's state.

        Returns:
            The whole recognition (`to_json()` gives its document).

        Raises:
            TimeoutError: the job did not finish within `timeout` (celery.exceptions.TimeoutError).
            JobLost: the job's state vanished from Redis before it finished.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = 0.0
        while True:
            try:
                if self.result.ready():
                    return self._read(self.result.get(timeout=1))
                if time.monotonic() - looked > 1.0:
                    looked = time.monotonic()
                    self.progress()
            except TRANSIENT:
                pass
            if self.lost():
                raise JobLost(
                    f"job {self.id} lost its state in Redis before it finished (a failover that lost the latest "
                    "writes, a restart without persistence, or older than TILEREC_TILE_TTL); submit it again"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
            time.sleep(interval)

    def cancel(self) -> None:
        """Stop the job (see `cancel`)."""
        cancel(self.id)

    def _read(self, result: dict[str, Any]) -> Any:
        return fetch_result(result)


class ClipJob(Job):
    """A submitted video job (`submit_video`): progress in frames; `get` gives its recognition (`per_frame`
    detections with their track ids, and `tracks`; `to_json()` gives the result document, docs/video.md)."""

    def get(self, timeout: float | None = None, interval: float = 0.1) -> VideoRecognition:  # type: ignore[override]
        return super().get(timeout, interval)

    def _read(self, result: dict[str, Any]) -> VideoRecognition:
        return VideoRecognition.from_json(fetch_document(result))


def _units(result: dict[str, Any]) -> int:
    """What a finished job's progress counted: a video's frames recognized (or failed), an image's tiles."""
    if "frames" in result:
        return int(result["frames"]["processed"]) + int(result["frames"]["failed"])
    return int(result["tiling"]["tiles"])


def fetch_document(result: dict[str, Any]) -> dict[str, Any]:
    """A finished job's whole result document (tilerec's JSON), as a viewer or a file wants it.

    Args:
        result: what the result backend holds for the job: the document itself, or, for a result too large for
            the backend (TILEREC_RESULT_INLINE_MAX_BYTES), a summary whose `result_ref` names its Redis key.

    Returns:
        The document, read from the tile store where the backend holds only its summary.
    """
    reference = result.get("result_ref") if isinstance(result, dict) else None
    if reference is None:
        return result
    return json.loads(store.get_result(store_client(), reference))


def fetch_result(result: dict[str, Any]) -> Recognition:
    """A finished job's recognition.

    Args:
        result: what the result backend holds for the job (`AsyncResult.result`, or Celery's `get()` of a
            `tilerec.recognize` called by name): the document, or its summary naming the stored document.

    Returns:
        The whole recognition (`Recognition.to_json()` gives the document back).

    Examples:
        >>> job = app.send_task("tilerec.recognize", args=["/data/big.tif", "faces"])  # doctest: +SKIP
        >>> fetch_result(job.get(timeout=600)).detections.labels  # doctest: +SKIP
    """
    return Recognition.from_json(fetch_document(result))


def cancel(job_id: str) -> None:
    """Stop a job: a tiling task not yet started refuses to start, batch tasks skip every tile they have not
    begun, and the merge removes the job's keys and fails the job with JobCancelled.

    A flag in the store rather than `revoke`: after `replace`, the merge task carries the job's id, so revoking
    the id would also revoke the merge that cleans up, and revoked ids live only in the workers' memory.

    Args:
        job_id: the job's id (`Job.id`, `Completed.job_id`, printed by `tilerec run`).
    """
    store.cancel(store_client(), job_id, settings().tile_ttl)


def submit(image: str | bytes | np.ndarray, recognizer: str = "faces", **options: Any) -> Job:
    """Submit one image to `tilerec.recognize`.

    Args:
        image: a path the workers can read (or a URL, or a `redis:` reference), sent as is; encoded bytes or an
            array, stored in Redis first (`put_image`).
        recognizer: the recognizer's name.
        **options: job options (tile, overlap, batch_size, …; docs/tasks.md) and the recognizer's parameters
            (`params={...}`, or as keywords).

    Returns:
        The job, to follow (`progress`), wait for (`get`) or `cancel`.
    """
    reference = image if isinstance(image, str) else put_image(image)
    return Job(recognize.delay(reference, recognizer, **options))


def submit_video(video: str | os.PathLike | bytes, recognizer: str = "faces", upload: bool = False,
                 **options: Any) -> ClipJob:  # fmt: skip
    """Submit `tilerec.recognize_video`: its progress counts frames, its result has `per_frame` and `tracks`.

    Args:
        video: a video file or a folder of frames the workers see (sent as a path), an object-storage URL, a
            `redis:` reference, or a clip's bytes (stored first).
        recognizer: the recognizer's name.
        upload: store a local file's bytes in Redis instead of sending its path, for workers that do not see this
            machine's files (the reference lives the tile TTL).
        options: video options (step, fps, start, end, tiled, segment_frames, frame_rate) and image job options
            (tile, overlap, roi, …, recognizer parameters).
    """
    if isinstance(video, bytes) or (upload and not is_url(os.fspath(video))):
        data = video if isinstance(video, bytes) else Path(video).read_bytes()
        reference = store.put_bytes(store_client(), data, settings().tile_ttl)
    else:
        reference = os.fspath(video)
    return ClipJob(recognize_video.delay(reference, recognizer, **options))


Image = str | os.PathLike | bytes | np.ndarray
_END = object()  # the end of `images` (None could be an item)


@dataclass(frozen=True)
class Completed:
    """One image's finished job, as `submit_many` yields it.

    Attributes:
        image: the image as it was given (path, bytes or array).
        job_id: the job's id (what `cancel` and `tilerec cancel` take); None for an image refused before any job.
        result: the recognition, or None when the job failed.
        error: the job's error (ImageError, TileFailure, JobLost, …), or None when it succeeded.
        seconds: wall time from submission to completion.
    """

    image: Any
    job_id: str | None = None
    result: Recognition | None = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class InFlight:
    """A job `submit_many` has submitted and not yet yielded: its image, Job, upload reference and start time."""

    image: Any
    job: Job
    upload: str | None
    started: float = field(default_factory=time.monotonic)


def default_in_flight(timeout: float = 1.0) -> int:
    """IN_FLIGHT_PER_PROCESS jobs per worker process, the processes counted from the workers' stats (asked once,
    answered within `timeout` s); IN_FLIGHT_FALLBACK when no worker answers."""
    from tasks.celery import app

    with contextlib.suppress(Exception):  # an unreachable broker is reported by the submission itself
        stats = app.control.inspect(timeout=timeout).stats() or {}
        processes = sum(int(info.get("pool", {}).get("max-concurrency", 1)) for info in stats.values())
        if processes:
            return IN_FLIGHT_PER_PROCESS * processes
    return IN_FLIGHT_FALLBACK


def _start(image: Image, recognizer: str, upload: bool, options: dict[str, Any]) -> InFlight:
    """Submit one image: a path as is (or its bytes, stored first, when `upload`), a URL as is (the workers read it),
    bytes and arrays stored first;
    the stored reference is kept so it can be deleted when the job ends."""
    if isinstance(image, (bytes, np.ndarray)) or (upload and not is_url(os.fspath(image))):
        data = Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else image
        reference = put_image(data)
        return InFlight(image, submit(reference, recognizer, **options), reference)
    return InFlight(image, submit(os.fspath(image), recognizer, **options), None)


def _finish(run: InFlight) -> Completed | None:
    """The job's outcome when it has one (a result, its error, or JobLost), else None; a finished job's result is
    forgotten by the backend and its upload deleted, so a long run leaves nothing behind."""
    result: Recognition | None = None
    error: BaseException | None = None
    state = run.job.result
    if state.ready():  # its outcome read from the backend's key: `get` would subscribe to the job's channel
        if state.successful():
            result = fetch_result(state.result)
        else:
            failure = state.result
            error = (
                failure if isinstance(failure, BaseException) else RuntimeError(f"job ended {state.state}: {failure}")
            )
    else:
        run.job.progress()
        if not run.job.lost():
            return None
        error = JobLost(f"job {run.job.id} lost its state in Redis before it finished; submit it again")
    with contextlib.suppress(Exception):
        run.job.result.forget()
    _delete_upload(run)
    return Completed(run.image, run.job.id, result, error, time.monotonic() - run.started)


def _delete_upload(run: InFlight) -> None:
    if run.upload is not None:
        with contextlib.suppress(Exception):
            store.delete_ref(store_client(), run.upload)


def submit_many(
    images: Iterable[Image],
    recognizer: str = "faces",
    *,
    max_in_flight: int | None = None,
    upload: bool = False,
    interval: float = 0.1,
    on_poll: Callable[[Sequence[InFlight]], None] | None = None,
    **options: Any,
) -> Iterator[Completed]:
    """Recognize many images with at most `max_in_flight` jobs submitted at a time; yields a `Completed` per
    image as each job finishes (in completion order), a failed job included with its error.

    Args:
        images: paths (sent as is: the workers read them), encoded bytes or arrays (stored in Redis first); read
            lazily, so a generator over a folder of 100,000 files is fine.
        recognizer: the recognizer's name.
        max_in_flight: jobs submitted and not yet finished at any time (default: `default_in_flight()`, a few per
            worker process).
        upload: store each path's bytes in Redis instead of sending the path, for workers that do not see this
            machine's files; the stored bytes are deleted when the job ends.
        interval: seconds between looks at the jobs in flight.
        on_poll: called with the jobs in flight after each look (progress display, health checks); what it
            raises ends the run like an interrupt.
        options: job options (tile, overlap, …, params) for every image.

    Yields:
        Completed: the image, the job id, and the recognition or the error.

    Closing the generator (`close()`, leaving a `for` loop early, Ctrl-C, or an error in `on_poll`) cancels the
    jobs in flight (`cancel`) and deletes their uploads; images not yet submitted never are.
    """
    limit = max_in_flight if max_in_flight is not None else default_in_flight()
    if limit < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {limit}")
    pending = iter(images)
    running: list[InFlight] = []
    exhausted = False
    unreachable_since: float | None = None
    try:
        while True:
            while not exhausted and len(running) < limit:
                image = next(pending, _END)
                if image is _END:
                    exhausted = True
                else:
                    running.append(_start(image, recognizer, upload, options))
            if not running:
                return
            try:
                finished = [(run, done) for run in running if (done := _finish(run)) is not None]
                unreachable_since = None
            except TRANSIENT:  # a Redis restarting or failing over is a pause, up to OUTAGE_S
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > OUTAGE_S:
                    raise
                finished = []
            running = [run for run in running if all(run is not ended for ended, _ in finished)]
            for _, done in finished:
                yield done
            if on_poll is not None:
                on_poll(running)
            if not finished:
                time.sleep(interval)
    finally:
        for run in running:
            with contextlib.suppress(Exception):
                run.job.cancel()
            _delete_upload(run)


def gallery_add(
    name: str,
    photos: Sequence[Image],
    gallery_name: str = gallery.DEFAULT,
    *,
    box: Sequence[int] | None = None,
    upload: bool = False,
    timeout: float | None = None,
    embedder: str = "dlib",
    face_model: str = "",
) -> dict[str, Any]:
    """Enroll a person from photos: a worker detects each photo's face (the one in `box`, else its only or clearly
    largest one) and embeds it into the gallery; this process needs no face model.

    Args:
        name: the person's name.
        photos: paths (sent as is: the workers read them), encoded bytes or arrays (stored in Redis first).
        gallery_name: the gallery (created by its first person).
        box: [x, y, width, height] of the face to enroll, in every photo.
        upload: store each path's bytes in Redis instead of sending the path (workers that do not see this
            machine's files); the stored bytes are deleted afterwards.
        timeout: seconds to wait for the worker.
        embedder, face_model: the embedder (`dlib`, or `sface` with its ONNX file under the workers' model folders).

    Returns:
        The gallery, the name, the photos' face boxes and the person's number of embeddings (never the embeddings).

    Raises:
        tasks.gallery.GalleryError: a photo without a usable face (one line naming the photo and why), a bad name.
    """
    references: list[str] = []
    uploads: list[str] = []
    try:
        for photo in photos:
            if isinstance(photo, (bytes, np.ndarray)) or (upload and not is_url(os.fspath(photo))):
                data = Path(photo).read_bytes() if isinstance(photo, (str, os.PathLike)) else photo
                uploads.append(put_image(data))
                references.append(uploads[-1])
            else:
                references.append(os.fspath(photo))
        chosen = list(box) if box is not None else None
        sent = gallery.gallery_add.delay(name, references, gallery_name, chosen, embedder, face_model)
        return sent.get(timeout=timeout)
    finally:
        for reference in uploads:
            with contextlib.suppress(Exception):
                store.delete_ref(store_client(), reference)


def gallery_list(gallery_name: str = gallery.DEFAULT) -> dict[str, Any]:
    """The gallery's model and people (each with their number of embeddings and the photos they came from)."""
    return gallery.list_people(store_client(), gallery_name)


def gallery_rename(old: str, new: str, gallery_name: str = gallery.DEFAULT) -> None:
    """Give a person another name; their embeddings stay."""
    gallery.rename(store_client(), gallery_name, old, new)


def gallery_remove(name: str, gallery_name: str = gallery.DEFAULT) -> int:
    """Delete a person and every embedding of theirs from the store; returns how many embeddings went."""
    return gallery.remove(store_client(), gallery_name, name)
