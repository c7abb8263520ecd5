"""Objects tracked through a clip: one ByteTrack (supervision's) over every recognized frame's detections in clip
order, however the frames were split among segment tasks (the merge runs it on the boxes the segments stored: no
pixels; 0.7 ms a frame with 4 objects, 2 ms with 16), then tracks with the same decoded payload (a QR code's text,
a marker's id) joined whatever the gap between them.

Why supervision's ByteTrack (docs/video.md): IoU matching with a Kalman filter and a second pass for low-score
detections, in numpy and scipy. norfair caps numpy below 2 (opencv-python-headless 4.11+ needs numpy 2), and
supervision's successor package `trackers` depends on the GUI build opencv-python, which overwrites the headless
one; supervision 0.30 is the last release with ByteTrack and depends on neither.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.model import Detections

MATCH_IOU = 0.5  # the IoU that ties a detection to the track ByteTrack updated with it (ByteTrack's own threshold)
TRACK_BUFFER_S = 1.0  # a track unseen this long ends (ByteTrack's lost_track_buffer, in seconds of the clip)


def _byte_track(rate: float, buffer_s: float) -> Any:
    """One ByteTrack for one label; its ids start at 1 and are unique within it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated upstream in favour of `trackers` (see above)
            import supervision as sv

            # ByteTrack's buffer is counted in frames at 30 fps scaled by frame_rate: one second at any rate
            return sv.ByteTrack(lost_track_buffer=max(1, round(30 * buffer_s)), frame_rate=rate,
                                minimum_consecutive_frames=1)  # fmt: skip
    except ImportError:
        raise ImportError("tracking needs supervision (pip install 'tilerec[video]')") from None


def preload() -> None:
    """Import ByteTrack's library (supervision, scipy: 0.4 s) now where it is installed (the video extra): a worker
    does it before its pool forks, so a video job's merge does not wait for it."""
    with contextlib.suppress(ImportError):
        _byte_track(30.0, TRACK_BUFFER_S)


class ClipTracker:
    """ByteTrack over a clip's frames in order, one tracker per label (a track never changes label); ids are unique
    in the clip.

    ByteTrack confirms a new track on its second detection and reports it from then on; a track here starts at its
    first detection instead (the frame an object enters is part of its track), so ids are provisional until the
    tracker has seen the frames after it: `settle` turns those of tracks never confirmed (a one-frame false
    positive) into -1."""

    def __init__(self, rate: float, buffer_s: float = TRACK_BUFFER_S) -> None:
        self.rate, self.buffer_s = rate, buffer_s
        self.trackers: dict[str, Any] = {}
        self.ids: dict[tuple[str, int], int] = {}  # (label, ByteTrack's internal id) -> id in the clip
        self.confirmed: set[int] = set()

    def update(self, detections: Detections) -> list[int]:
        """Feed one frame's detections (every label's tracker sees every frame); returns each detection's
        provisional track id, -1 where ByteTrack left it out (a low score that matched no track)."""
        from scipy.optimize import linear_sum_assignment
        from supervision.detection.utils.iou_and_nms import box_iou_batch

        found = [-1] * len(detections)
        for label in sorted(set(detections.labels) | set(self.trackers)):
            picked = np.flatnonzero(detections.labels == label)
            if label not in self.trackers:
                self.trackers[label] = _byte_track(self.rate, self.buffer_s)
            tracker = self.trackers[label]
            boxes = detections.xyxy[picked].reshape(-1, 4)
            tracker.update_with_tensors(np.hstack([boxes, detections.scores[picked, None]]))
            # the tracks this frame's detections updated or started, matched back to them as ByteTrack does
            current = [t for t in tracker.tracked_tracks if t.frame_id == tracker.frame_id]
            if len(picked) and current:
                ious = box_iou_batch(boxes, np.asarray([t.tlbr for t in current]))
                for row, column in zip(*linear_sum_assignment(-ious), strict=True):
                    if ious[row, column] >= MATCH_IOU:
                        key = (label, int(current[column].internal_track_id))
                        found[int(picked[row])] = self.ids.setdefault(key, len(self.ids) + 1)
            for track in tracker.tracked_tracks:
                key = (label, int(track.internal_track_id))
                if track.is_activated and key in self.ids:
                    self.confirmed.add(self.ids[key])
        return found

    def settle(self, ids: Sequence[int]) -> tuple[int, ...]:
        """Provisional ids (`update`'s) as final: -1 for a track ByteTrack never confirmed."""
        return tuple(i if i in self.confirmed else -1 for i in ids)


@dataclass
class Track:
    """A track through the clip: its id, label, first and last frames, a row per frame it was seen in
    ([frame, x, y, w, h, score]) and its decoded payload, if any."""

    id: int
    label: str
    rows: list[list[float]] = field(default_factory=list)
    text: str | None = None

    @property
    def first(self) -> int:
        return int(self.rows[0][0])

    @property
    def last(self) -> int:
        return int(self.rows[-1][0])

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"id": self.id, "label": self.label, "first": self.first, "last": self.last,
                                    "frames": [[int(r[0]), *(round(float(v), 2) for v in r[1:5]), round(float(r[5]), 4)]
                                               for r in self.rows]}  # fmt: skip
        if self.text is not None:
            document["text"] = self.text
        return document

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Track:
        return cls(int(data["id"]), data["label"], [list(row) for row in data["frames"]], data.get("text"))


def track_clip(
    frames: Sequence[tuple[int, Detections | None]], rate: float
) -> tuple[list[Track], list[tuple[int, ...]]]:
    """A clip's tracks: one ByteTrack (`ClipTracker`) over its recognized frames in order, then tracks with the same
    payload joined (`_join_payloads`).

    Args:
        frames: (frame, its detections) in clip order; None for a frame not recognized (it failed), which the
            tracker sees without detections, so a track is lost for the time the clip really passes.
        rate: the rate of the frames given (what ByteTrack takes as its frame rate).

    Returns:
        The tracks, numbered 1, 2, … by first frame (then label and box); and each frame's detections' track ids
        (-1: in no track), in the order of `frames` (empty for a frame not recognized).
    """
    tracker = ClipTracker(rate)
    provisional = [tracker.update(Detections.empty() if found is None else found) for _, found in frames]
    settled = [tracker.settle(ids) for ids in provisional]
    tracks: dict[int, Track] = {}
    texts: dict[int, Counter[str]] = defaultdict(Counter)
    for (frame, found), ids in zip(frames, settled, strict=True):
        for row, local in enumerate(ids):
            if found is None or local < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in found.xyxy[row])
            track = tracks.setdefault(local, Track(local, str(found.labels[row])))
            track.rows.append([frame, x1, y1, x2 - x1, y2 - y1, float(found.scores[row])])
            if found.texts[row] is not None:
                texts[local][found.texts[row]] += 1
    for local, track in tracks.items():
        track.text = texts[local].most_common(1)[0][0] if texts[local] else None
    into = _join_payloads(list(tracks.values()))
    kept = sorted(set(into.values()), key=lambda k: (tracks[k].first, tracks[k].label, *tracks[k].rows[0][1:3]))
    final = {local: number for number, local in enumerate(kept, start=1)}
    for local in kept:
        tracks[local].id = final[local]
    return [tracks[local] for local in kept], [tuple(final[into[i]] if i >= 0 else -1 for i in ids) for ids in settled]


def _join_payloads(tracks: list[Track]) -> dict[int, int]:
    """Tracks with the same label and payload joined, whatever the gap between them (the object left and came
    back, or went unrecognized for a while); two seen in the same frame are two objects and stay apart.

    Returns:
        Each track's id to the id of the track it is joined into (its own if none); the kept tracks take the rows.
    """
    into = {track.id: track.id for track in tracks}
    by_payload: dict[tuple[str, str], list[Track]] = defaultdict(list)
    for track in sorted(tracks, key=lambda t: t.first):
        if track.text is None:
            continue
        for kept in by_payload[(track.label, track.text)]:
            if not {int(r[0]) for r in kept.rows} & {int(r[0]) for r in track.rows}:
                kept.rows = sorted(kept.rows + track.rows, key=lambda r: r[0])
                into[track.id] = kept.id
                break
        else:
            by_payload[(track.label, track.text)].append(track)
    return into
