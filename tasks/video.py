"""A video job's three kinds of task, on Celery's own canvas like an image job's (tasks/jobs.py):

tilerec.recognize_video(video, recognizer, **options)   resolves and probes the clip, plans its segments and
                                                        stores the job's description, then becomes
                                                        chord(segment tasks, merge_video); a clip of one segment
                                                        is recognized right there
tilerec.recognize_segment(job_id, first, stop)          decodes the segment's frames (seeking to the keyframe before
                                                        `first`), recognizes them, stores its record
tilerec.merge_video(video, recognizer, **options)       runs under the job's id with the job's own arguments, and
                                                        tracks the segments' detections through the clip into the
                                                        result
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from celery import chord, group, signals

from pipeline.options import VideoOptions, parse_video_options
from pipeline.recognizers import thread_budget
from pipeline.video.clips import SegmentOutcome, VideoPlan, assemble_video, plan_video, run_segment
from pipeline.video.frames import Target, VideoError, probe
from pipeline.video.tracking import preload
from tasks import store
from tasks.access import resolve
from tasks.batches import DIED, MAX_ATTEMPTS, PROGRESS_EVERY_S, TRANSIENT, CancelWatch, attempt, publish_progress
from tasks.celery import app, settings, store_client
from tasks.job_record import JobCancelled, described
from tasks.jobs import batch_priority, deliver
from tasks.planning import admit, while_planning
from tasks.stalls import ChordTask


@dataclass(frozen=True)
class VideoJob:
    """A video job as its first task planned it: what its segment tasks and merge read from the store."""

    id: str
    video: str  # as the caller gave it
    options: VideoOptions
    plan: VideoPlan
    started: float  # time.time() when the job's first task began
    timings: dict[str, float] = field(default_factory=dict)  # its probe

    @property
    def frames(self) -> int:
        """The frames the job recognizes (its progress counts them)."""
        return len(self.plan.selected)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "options": self.options.to_json(), "plan": self.plan.to_json()})

    @classmethod
    def from_json(cls, text: str) -> VideoJob:
        data = json.loads(text)
        return cls(**{**data, "options": VideoOptions.from_json(data["options"]),
                      "plan": VideoPlan.from_json(data["plan"])})  # fmt: skip


@signals.celeryd_after_setup.connect
def _preload_tracker(**_: Any) -> None:
    """The tracker's library imported in the worker's main process before its pool forks: every process inherits
    it, and a merge, the job's one serial part, does not import it first."""
    preload()


@app.task(name="tilerec.recognize_video", bind=True, base=ChordTask)
def recognize_video(self: Any, video: str, recognizer: str = "faces", **options: Any) -> Any:
    client, job_id, started = store_client(), self.request.id, time.time()
    redelivered = bool(self.request.delivery_info.get("redelivered"))
    attempts = 1 + (store.count_attempt(client, job_id, "tiling", settings().tile_ttl) if redelivered else 0)
    with while_planning(self, client):
        if attempts > MAX_ATTEMPTS:
            raise VideoError(f"gave up on {video!r}: {DIED} times it probed it")
        if store.is_cancelled(client, job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        if (need := store.waiting_need(client, job_id)) is not None:
            admit(client, job_id, need)  # before its clip is read again
        parsed = parse_video_options(recognizer, options)
        target = _opened(video)
        plan = plan_video(probe(target, repr(video), settings().max_pixels, parsed.frame_rate), parsed)
        job = VideoJob(job_id, video, parsed, plan, started, {"probe_s": time.time() - started})
        if len(plan.segments) == 1:  # one segment: a chord would only add its round trips
            outcome = run_segment(target, repr(video), plan, 0, parsed, TRANSIENT, thread_budget())
            return _finish(client, job, [outcome])
        description = job.to_json()
        admit(client, job_id, _need(description, job.plan))
        store.put_job(client, job_id, description, job.frames, settings().tile_ttl)
    header = group(
        recognize_segment.si(job_id, segment.first, segment.stop).set(priority=batch_priority(number))
        for number, segment in enumerate(plan.segments)
    )
    return self.replace(chord(header, merge_video.si(video, recognizer, **options)))


def _opened(video: Any) -> Target:
    """The clip a message names, resolved as an image is, but an upload read by ranges: each segment task reads the
    part of it that it decodes."""
    if isinstance(video, str) and video.startswith(store.REF_SCHEME):
        return store.stored_input(store_client(), video)
    return resolve(video)


def _need(description: str, plan: VideoPlan) -> int:
    """The bytes a video job takes in the store: its description, and a record of each frame its segments recognize;
    no pixels, as each segment task decodes its own frames."""
    return store.allocated(len(description)) + len(plan.selected) * store.RECORD_BYTES + 4 * store.KEY_BYTES  # 4 keys


@app.task(
    name="tilerec.recognize_segment", bind=True, autoretry_for=TRANSIENT, retry_backoff=True, max_retries=5,
    track_started=False,
)  # fmt: skip
def recognize_segment(self: Any, job_id: str, first: int, stop: int) -> dict[str, Any]:
    """Recognize the segment of the job's frames that starts at `first`, and store its record; returns
    a summary for monitors. Its failure (a damaged stream) is recorded, not raised, so the merge still runs; a
    segment whose process died MAX_ATTEMPTS times ends failed instead of coming back forever."""
    client, job = store_client(), described(VideoJob.from_json, job_id)
    number = job.plan.number_of(first)
    careful = bool(self.request.delivery_info.get("redelivered"))
    with attempt(client, job_id, f"segment:{number}", careful) as run:
        if run:
            report = _Progress(self, client, job, number)
            outcome = run_segment(_opened(job.video), repr(job.video), job.plan, number, job.options, TRANSIENT,
                                  thread_budget(), report)  # fmt: skip
        else:
            outcome = SegmentOutcome(number, error=f"gave up: {DIED} times it ran this segment")
    store.put_records(client, job_id, {number: json.dumps(outcome.to_json())}, settings().tile_ttl)
    return {
        "segment": number,
        "frames": len(outcome.frames),
        "failed": sum(f.error is not None for f in outcome.frames) + (outcome.error is not None),
        "detections": sum(len(f.detections) for f in outcome.frames if f.detections is not None),
        "seconds": round(outcome.seconds, 3),
    }


class _Progress:
    """A segment's frames as they are done: the job's progress in frames (the store, then `publish_progress`), at
    most every PROGRESS_EVERY_S, and a look for a cancel (`CancelWatch`). Called with the frames done so far; False
    stops the segment."""

    def __init__(self, task: Any, client: redis.Redis, job: VideoJob, number: int) -> None:
        self.task, self.client, self.job, self.number = task, client, job, number
        self.mine = len(job.plan.wanted(number))
        self.reported = time.monotonic()
        self.cancelled = CancelWatch(client, job.id)

    def __call__(self, done: int) -> bool:
        now = time.monotonic()
        last = done == self.mine
        if last or now - self.reported > PROGRESS_EVERY_S:
            self.reported = now
            counted = store.put_frames_done(self.client, self.job.id, self.number, done, settings().tile_ttl)
            if counted is not None:
                publish_progress(self.task, self.job.id, counted, self.job.frames, "frames")
        return not self.cancelled()


@app.task(name="tilerec.merge_video", bind=True)
def merge_video(self: Any, video: str, recognizer: str = "faces", **options: Any) -> dict[str, Any]:
    """The job's segment records, read from the store, tracked through the clip into its result. It runs under the
    job's id (the chord's body inherits it) and carries the job's own arguments, so a job reads as one in a monitor."""
    client = store_client()
    job = VideoJob.from_json(store.get_job(client, self.request.id))
    return _finish(client, job, [SegmentOutcome.from_json(record) for record in store.get_records(client, job.id)])


def _finish(client: redis.Redis, job: VideoJob, outcomes: list[SegmentOutcome]) -> dict[str, Any]:
    """The job's result from its segments' outcomes; its keys go last, whatever the outcome."""
    try:
        if store.is_cancelled(client, job.id):
            done = sum(len(o.frames) for o in outcomes)
            raise JobCancelled(f"job {job.id} was cancelled ({done} of {job.frames} frames had been recognized)")
        recognition = assemble_video(outcomes, job.plan, job.options, job.started, source=job.video,
                                     timings=job.timings)  # fmt: skip
        return deliver(client, job.id, recognition.to_json())
    finally:
        store.delete_job(client, job.id, 0)
