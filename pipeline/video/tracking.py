"""Objects tracked through a clip: ByteTrack (supervision's) within each segment, then the segments' tracks stitched
across their boundaries by matching them in the frames both segments recognized, and tracks with the same decoded
payload (a QR code's text, a marker's id) joined whatever the gap between them.

Why supervision's ByteTrack (docs/video.md): IoU matching with a Kalman filter and a second pass for low-score
detections, in numpy and scipy. norfair caps numpy below 2 (opencv-python-headless 4.11+ needs numpy 2), and
supervision's successor package `trackers` depends on the GUI build opencv-python, which overwrites the headless
one; supervision 0.30 is the last release with ByteTrack and depends on neither.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.model import Detections

STITCH_IOU = 0.5  # mean IoU over the shared frames that makes two segments' tracks one
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


class SegmentTracker:
    """ByteTrack over one segment's frames, one tracker per label (a track never changes label); ids are unique in
    the segment.

    ByteTrack confirms a new track on its second detection and reports it from then on; a track here starts at its
    first detection instead (the frame an object enters is part of its track), so ids are provisional until the
    tracker has seen the frames after the segment's (the merge carries it on over the next segment's first ones):
    `settle` turns those of tracks never confirmed (a one-frame false positive) into -1. `to_json` and `from_json`
    carry a tracker from a segment task to the merge, to go on exactly where it stopped."""

    def __init__(self, rate: float, buffer_s: float = TRACK_BUFFER_S) -> None:
        self.rate, self.buffer_s = rate, buffer_s
        self.trackers: dict[str, Any] = {}
        self.ids: dict[tuple[str, int], int] = {}  # (label, ByteTrack's internal id) -> id in the segment
        self.confirmed: set[int] = set()

    def update(self, detections: Detections) -> list[int]:
        """Feed one frame's detections (every label's tracker sees every frame); returns each detection's
        provisional track id, -1 where ByteTrack left it out (a low score that matched no track)."""
        from scipy.optimize import linear_sum_assignment
        from supervision.detection.utils.iou_and_nms import box_iou_batch

        found = [-1] * len(detections)
        for label in sorted(set(detections.labels) | set(self.trackers)):
            picked = np.flatnonzero(detections.labels == label)
            tracker = self.trackers.setdefault(label, _byte_track(self.rate, self.buffer_s))
            boxes = detections.xyxy[picked].reshape(-1, 4)
            tracker.update_with_tensors(np.hstack([boxes, detections.scores[picked, None]]))
            # the tracks this frame's detections updated or started, matched back to them as ByteTrack does
            current = [t for t in tracker.tracked_tracks if t.frame_id == tracker.frame_id]
            if len(picked) and current:
                ious = box_iou_batch(boxes, np.asarray([t.tlbr for t in current]))
                for row, column in zip(*linear_sum_assignment(-ious), strict=True):
                    if ious[row, column] >= STITCH_IOU:
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

    def to_json(self) -> dict[str, Any]:
        """The tracker's whole state, JSON-ready: each label's ByteTrack (`_byte_track_state`) and the segment's ids."""
        return {"rate": self.rate, "buffer_s": self.buffer_s,
                "trackers": {label: _byte_track_state(t) for label, t in self.trackers.items()},
                "ids": [[label, internal, local] for (label, internal), local in self.ids.items()],
                "confirmed": sorted(self.confirmed)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SegmentTracker:
        """The tracker `to_json` described, in the state it was in."""
        tracker = cls(float(data["rate"]), float(data["buffer_s"]))
        for label, state in data["trackers"].items():
            tracker.trackers[label] = _restored(_byte_track(tracker.rate, tracker.buffer_s), state)
        tracker.ids = {(str(label), int(internal)): int(local) for label, internal, local in data["ids"]}
        tracker.confirmed = {int(i) for i in data["confirmed"]}
        return tracker


# What a ByteTrack (supervision 0.30, pinned below 0.31) holds between frames: its frame count, its two id counters,
# and its tracked, lost and just-removed tracks; each track's Kalman state, counters and flags. The rest (thresholds,
# filters) comes from its constructor.
_TRACK_FIELDS = ("is_activated", "start_frame", "frame_id", "score", "tracklet_len", "internal_track_id",
                 "external_track_id")  # fmt: skip
_LISTS = ("tracked_tracks", "lost_tracks", "removed_tracks")


def _byte_track_state(tracker: Any) -> dict[str, Any]:
    """One ByteTrack's state, JSON-ready; a track in two of its lists (lost, then removed) is stored once."""
    tracks: dict[int, Any] = {}
    for name in _LISTS:
        for track in getattr(tracker, name):
            tracks.setdefault(id(track), track)
    index = {key: number for number, key in enumerate(tracks)}
    return {
        "frame_id": tracker.frame_id,
        "next_ids": [tracker.internal_id_counter._id, tracker.external_id_counter._id],
        "tracks": [{**{name: _plain(getattr(t, name)) for name in _TRACK_FIELDS}, "state": t.state.value,
                    "tlwh": t._tlwh.tolist(), "kalman": t.kalman_filter is not None,
                    "mean": _array(t.mean), "covariance": _array(t.covariance)}
                   for t in tracks.values()],
        **{name: [index[id(t)] for t in getattr(tracker, name)] for name in _LISTS},
    }  # fmt: skip


def _restored(tracker: Any, state: Mapping[str, Any]) -> Any:
    """A new ByteTrack (`_byte_track`'s) put in the state `_byte_track_state` described."""
    from supervision.tracker.byte_tracker.single_object_track import STrack, TrackState

    tracker.frame_id = int(state["frame_id"])
    tracker.internal_id_counter._id, tracker.external_id_counter._id = (int(i) for i in state["next_ids"])
    tracks = []
    for saved in state["tracks"]:
        track = STrack(np.asarray(saved["tlwh"], np.float32), saved["score"], tracker.minimum_consecutive_frames,
                       tracker.shared_kalman, tracker.internal_id_counter, tracker.external_id_counter)  # fmt: skip
        for name in _TRACK_FIELDS:
            setattr(track, name, saved[name])
        track.state = TrackState(saved["state"])
        track.kalman_filter = tracker.kalman_filter if saved["kalman"] else None
        track.mean, track.covariance = _unarray(saved["mean"]), _unarray(saved["covariance"])
        tracks.append(track)
    for name in _LISTS:
        setattr(tracker, name, [tracks[number] for number in state[name]])
    return tracker


def _array(values: np.ndarray | None) -> list[Any] | None:
    """An array as [dtype, nested lists]: its dtype kept, as a new track's mean is float32 until its first update
    and the filter's arithmetic follows the dtype."""
    return None if values is None else [values.dtype.str, values.tolist()]


def _unarray(saved: list[Any] | None) -> np.ndarray | None:
    return None if saved is None else np.asarray(saved[1], np.dtype(saved[0]))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (JSON has no float32)."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class Track:
    """A track through the clip: its id, label, first and last frames, a row per frame it was seen in
    ([frame, x, y, w, h, score]) and its decoded payload, if any."""

    id: int
    label: str
    rows: list[list[float]] = field(default_factory=list)
    text: str | None = None
    pieces: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (segment, id there) stitched in

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


@dataclass(frozen=True)
class Seen:
    """One detection of a segment's track: the frame, its box (x1, y1, x2, y2), score and payload."""

    frame: int
    xyxy: tuple[float, float, float, float]
    score: float
    text: str | None


@dataclass
class Piece:
    """A segment's track, as the stitching sees it."""

    segment: int
    local: int
    label: str
    seen: dict[int, Seen] = field(default_factory=dict)


def pieces_of(segment: int, frames: Iterable[tuple[int, Detections, Sequence[int]]]) -> list[Piece]:
    """A segment's tracks from its frames: (frame, detections, each detection's track id in the segment)."""
    found: dict[int, Piece] = {}
    for frame, detections, tracks in frames:
        for row, local in enumerate(tracks):
            if local < 0:
                continue
            piece = found.setdefault(local, Piece(segment, local, str(detections.labels[row])))
            box = tuple(float(v) for v in detections.xyxy[row])
            piece.seen[frame] = Seen(frame, box, float(detections.scores[row]), detections.texts[row])  # type: ignore[arg-type]
    return [found[local] for local in sorted(found)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_across(
    before: Sequence[Piece], after: Sequence[Piece], threshold: float = STITCH_IOU
) -> list[tuple[int, int]]:
    """Pairs (i, j) of `before[i]` and `after[j]` that are one object: same label, mean box IoU over the frames both
    saw it in at least `threshold`; one-to-one, best pairs first.

    Args:
        before: the earlier segment's tracks.
        after: the later segment's tracks (the two segments recognized some frames alike: their overlap).
        threshold: the least mean IoU over the shared frames.
    """
    candidates = []
    for i, a in enumerate(before):
        for j, b in enumerate(after):
            shared = sorted(set(a.seen) & set(b.seen))
            if a.label != b.label or not shared:
                continue
            mean = sum(box_iou(a.seen[f].xyxy, b.seen[f].xyxy) for f in shared) / len(shared)
            if mean >= threshold:
                candidates.append((-mean, -len(shared), i, j))
    pairs, used_i, used_j = [], set(), set()
    for _, _, i, j in sorted(candidates):
        if i not in used_i and j not in used_j:
            pairs.append((i, j))
            used_i.add(i)
            used_j.add(j)
    return pairs


class _Union:
    """Disjoint sets of pieces (by (segment, local id)): the tracks they stitch into."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, key: tuple[int, int]) -> tuple[int, int]:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        self.parent[self.find(b)] = self.find(a)


def stitch(
    segments: Sequence[Sequence[Piece]], owners: Sequence[tuple[int, int]]
) -> tuple[list[Track], dict[tuple[int, int], int]]:
    """The clip's tracks from its segments' tracks: matched across each boundary (`match_across`), then joined by
    payload, each frame taken from the segment that owns it.

    Args:
        segments: each segment's tracks (`pieces_of`), in clip order.
        owners: each segment's owned frames [first, stop) (`video.owned`): a frame recognized by two segments
            counts once, from its owner.

    Returns:
        The tracks, numbered 1, 2, … by first frame (then label and box), each frame once; and each segment's
        track ids to the clip's: (segment, id in the segment) → id.
    """
    union = _Union()
    for number in range(1, len(segments)):
        for i, j in match_across(segments[number - 1], segments[number]):
            union.join(_key(segments[number - 1][i]), _key(segments[number][j]))
    groups: dict[tuple[int, int], list[Piece]] = defaultdict(list)
    for pieces in segments:
        for piece in pieces:
            groups[union.find(_key(piece))].append(piece)
    tracks = [_track(pieces, owners) for pieces in groups.values()]
    tracks = _join_payloads([track for track in tracks if track.rows])
    tracks.sort(key=lambda t: (t.first, t.label, t.rows[0][1], t.rows[0][2]))
    for number, track in enumerate(tracks, start=1):
        track.id = number
    return tracks, {key: track.id for track in tracks for key in track.pieces}


def _key(piece: Piece) -> tuple[int, int]:
    return piece.segment, piece.local


def _track(pieces: Sequence[Piece], owners: Sequence[tuple[int, int]]) -> Track:
    """One track from its pieces: each frame from the piece whose segment owns it; its payload the most common."""
    rows, texts = {}, Counter()
    for piece in pieces:
        first, stop = owners[piece.segment]
        for frame, seen in piece.seen.items():
            if first <= frame < stop:
                x1, y1, x2, y2 = seen.xyxy
                rows[frame] = [frame, x1, y1, x2 - x1, y2 - y1, seen.score]
                if seen.text is not None:
                    texts[seen.text] += 1
    text = texts.most_common(1)[0][0] if texts else None
    return Track(0, pieces[0].label, [rows[frame] for frame in sorted(rows)], text, [_key(p) for p in pieces])


def _join_payloads(tracks: list[Track]) -> list[Track]:
    """Tracks with the same label and payload joined, whatever the gap between them (the object left and came
    back, or went unrecognized for a while); two seen in the same frame are two objects and stay apart."""
    joined: list[Track] = []
    by_payload: dict[tuple[str, str], list[Track]] = defaultdict(list)
    for track in sorted(tracks, key=lambda t: t.first):
        if track.text is None:
            joined.append(track)
            continue
        for kept in by_payload[(track.label, track.text)]:
            if not {int(r[0]) for r in kept.rows} & {int(r[0]) for r in track.rows}:
                kept.rows = sorted(kept.rows + track.rows, key=lambda r: r[0])
                kept.pieces += track.pieces
                break
        else:
            by_payload[(track.label, track.text)].append(track)
            joined.append(track)
    return joined
