"""Generated clips with known motion for the video tests: QR codes and ArUco markers moving in straight lines at
whole pixels per frame, some crossing the tile seams, one leaving the frame and coming back."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.scenes.codes import Mover, MovingTruth, aruco_marker, moving_frame, qr_sticker
from pipeline.video.frames import write_video

WIDTH, HEIGHT, FRAMES, FPS, GOP = 640, 480, 120, 30, 12
TILE, OVERLAP = 320, 0.4  # windows at x 0, 192, 320 and y 0, 160: every mover below crosses a seam


def movers() -> list[Mover]:
    """Five codes on paths that never overlap: `charlie` leaves on the right near frame 30 and comes back near 70."""
    return [
        Mover(qr_sticker("alpha", 4), (-70, 10), (4, 0)),  # enters from the left, crosses the x seam
        Mover(qr_sticker("bravo", 4), (540, 370), (-3, 0)),  # along the bottom, right to left
        Mover(qr_sticker("charlie", 4), (460, 150), (5, 1), turn=50),  # out on the right and back
        Mover(aruco_marker(7, 8), (20, 140), (1, 1)),  # down through the y seam
        Mover(aruco_marker(3, 8), (250, 250), (0, -1)),  # up through the y seam, in the x seam
    ]


@dataclass(frozen=True)
class KnownClip:
    path: Path
    truths: dict[str, list[MovingTruth]]  # by payload, in frame order


RED = (40, 40, 230)  # BGR: a patch the faulty recognizers react to (tests/faulty.py)


def write_clip(path: Path, frames: int = FRAMES, fps: float = FPS, gop: int = GOP, red: range = range(0)) -> KnownClip:
    """The clip as an H.264 MP4 (a keyframe every `gop` frames) and each code's truth per frame; frames in `red`
    get a red patch in the top right corner, where no code goes."""
    truths: dict[str, list[MovingTruth]] = defaultdict(list)
    chosen = movers()

    def pictures():
        for frame in range(frames):
            image, found = moving_frame(WIDTH, HEIGHT, chosen, frame)
            for truth in found:
                truths[str(truth.truth.text)].append(truth)
            if frame in red:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                image[0:24, WIDTH - 40 : WIDTH] = RED
            yield image

    write_video(path, pictures(), fps, gop, quality=0)
    return KnownClip(path, dict(truths))


FLICKER_SIZE = (320, 240)  # a small frame, recognized whole: the flickering clip tests tracking, not tiling
FLICKER_SEGMENT = 30  # its keyframe interval and segment length: segments [0, 30), [30, 60), [60, 90), [90, 120)


def flickering() -> list[tuple[Mover, tuple[int, ...]]]:
    """Three ArUco markers on paths that never overlap, each with the frames it is left out of (a detector's
    flicker): the first and the second missing in the first frames of a segment, the third never."""
    return [
        (Mover(aruco_marker(7, 6), (10, 20), (2, 0)), (30, 31, 60)),  # missed at the starts of segments 1 and 2
        (Mover(aruco_marker(3, 6), (260, 180), (-2, 0)), (45, 90, 91, 92)),  # mid-segment, then segment 3's start
        (Mover(aruco_marker(5, 6), (140, 100), (0, 0)), ()),
    ]


def write_flickering_clip(path: Path) -> KnownClip:
    """The flickering markers' clip (FRAMES frames, a keyframe every FLICKER_SEGMENT) and each marker's truth in the
    frames it is drawn in."""
    truths: dict[str, list[MovingTruth]] = defaultdict(list)
    width, height = FLICKER_SIZE

    def pictures():
        for frame in range(FRAMES):
            image, found = moving_frame(width, height, [m for m, gone in flickering() if frame not in gone], frame)
            for truth in found:
                truths[str(truth.truth.text)].append(truth)
            yield image

    write_video(path, pictures(), FPS, FLICKER_SEGMENT, quality=0)
    return KnownClip(path, dict(truths))


def overlapping(chosen: list[Mover], frames: int = FRAMES) -> list[tuple[int, str, str]]:
    """Frames where two movers' pictures overlap (the scene must have none: a covered code cannot be read)."""
    found = []
    for frame in range(frames):
        boxes = [(m.sticker.text, *m.at(frame), *m.sticker.picture.shape[::-1]) for m in chosen]
        for i, (a, ax, ay, aw, ah) in enumerate(boxes):
            for b, bx, by, bw, bh in boxes[i + 1 :]:
                if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                    found.append((frame, str(a), str(b)))
    return found


def frames_of(track: dict) -> np.ndarray:
    return np.asarray(track["frames"], dtype=float)
