"""Video clips read frame by frame through PyAV (FFmpeg's libraries): probed once from their packets (frames,
presentation times, keyframes) without decoding them, then decoded segment by segment from the keyframe at or
before each segment's first frame. A folder of image files reads as a clip of its frames in name order.

Why PyAV rather than OpenCV's FFmpeg backend (docs/video.md, measured by `python -m bench.video --decoders`): both
decode with FFmpeg at about the same speed, but OpenCV's frame count is an estimate from duration × rate, its seek
to a frame number lands on the wrong frame for some streams, and it tells nothing of keyframes; PyAV gives each
packet's timestamp and keyframe flag, so frames are numbered exactly (variable frame rate included) and segments
start on keyframes.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import cv2
import numpy as np

from pipeline.readers import remote, sources
from pipeline.readers.images import ImageError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".flv",
                  ".wmv", ".3gp", ".ogv", ".y4m")  # fmt: skip
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # a folder of frames: its image files
FOLDER_RATE = 30.0  # frames per second of a folder of frames, unless the job says (frame_rate)
VFR_TOLERANCE = 0.02  # frame intervals varying by more than this share of the mean: variable frame rate


class VideoError(ImageError):
    """The input cannot be read as a video (or a folder of frames)."""


def _need_av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError("reading video needs PyAV (pip install 'tilerec[video]')") from None
    return av


@dataclass(frozen=True)
class Clip:
    """A video as its probe found it: what a job plans from and every segment task numbers its frames by.

    Attributes:
        width, height: a frame's size as shown (rotation applied).
        frames: the number of frames (counted from the packets, not estimated).
        fps: the mean frame rate (frames / duration).
        times: each frame's presentation time in seconds from the first frame.
        keyframes: the frames a decoder can start at, ascending (every frame of a folder).
        pts: each frame's timestamp in the stream's time base (empty for a folder of frames).
        rotation: degrees counter-clockwise the frames are turned to be shown upright (display matrix).
        codec: the stream's codec ("image" for a folder of frames).
        vfr: the frame intervals vary (variable frame rate): times, not frame numbers, measure time.
    """

    width: int
    height: int
    frames: int
    fps: float
    times: tuple[float, ...]
    keyframes: tuple[int, ...]
    pts: tuple[int, ...] = ()
    rotation: int = 0
    codec: str = ""
    vfr: bool = False

    @property
    def duration(self) -> float:
        """Seconds from the first frame's start to the last frame's end."""
        return self.frames / self.fps if self.fps else 0.0

    def keyframe_before(self, frame: int) -> int:
        """The last keyframe at or before `frame`: where decoding it starts."""
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, frame) - 1)]

    def keyframe_after(self, frame: int) -> int:
        """The first keyframe at or after `frame` (`frames` if none): where a segment can start without decoding
        frames it does not want."""
        found = bisect.bisect_left(self.keyframes, frame)
        return self.keyframes[found] if found < len(self.keyframes) else self.frames

    def summary(self) -> ClipSummary:
        """What a result says of the clip (no per-frame lists)."""
        return ClipSummary(self.width, self.height, self.frames, round(self.fps, 4), round(self.duration, 4),
                           len(self.keyframes), self.rotation, self.codec, self.vfr)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Clip:
        lists = {key: tuple(data[key]) for key in ("times", "keyframes", "pts")}
        return cls(**{**data, **lists})


@dataclass(frozen=True)
class ClipSummary:
    """A clip as a result describes it: `Clip`'s sizes and flags, its keyframes counted, no per-frame lists."""

    width: int
    height: int
    frames: int
    fps: float
    duration: float
    keyframes: int
    rotation: int
    codec: str
    vfr: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClipSummary:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class Openable(Protocol):
    """A clip stored elsewhere that opens as a seekable binary file (an upload in the store, read by ranges)."""

    def open(self) -> BinaryIO: ...


Target = Path | bytes | remote.RemoteObject | Openable


def is_video_name(name: str) -> bool:
    """The name ends like a video file (what the CLI sends as a video job rather than an image job)."""
    return name.lower().endswith(VIDEO_SUFFIXES)


@contextlib.contextmanager
def _container(target: Target, name: str) -> Iterator[Any]:
    """An open input container on a path, bytes, an object in storage or an openable upload; FFmpeg's refusals as
    VideoErrors."""
    av = _need_av()
    opened = None
    try:
        if isinstance(target, remote.RemoteObject):
            opened = av.open(remote.open_file(target.url), "r")
        elif isinstance(target, bytes | Path):
            opened = av.open(io.BytesIO(target) if isinstance(target, bytes) else str(target), "r")
        else:
            opened = av.open(target.open(), "r")
    except av.FFmpegError as error:
        raise VideoError(f"{name} is not a video FFmpeg can read, or it is truncated ({_reason(error)})") from None
    try:
        yield opened
    finally:
        opened.close()


def _reason(error: BaseException) -> str:
    """FFmpeg's message without PyAV's errno prefix and file name."""
    text = getattr(error, "strerror", None) or str(error)
    return str(text).split(":")[0].strip() or type(error).__name__


def _stream(container: Any, name: str) -> Any:
    """The container's first video stream, checked to be decodable."""
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["no streams"]
        raise VideoError(f"{name} has no video stream (it has {', '.join(kinds)})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        tag = getattr(stream, "codec_tag", "") or "unknown"
        raise VideoError(f"{name}: FFmpeg (in PyAV) has no decoder for its video codec ({tag}); re-encode it (H.264)")
    return stream


def probe(target: Target | Path, name: str, max_pixels: int, frame_rate: float | None = None) -> Clip:
    """The clip's frames, times and keyframes from its packets (no frame is decoded but the first, which gives the
    rotation and proves the codec decodes), the frame size checked against `max_pixels` from the header first.

    Args:
        target: a video file, its bytes, an object in storage, or a folder of frames.
        name: the input as the user named it, for messages.
        max_pixels: the largest frame (width × height) accepted (TILEREC_MAX_PIXELS).
        frame_rate: a folder of frames' rate (default FOLDER_RATE); ignored for video files.

    Raises:
        VideoError: not a video, truncated, no video stream, a codec FFmpeg lacks, frames above the pixel limit, or
            no frames at all.
    """
    if isinstance(target, Path) and not target.exists():
        raise VideoError(f"{name} does not exist")
    if isinstance(target, Path) and target.is_dir():
        return _probe_folder(target, name, max_pixels, frame_rate or FOLDER_RATE)
    av = _need_av()
    with _container(target, name) as container:
        stream = _stream(container, name)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoError(f"{name}'s frames are {width}x{height} = {width * height:,} pixels, above the limit of "
                             f"{max_pixels:,} (TILEREC_MAX_PIXELS); refusing to decode it")  # fmt: skip
        packets = _packets(container, stream, name)
        if not packets:
            raise VideoError(f"{name} has a video stream with no frames")
        if stream.frames and len(packets) < stream.frames:
            raise VideoError(f"{name} is truncated: it holds {len(packets)} of the {stream.frames} frames its header "
                             "lists")  # fmt: skip
        packets.sort()
        try:
            container.seek(packets[0][0], stream=stream, backward=True)
            first = next(container.decode(stream))
        except (av.FFmpegError, StopIteration) as error:
            raise VideoError(f"{name}: its first frame cannot be decoded ({_reason(error)})") from None
        rotation = int(first.rotation or 0) % 360
    base = float(stream.time_base)
    pts = tuple(p for p, _ in packets)
    times = tuple(round((p - pts[0]) * base, 6) for p in pts)
    if rotation in (90, 270):
        width, height = height, width
    intervals = np.diff(times)
    span = times[-1] + (float(np.median(intervals)) if len(intervals) else 0.0)
    fps = len(pts) / span if span > 0 else float(stream.average_rate or FOLDER_RATE)
    vfr = bool(len(intervals) > 1 and np.ptp(intervals) > VFR_TOLERANCE * float(np.mean(intervals)))
    keyframes = tuple(i for i, (_, key) in enumerate(packets) if key) or (0,)
    return Clip(width, height, len(pts), fps, times, keyframes, pts, rotation, stream.codec_context.name, vfr)


def _packets(container: Any, stream: Any, name: str) -> list[tuple[int, bool]]:
    """Each frame's (timestamp, keyframe) from the stream's packets, in file order."""
    av = _need_av()
    found = []
    try:
        for packet in container.demux(stream):
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None and packet.size:
                found.append((int(stamp), bool(packet.is_keyframe)))
    except av.FFmpegError as error:
        raise VideoError(f"{name} cannot be read past packet {len(found)}: {_reason(error)} (truncated?)") from None
    return found


def frame_files(folder: Path) -> list[Path]:
    """A folder of frames: its image files in name order (zero-padded numbers sort as frames should)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def _probe_folder(folder: Path, name: str, max_pixels: int, rate: float) -> Clip:
    files = frame_files(folder)
    if not files:
        raise VideoError(f"{name} holds no image files ({', '.join(FRAME_SUFFIXES)}) to read as frames")
    first = sources.decode(files[0].read_bytes(), max_pixels)
    times = tuple(round(i / rate, 6) for i in range(len(files)))
    return Clip(first.shape[1], first.shape[0], len(files), rate, times, tuple(range(len(files))), codec="image")


def read_frames(
    target: Target | Path, name: str, clip: Clip, wanted: Sequence[int], grey: bool = False, threads: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """The `wanted` frames (ascending frame numbers) decoded, upright, as BGR (or grey) arrays.

    A video is decoded from the keyframe at or before the first wanted frame (one seek, not a read from the
    start) to the last wanted one; frames are numbered by their timestamps, so a seek that lands early costs time,
    never a wrong number.

    Raises:
        VideoError: a frame cannot be decoded (damaged or truncated stream), or the folder's files changed.
    """
    if not wanted:
        return
    if isinstance(target, Path) and target.is_dir():
        files = frame_files(target)
        if len(files) != clip.frames:
            raise VideoError(f"{name} changed since it was probed ({len(files)} frames, not {clip.frames})")
        for index in wanted:
            frame = sources.decode(files[index].read_bytes(), clip.width * clip.height)
            if frame.shape[:2] != (clip.height, clip.width):
                raise VideoError(
                    f"{name}: {files[index].name} is {frame.shape[1]}x{frame.shape[0]}, not "
                    f"{clip.width}x{clip.height} as the first frame (a clip's frames share one size)"
                )
            yield index, _as_grey(frame) if grey else _as_bgr(frame)
        return
    av = _need_av()
    number = {stamp: index for index, stamp in enumerate(clip.pts)}
    pending = set(wanted)
    last = max(wanted)
    with _container(target, name) as container:
        stream = _stream(container, name)
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        try:
            container.seek(clip.pts[clip.keyframe_before(min(wanted))], stream=stream, backward=True)
            for frame in container.decode(stream):
                index = number.get(frame.pts, -1)
                if index in pending:
                    pending.discard(index)
                    picture = frame.to_ndarray(format="gray" if grey else "bgr24")
                    yield index, np.ascontiguousarray(np.rot90(picture, clip.rotation // 90))
                if index >= last or not pending:
                    break
        except av.FFmpegError as error:
            raise VideoError(f"{name}: frame {min(pending)} cannot be decoded ({_reason(error)})") from None
    if pending:
        raise VideoError(f"{name}: frames {sorted(pending)[:5]} were not in the stream (damaged or truncated)")


def _as_grey(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def _as_bgr(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 else frame


def select_frames(clip: Clip, step: int = 1, fps: float | None = None, start: float = 0.0,
                  end: float | None = None) -> list[int]:  # fmt: skip
    """The frames a job recognizes: those shown in [start, end) seconds, then every `step`-th of them, or (with
    `fps`) the first frame at or after each 1/fps tick, so a variable frame rate is sampled evenly in time."""
    inside = [i for i, t in enumerate(clip.times) if t >= start and (end is None or t < end)]
    if fps is None:
        return inside[::step]
    chosen, tick = [], start
    for index in inside:
        if clip.times[index] >= tick - 1e-9:
            chosen.append(index)
            tick = start + (math.floor((clip.times[index] - start) * fps + 1e-9) + 1) / fps
    return chosen


@dataclass(frozen=True)
class Segment:
    """A segment task's frames: the selected frames in [first, stop), each recognized by this segment only."""

    first: int
    stop: int


def plan_segments(selected: Sequence[int], clip: Clip, length: int) -> list[Segment]:
    """Cut the selected frames into segments of about `length` of them, each starting on the keyframe nearest its
    planned start where one lies within half a segment of it, before or after (one always does when the keyframes
    are at most `length` frames apart; a segment starting elsewhere decodes from the keyframe before it and drops
    what it decoded before its first frame).

    Args:
        selected: the frames the job recognizes, ascending (`select_frames`).
        clip: the probed clip (its keyframes).
        length: selected frames per segment (at least 1).

    Returns:
        The segments in order; they hold every selected frame once.
    """
    if not selected:
        return []
    starts = [0]  # positions in `selected`
    while starts[-1] + length < len(selected):
        planned = starts[-1] + length
        before = bisect.bisect_left(selected, clip.keyframe_before(selected[planned]))
        after = bisect.bisect_left(selected, clip.keyframe_after(selected[planned]))
        near = [
            p for p in (before, after) if starts[-1] + length // 2 < p <= planned + length // 2 and p < len(selected)
        ]
        starts.append(min(near, key=lambda p: abs(p - planned)) if near else planned)
    ends = [*starts[1:], len(selected)]
    return [Segment(selected[start], selected[end - 1] + 1) for start, end in zip(starts, ends, strict=True)]


def write_video(path: Path, frames: Iterator[np.ndarray], fps: float, gop: int = 12, quality: int = 18) -> int:
    """Encode BGR or grey frames as H.264 (libx264, no B-frames, a keyframe every `gop` frames) in an MP4 or MKV;
    returns the frames written.

    Args:
        path: the output file (its suffix picks the container).
        frames: the frames, all one size (even width and height).
        fps: frames per second.
        gop: frames from one keyframe to the next.
        quality: x264's constant quality (0: lossless; 18: visually lossless).
    """
    av = _need_av()
    from fractions import Fraction

    count = 0
    with av.open(str(path), "w") as output:
        rate = Fraction(fps).limit_denominator(1001)
        stream = output.add_stream(
            "libx264",
            rate=rate,
            options={"bf": "0", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": str(quality)},
        )
        for picture in frames:
            if count == 0:
                stream.height, stream.width = picture.shape[:2]
                stream.pix_fmt = "yuv420p"
            layout = "gray" if picture.ndim == 2 else "bgr24"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format=layout)
            frame.pts = count
            output.mux(stream.encode(frame))
            count += 1
        output.mux(stream.encode(None))
    return count
