"""Recognizing a video: its frames planned into segments, each segment's frames recognized (whole or tiled, with the
image pipeline's tiling and merge), and the segments assembled into one result, its detections tracked through
the whole clip by one tracker. The same functions run in one process (`recognize_video`) and on Celery workers
(tasks/video.py), so the two give identical results for the same plan."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.inference import TileFailure, crop, describe, recognize_windows, region, windows_of
from pipeline.merge.detections import merge_detections
from pipeline.model import Detections
from pipeline.options import JobOptions, VideoOptions, parse_video_options
from pipeline.readers import images, inputs, remote
from pipeline.readers.images import ImageError
from pipeline.recognizers import spec_of
from pipeline.tiling import Window
from pipeline.video.frames import (
    Clip,
    ClipSummary,
    Segment,
    Target,
    VideoError,
    plan_segments,
    probe,
    read_frames,
    select_frames,
)
from pipeline.video.tracking import Track, track_clip

SCHEMA = "tilerec.video@1"
AUTO_SEGMENTS = 8  # an auto plan cuts the clip into about this many segments ...
MIN_SEGMENT_FRAMES = 24  # ... of at least this many recognized frames (a task's own cost stays a small share)
MAX_SEGMENT_FRAMES = 600  # ... and at most this many, so a long clip spreads over a big cluster


@dataclass(frozen=True)
class VideoPlan:
    """What a video job recognizes: the clip, the frames chosen, their segments, and the rate of the frames
    recognized (what the tracker takes as its frame rate)."""

    clip: Clip
    selected: tuple[int, ...]
    segments: tuple[Segment, ...]
    rate: float

    def wanted(self, number: int) -> list[int]:
        """The frames segment `number` recognizes."""
        segment = self.segments[number]
        return [f for f in self.selected if segment.first <= f < segment.stop]

    def number_of(self, first: int) -> int:
        """The segment that starts at frame `first` (what a segment task's message names)."""
        return next(n for n, segment in enumerate(self.segments) if segment.first == first)

    def to_json(self) -> dict[str, Any]:
        return {"clip": self.clip.to_json(), "selected": list(self.selected),
                "segments": [[s.first, s.stop] for s in self.segments], "rate": self.rate}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VideoPlan:
        segments = tuple(Segment(first, stop) for first, stop in data["segments"])
        return cls(Clip.from_json(data["clip"]), tuple(data["selected"]), segments, float(data["rate"]))


def plan_video(clip: Clip, options: VideoOptions) -> VideoPlan:
    """The frames to recognize (time range, step or fps) cut into keyframe-aligned segments.

    Raises:
        VideoError: no frame lies in the time range.
    """
    selected = select_frames(clip, options.step, options.fps, options.start, options.end)
    if not selected:
        until = "the end" if options.end is None else f"{options.end:g} s"
        raise VideoError(f"no frames between {options.start:g} s and {until} (the clip lasts {clip.duration:.3f} s)")
    auto = min(MAX_SEGMENT_FRAMES, max(MIN_SEGMENT_FRAMES, math.ceil(len(selected) / AUTO_SEGMENTS)))
    segments = plan_segments(selected, clip, options.segment_frames or auto)
    rate = options.fps if options.fps is not None else clip.fps / options.step
    return VideoPlan(clip, tuple(selected), tuple(segments), rate)


def frame_windows(clip: Clip, options: VideoOptions) -> list[Window]:
    """Each frame's windows: the tile grid over its region, or (untiled) the region as one window."""
    if options.tiled:
        return windows_of(clip.height, clip.width, options.frame)
    return [region(clip.height, clip.width, options.frame)]


@dataclass(frozen=True)
class FrameOutcome:
    """One frame's recognition: its detections, or the error that stopped it."""

    frame: int
    detections: Detections | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SegmentOutcome:
    """What a segment task stores for the merge: its frames' outcomes, or the error that stopped it."""

    number: int
    frames: tuple[FrameOutcome, ...] = ()
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        frames = []
        for f in self.frames:
            record: dict[str, Any] = {"frame": f.frame, "seconds": round(f.seconds, 4)}
            if f.error is not None:
                record["error"] = f.error
            else:
                record.update(f.detections.to_columns())  # type: ignore[union-attr]
            frames.append(record)
        return {"segment": self.number, "frames": frames, "error": self.error, "seconds": round(self.seconds, 4)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SegmentOutcome:
        frames = tuple(
            FrameOutcome(int(r["frame"]), error=r["error"], seconds=r["seconds"])
            if "error" in r
            else FrameOutcome(int(r["frame"]), Detections.from_columns(r), seconds=r["seconds"])
            for r in data["frames"]
        )
        return cls(int(data["segment"]), frames, data.get("error"), float(data.get("seconds", 0.0)))


def recognize_frame(
    picture: np.ndarray,
    frame: int,
    windows: Sequence[Window],
    options: JobOptions,
    reraise: tuple[type[BaseException], ...] = (),
) -> FrameOutcome:
    """One frame recognized as an image job would be: its windows, then the seams merged; an error in any window
    fails the frame (the tiles' errors named)."""
    began = time.perf_counter()
    height, width = picture.shape[:2]
    outcomes = recognize_windows(lambda w: crop(picture, w), windows, options, width, height, reraise)
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        error = "; ".join(f"tile {o.index}: {o.error}" for o in failed[:3])
        return FrameOutcome(frame, error=error, seconds=time.perf_counter() - began)
    found = Detections.concat(o.detections for o in outcomes if o.detections is not None)
    merged = merge_detections(found, options.merge, options.match_metric, options.match_threshold)
    return FrameOutcome(frame, merged, seconds=time.perf_counter() - began)


def run_segment(
    target: Target,
    name: str,
    plan: VideoPlan,
    number: int,
    options: VideoOptions,
    reraise: tuple[type[BaseException], ...] = (),
    threads: int = 0,
    on_frame: Callable[[int], bool] | None = None,
) -> SegmentOutcome:
    """Decode segment `number`'s frames (from the keyframe before its first) and recognize them (the merge tracks
    every segment's detections through the clip in order: `assemble_video`).

    Args:
        target, name: the clip as resolved, and as the user named it.
        plan: the job's plan.
        number: the segment.
        options: the job's options.
        reraise: errors that are not the segment's own (a store outage) and must reach the caller.
        threads: decoder threads (0: FFmpeg's choice).
        on_frame: called with the frames done so far after each; returning False stops the segment (a cancel).

    Returns:
        The frames' outcomes, or the error (a damaged stream) that stopped the segment.
    """
    began = time.perf_counter()
    windows = frame_windows(plan.clip, options)
    grey = spec_of(options.frame.recognizer).grey
    done: list[FrameOutcome] = []
    try:
        for frame, picture in read_frames(target, name, plan.clip, plan.wanted(number), grey, threads):
            done.append(recognize_frame(picture, frame, windows, options.frame, reraise))
            if on_frame is not None and not on_frame(len(done)):
                break
    except reraise:
        raise
    except ImageError as error:  # VideoError too: the stream is damaged from here on
        return SegmentOutcome(number, (), str(error), time.perf_counter() - began)
    except Exception as error:  # the segment's own failure: reported, so the merge still runs
        return SegmentOutcome(number, (), describe(error), time.perf_counter() - began)
    return SegmentOutcome(number, tuple(done), None, time.perf_counter() - began)


@dataclass(frozen=True)
class TrackedFrame:
    """A recognized frame in a clip's result: its time (seconds from the first frame), its detections and each one's
    track id (-1: in no track)."""

    frame: int
    time: float
    detections: Detections
    tracks: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        records = self.detections.to_records()
        for record, track in zip(records, self.tracks, strict=True):
            if track >= 0:
                record["track"] = track
        return {"frame": self.frame, "time": self.time, "detections": records}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackedFrame:
        records = data["detections"]
        tracks = tuple(int(r.get("track", -1)) for r in records)
        return cls(int(data["frame"]), float(data["time"]), Detections.from_records(records), tracks)


@dataclass
class VideoRecognition:
    """A whole clip's recognition: what `tilerec.merge_video` returns (as `to_json()`), `recognize_video` gives in
    process and `tasks.client.ClipJob.get` gives a caller (`from_json` of the document)."""

    clip: ClipSummary
    recognizer: str
    params: dict[str, Any]
    options: VideoOptions  # what the document tells of them: tiling, tile, overlap and the frames' selection
    source: str | None
    tiles: int  # windows per frame
    segments: list[list[int]]  # each segment's [first, stop)
    per_frame: list[TrackedFrame]
    tracks: list[Track]
    skipped: int  # frames not chosen (time range, step, fps)
    failed_segments: list[dict[str, Any]] = field(default_factory=list)
    failed_frames: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The result document (docs/video.md, "The result"), JSON-ready, schema `tilerec.video@1`."""
        opts = self.options
        return {
            "schema": SCHEMA,
            "video": {"source": self.source, **self.clip.to_json()},
            "recognizer": {"name": self.recognizer, "params": self.params},
            "tiling": {
                "tiled": opts.tiled,
                "tile": opts.frame.tile,
                "overlap": opts.frame.overlap,
                "tiles": self.tiles,
                "segments": len(self.segments),
                "segment_frames": self.segments,
            },
            "selection": {"step": opts.step, "fps": opts.fps, "start": opts.start, "end": opts.end},
            "frames": {
                "total": self.clip.frames,
                "processed": len(self.per_frame),
                "skipped": self.skipped,
                "failed": len(self.failed_frames),
            },
            "per_frame": [frame.to_json() for frame in self.per_frame],
            "tracks": [track.to_json() for track in self.tracks],
            "failed_segments": self.failed_segments,
            "failed_frames": self.failed_frames,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VideoRecognition:
        """The recognition a result document describes (`to_json()` gives it back); its options hold what the
        document tells (the recognizer's other job options at their defaults), unchecked, as the recognizer may be
        a plugin this process lacks."""
        tiling, selection, recognizer = data["tiling"], data["selection"], data["recognizer"]
        frame = JobOptions(recognizer["name"], dict(recognizer["params"]), tiling["tile"], tiling["overlap"])
        options = VideoOptions(frame, selection["step"], selection["fps"], selection["start"], selection["end"],
                               tiling["tiled"])  # fmt: skip
        return cls(
            clip=ClipSummary.from_json(data["video"]),
            recognizer=recognizer["name"],
            params=dict(recognizer["params"]),
            options=options,
            source=data["video"]["source"],
            tiles=int(tiling["tiles"]),
            segments=[list(s) for s in tiling["segment_frames"]],
            per_frame=[TrackedFrame.from_json(f) for f in data["per_frame"]],
            tracks=[Track.from_json(t) for t in data["tracks"]],
            skipped=int(data["frames"]["skipped"]),
            failed_segments=list(data["failed_segments"]),
            failed_frames=list(data["failed_frames"]),
            timings=dict(data["timings"]),
        )


def assemble_video(
    outcomes: Iterable[SegmentOutcome],
    plan: VideoPlan,
    options: VideoOptions,
    started: float,
    *,
    source: str | None = None,
    timings: Mapping[str, float] | None = None,
) -> VideoRecognition:
    """The clip's result from its segments' outcomes: their frames in clip order, tracked by one tracker from the
    first to the last (`track_clip`), as if one process had recognized them all; the one assembly, in one process
    and in the merge task.

    Raises:
        TileFailure: a segment or frame failed (or a segment has no outcome) and `on_tile_error` is "fail".
    """
    began = time.time()
    by_number: dict[int, SegmentOutcome] = {}
    for outcome in outcomes:
        by_number.setdefault(outcome.number, outcome)
    owners = [(segment.first, segment.stop) for segment in plan.segments]
    failed_segments = [
        {"segment": n, "frames": list(owners[n]), "error": by_number[n].error if n in by_number else "no result"}
        for n in range(len(plan.segments))
        if n not in by_number or by_number[n].error is not None
    ]
    failed_frames = [{"frame": f.frame, "error": f.error} for o in by_number.values() for f in o.frames
                     if f.error is not None]  # fmt: skip
    if (failed_segments or failed_frames) and options.frame.on_tile_error == "fail":
        said = [
            f"segment {s['segment']} (frames {s['frames'][0]}–{s['frames'][1] - 1}): {s['error']}"
            for s in failed_segments[:3]
        ] + [f"frame {f['frame']}: {f['error']}" for f in failed_frames[:3]]
        raise TileFailure(f"{len(failed_segments)} of {len(plan.segments)} segments and {len(failed_frames)} frames "
                          f"failed: {'; '.join(said)}")  # fmt: skip
    found = {f.frame: f.detections for o in by_number.values() for f in o.frames}
    frames = [(frame, found.get(frame)) for frame in plan.selected]
    tracks, ids = track_clip(frames, plan.rate)
    per_frame = [
        TrackedFrame(frame, plan.clip.times[frame], detections, tracked)
        for (frame, detections), tracked in zip(frames, ids, strict=True)
        if detections is not None
    ]
    finished = time.time()
    spent = [o.seconds for o in by_number.values()]
    return VideoRecognition(
        clip=plan.clip.summary(),
        recognizer=spec_of(options.frame.recognizer).name,
        params=options.frame.params,
        options=options,
        source=source,
        tiles=len(frame_windows(plan.clip, options)),
        segments=[[s.first, s.stop] for s in plan.segments],
        per_frame=per_frame,
        tracks=tracks,
        skipped=plan.clip.frames - len(plan.selected),
        failed_segments=failed_segments,
        failed_frames=failed_frames,
        timings={
            **(timings or {}),
            "recognize_s": sum(spent),
            "merge_s": finished - began,
            "total_s": finished - started,
        },
    )


def open_clip(video: str | Path, max_pixels: int, frame_rate: float | None = None) -> tuple[Target, Clip]:
    """A local video file, folder of frames or URL (fsspec), resolved and probed."""
    name = repr(str(video))
    if isinstance(video, str) and remote.is_url(video):
        target: Target = remote.stat(video)
    else:
        path = Path(video).expanduser()
        with inputs.file_errors(str(video)):
            path = path.resolve(strict=True)
        target = path
    return target, probe(target, name, max_pixels, frame_rate)


def recognize_video(
    video: str | Path, recognizer: str = "faces", *, max_pixels: int = images.DEFAULT_MAX_PIXELS, **options: Any
) -> VideoRecognition:
    """A clip recognized and tracked in this process: the same plan, segments and tracking as a distributed job,
    so the same result (the user's single-process alternative is `bench.video`'s loop).

    Args:
        video: a video file, a folder of frames, or an object-storage URL.
        recognizer: a recognizer's name.
        max_pixels: the largest frame accepted.
        options: video options (step, fps, start, end, tiled, segment_frames, frame_rate) and image job options
            (tile, overlap, roi, …, recognizer parameters).
    """
    started = time.time()
    parsed = parse_video_options(recognizer, options)
    target, clip = open_clip(video, max_pixels, parsed.frame_rate)
    plan = plan_video(clip, parsed)
    outcomes = [run_segment(target, repr(str(video)), plan, n, parsed) for n in range(len(plan.segments))]
    return assemble_video(outcomes, plan, parsed, started, source=str(video))


def annotated_frames(
    target: Target, name: str, clip: Clip, result: Mapping[str, Any], threads: int = 0
) -> Iterator[np.ndarray]:
    """The clip's frames from the first recognized to the last, each with the boxes of the latest recognized frame
    at or before it (frames a step skipped hold the last boxes), captioned `#track label`."""
    from pipeline.outputs.render import draw_detections

    by_frame = {f["frame"]: f["detections"] for f in result["per_frame"]}
    if not by_frame:
        return
    shown = Detections.empty()
    for frame, picture in read_frames(target, name, clip, list(range(min(by_frame), max(by_frame) + 1)), False,
                                      threads):  # fmt: skip
        if frame in by_frame:
            records = [{**r, "label": f"#{r['track']} {r['label']}" if "track" in r else r["label"]}
                       for r in by_frame[frame]]  # fmt: skip
            shown = Detections.from_records(records)
        yield draw_detections(picture, shown)
