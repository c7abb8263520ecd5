"""Video jobs: decoding and probing (PyAV), frame choice, segments, tracking through the clip, in one process and on
real workers, with clips generated with known motion (tests/clips.py)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import warnings
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.model import Detections
from pipeline.options import OptionsError, parse_video_options
from pipeline.video.clips import FrameOutcome, SegmentOutcome, VideoPlan, assemble_video, plan_video, recognize_video
from pipeline.video.frames import (
    Clip,
    Segment,
    VideoError,
    plan_segments,
    probe,
    read_frames,
    select_frames,
    write_video,
)
from pipeline.video.tracking import track_clip
from tasks import store
from tasks.client import submit_video
from tasks.job_record import JobCancelled
from tests.clips import (
    FLICKER_SEGMENT,
    FRAMES,
    GOP,
    HEIGHT,
    OVERLAP,
    TILE,
    WIDTH,
    KnownClip,
    frames_of,
    movers,
    overlapping,
    write_clip,
    write_flickering_clip,
)
from tests.conftest import IMAGES_ROOT, once_per_run, tilerec_keys
from tests.test_reliability import TIMEOUT, wait_for

SEGMENT = 30  # recognized frames per segment: boundaries near 24, 48, 72, 96 fall mid-motion for every code
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "segment_frames": SEGMENT}


@pytest.fixture(scope="module")
def known() -> KnownClip:
    return write_clip(IMAGES_ROOT / "known.mp4")


@pytest.fixture(scope="module")
def in_process(known: KnownClip, tmp_path_factory) -> dict[str, dict]:
    """The known clip recognized in process, by recognizer (each computed once per test run for the module's
    tests: the clip is the same in every test process)."""
    return once_per_run(
        tmp_path_factory,
        "video-in-process",
        lambda _: {r: recognize_video(known.path, r, **OPTIONS).to_json() for r in ("qrcode", "aruco")},
    )


@pytest.fixture(scope="module")
def red_clip() -> KnownClip:
    """The known clip with a red patch in frames 60–64 (the third segment), where faulty recognizers act."""
    return write_clip(IMAGES_ROOT / "known-red.mp4", red=range(60, 65))


def numbered(frames: int, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """Grey frames whose brightness is their number × 4 (up to 63): a decoded frame says which one it is."""
    return [np.full((height, width), 4 * n, np.uint8) for n in range(frames)]


def frame_number(picture: np.ndarray) -> int:
    return round(float(picture.mean()) / 4)


# --- decoding and probing --------------------------------------------------------------------------------------


def test_probe_counts_frames_and_keyframes_exactly(tmp_path):
    path = tmp_path / "n.mp4"
    write_video(path, iter(numbered(50)), 25, gop=10, quality=0)
    clip = probe(path, "n.mp4", 10**8)
    assert (clip.frames, clip.width, clip.height) == (50, 64, 48)
    assert clip.keyframes == (0, 10, 20, 30, 40)
    assert clip.fps == pytest.approx(25, rel=1e-3) and clip.duration == pytest.approx(2.0, rel=1e-3)
    assert clip.times[7] == pytest.approx(7 / 25) and not clip.vfr


def test_a_segment_decodes_its_own_frames_after_a_seek(tmp_path):
    path = tmp_path / "n.mp4"
    write_video(path, iter(numbered(60)), 30, gop=12, quality=0)
    clip = probe(path, "n.mp4", 10**8)
    for wanted in ([37], [12, 13, 14], [25, 50, 59], [0, 1]):
        got = list(read_frames(path, "n.mp4", clip, wanted, grey=True))
        assert [index for index, _ in got] == wanted
        assert [frame_number(picture) for _, picture in got] == wanted


def write_vfr(path: Path, gaps_ms: list[int]) -> None:
    """Numbered frames shown for these durations (ms): a variable frame rate."""
    base = Fraction(1, 1000)
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=30, options={"bf": "0", "qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = base
        stamp = 0
        for number, gap in enumerate(gaps_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64), 4 * number, np.uint8), format="gray")
            frame.pts, frame.time_base = stamp, base
            output.mux(stream.encode(frame))
            stamp += gap
        output.mux(stream.encode(None))


def test_variable_frame_rate_is_numbered_by_timestamp_and_sampled_by_time(tmp_path):
    path = tmp_path / "vfr.mp4"
    gaps = [20, 80] * 10  # 20 frames in 1 s: bursts of two 20 ms apart
    write_vfr(path, gaps)
    clip = probe(path, "vfr.mp4", 10**8)
    assert clip.vfr and clip.frames == 20
    assert list(clip.times[:4]) == pytest.approx([0.0, 0.02, 0.1, 0.12], abs=1e-3)
    chosen = select_frames(clip, fps=10)  # one frame per 100 ms tick: the first of each burst
    assert chosen == list(range(0, 20, 2))
    assert [frame_number(p) for _, p in read_frames(path, "vfr.mp4", clip, chosen, grey=True)] == chosen


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    picture = np.zeros((48, 64), np.uint8)
    picture[:8, :16] = 255  # a bright block in the top left corner
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=30, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)  # shown turned 90° counter-clockwise
        for number in range(3):
            frame = av.VideoFrame.from_ndarray(picture, format="gray")
            frame.pts = number
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    clip = probe(path, "rot.mp4", 10**8)
    assert (clip.rotation, clip.width, clip.height) == (90, 48, 64)
    (_, shown), *_ = read_frames(path, "rot.mp4", clip, [0], grey=True)
    assert shown.shape == (64, 48)
    assert shown[-16:, :8].mean() > 200 and shown[:16, :8].mean() < 50  # the block turned to the bottom left


def truncated(tmp_path: Path) -> Path:
    """An MP4 with its index first (faststart), cut in half: the index lists frames that are not there."""
    whole, fast = tmp_path / "whole.mp4", tmp_path / "fast.mp4"
    write_video(whole, iter(numbered(60)), 30, quality=0)
    with av.open(str(whole)) as source, av.open(str(fast), "w", options={"movflags": "faststart"}) as output:
        copied = output.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = copied
                output.mux(packet)
    data = fast.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as output:
        stream = output.add_stream("aac", rate=44100)
        for number in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, number * 1024
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def unknown_codec(path: Path) -> Path:
    """An AVI whose codec tag no FFmpeg decoder knows (an MJPEG AVI with its tag changed)."""
    writer = cv2.VideoWriter(str(path.with_suffix(".mjpg.avi")), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for picture in numbered(5):
        writer.write(cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR))
    writer.release()
    path.write_bytes(path.with_suffix(".mjpg.avi").read_bytes().replace(b"MJPG", b"ZQ9X"))
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (truncated, "is truncated: it holds"),
        (lambda tmp: audio_only(tmp / "a.m4a"), r"has no video stream \(it has audio\)"),
        (lambda tmp: (tmp / "t.mp4").write_text("not a video\n" * 40) and tmp / "t.mp4", "is not a video FFmpeg"),
        (lambda tmp: unknown_codec(tmp / "z.avi"), "has no decoder for its video codec"),
    ],
)
def test_bad_videos_are_refused_in_one_line(tmp_path, make, said):
    path = make(tmp_path)
    with pytest.raises(VideoError, match=said) as refused:
        probe(path, repr(path.name), 10**8)
    assert "\n" not in str(refused.value)


def test_a_frame_above_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "n.mp4"
    write_video(path, iter(numbered(3)), 30)
    with pytest.raises(VideoError, match=r"64x48 = 3,072 pixels, above the limit of 3,000"):
        probe(path, "n.mp4", 3000)


# --- choosing frames, segments, tracking (pure) ----------------------------------------------------------------


def steady(frames: int, fps: float = 30.0, gop: int = 12) -> Clip:
    return Clip(64, 48, frames, fps, tuple(i / fps for i in range(frames)), tuple(range(0, frames, gop)))


def test_frames_are_chosen_by_time_range_step_and_fps():
    clip = steady(90)
    assert select_frames(clip, step=3) == list(range(0, 90, 3))
    assert select_frames(clip, start=1.0, end=2.0) == list(range(30, 60))
    assert select_frames(clip, fps=10, start=1.0, end=2.0) == list(range(30, 60, 3))
    with pytest.raises(OptionsError, match="step or fps, not both"):
        parse_video_options("qrcode", {"step": 2, "fps": 5})
    with pytest.raises(VideoError, match=r"no frames between 5 s and the end \(the clip lasts 3.000 s\)"):
        plan_video(clip, parse_video_options("qrcode", {"start": 5}))


@pytest.mark.parametrize(("length", "step"), [(30, 1), (7, 1), (20, 3), (1000, 1)])
def test_segments_start_on_keyframes_and_hold_each_frame_once(length, step):
    clip = steady(200)
    chosen = select_frames(clip, step=step)
    segments = plan_segments(chosen, clip, length)
    counted = [f for segment in segments for f in chosen if segment.first <= f < segment.stop]
    assert counted == chosen  # every chosen frame recognized once, in order
    for before, after in itertools.pairwise(segments):
        assert before.stop <= after.first  # no frame recognized twice
        assert after.first in chosen  # a segment starts on a frame it recognizes
        if length * step >= 12:  # a keyframe lies within half a segment of its planned start: it starts there
            assert after.first in clip.keyframes


def test_a_segment_starts_on_the_nearest_keyframe_before_or_after_its_planned_start():
    clip = Clip(64, 48, 100, 30.0, tuple(i / 30 for i in range(100)), (0, 22, 41, 70))
    segments = plan_segments(list(range(100)), clip, 25)
    # planned at 25 (keyframe 22 is nearer than 41), then 47 (41 before it), then 66 (70 after it), then 95 (none
    # within 12 of it: it starts where planned)
    assert [s.first for s in segments] == [0, 22, 41, 70, 95]


def drifting(frames: int, seed: int = 0) -> list[Detections]:
    """Boxes drifting at their own speeds, two labels, some missed now and then and some low-scored (ByteTrack's
    second pass), one more box every third frame: what a tracker carried across a cut must follow alike."""
    rng = np.random.default_rng(seed)
    made = []
    for frame in range(frames):
        kept = [k for k in range(6 + frame % 3) if rng.random() > 0.15]
        xyxy = np.asarray([[10 + 40 * k + 3 * frame, 20 + 2 * frame * (k % 2)] * 2 for k in kept], float).reshape(-1, 4)
        xyxy[:, 2:] += 30
        scores = rng.uniform(0.05, 1.0, len(kept)).astype(np.float32)
        made.append(Detections(xyxy, scores, np.asarray(["a" if k % 3 else "b" for k in kept], object)))
    return made


def boxes(rows: list[tuple[float, float]], text: str | None = None) -> Detections:
    """20 px boxes of one label at these (x, y), with a payload."""
    xyxy = np.asarray([[x, y, x + 20, y + 20] for x, y in rows], float).reshape(-1, 4)
    return Detections(xyxy, np.full(len(rows), 0.9), np.asarray(["thing"] * len(rows), object), [text] * len(rows))


def segmented(frames: list[Detections | None], cuts: tuple[int, ...]) -> tuple[VideoPlan, list[SegmentOutcome]]:
    """A plan with segments starting at `cuts` and each segment's outcome, as its task would store it: these
    frames' detections (None: the frame failed); a segment whose frames all failed failed itself."""
    clip = steady(len(frames))
    starts = (0, *cuts)
    segments = tuple(Segment(first, stop) for first, stop in zip(starts, (*cuts, len(frames)), strict=True))
    outcomes = []
    for number, segment in enumerate(segments):
        mine = range(segment.first, segment.stop)
        if all(frames[f] is None for f in mine):
            outcomes.append(SegmentOutcome(number, error="a damaged stream"))
        else:
            done = [FrameOutcome(f, frames[f]) if frames[f] is not None else FrameOutcome(f, error="x") for f in mine]
            outcomes.append(SegmentOutcome(number, tuple(done)))
    return VideoPlan(clip, tuple(range(len(frames))), segments, 30.0), outcomes


def tracked(frames: list[Detections | None], cuts: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Each recognized frame's track ids when the clip is cut into segments at `cuts`."""
    plan, outcomes = segmented(frames, cuts)
    result = assemble_video(outcomes, plan, parse_video_options("qrcode", {"on_tile_error": "partial"}), 0.0)
    return [f.tracks for f in result.per_frame]


def test_the_tracks_do_not_depend_on_where_the_segments_are_cut():
    """Boxes drifting, missed now and then, low-scored: the segments' detections tracked in the merge give the same
    ids wherever the clip is cut, as one tracker over the whole clip gives."""
    frames = drifting(40)
    whole = tracked(frames)
    assert len({i for ids in whole for i in ids if i > 0}) >= 6
    for cuts in ((1,), (2,), (17,), (39,), (5, 6, 7, 30)):  # a track born in the frame before a cut (1) included
        assert tracked(frames, cuts) == whole, cuts


def test_an_object_missed_in_a_segments_first_frames_keeps_its_track():
    """A still box missed in frames 10 and 11, the first two of the second segment: one track."""
    frames = [boxes([(40, 30)]) if f not in (10, 11) else boxes([]) for f in range(20)]
    assert tracked(frames, (10,)) == [(1,)] * 10 + [()] * 2 + [(1,)] * 8


def test_a_track_that_begins_in_a_segments_last_frame_keeps_that_frame():
    """An object first seen in segment 0's last frame: ByteTrack confirms a track on its second detection, in the
    next segment; the object's first frame stays in its track."""
    frames = [boxes([(40, 30)] + ([(f, 5)] if f >= 9 else [])) for f in range(20)]
    assert tracked(frames, (10,)) == [(1,)] * 9 + [(1, 2)] * 11


def test_a_failed_segment_is_time_the_tracker_sees_nothing_in():
    """A still box, and a segment that failed: a track lost for less than a second (ByteTrack's buffer) goes on
    after it, one lost for longer ends and the box is a new track."""
    short = [boxes([(40, 30)]) if not 10 <= f < 20 else None for f in range(40)]
    assert tracked(short, (10, 20)) == [(1,)] * 30
    long = [boxes([(40, 30)]) if not 10 <= f < 50 else None for f in range(70)]
    assert tracked(long, (10, 50)) == [(1,)] * 10 + [(2,)] * 20


def test_a_payload_joins_tracks_whatever_the_gap_but_not_two_seen_together():
    gone = [boxes([(0, 0)], "A") if f < 5 else boxes([(90, 0)], "A") if 50 <= f < 55 else boxes([]) for f in range(60)]
    twins = [boxes([(0, 50), (60, 50)], "B")] * 5
    tracks, ids = track_clip(list(enumerate(gone + twins)), 30.0)
    assert sorted((t.text, t.first, t.last) for t in tracks) == [("A", 0, 54), ("B", 60, 64), ("B", 60, 64)]
    assert [t.id for t in tracks] == [1, 2, 3]
    assert ids[:5] == ids[50:55] == [(1,)] * 5 and ids[60:] == [(2, 3)] * 5


# --- recognition and tracking on known clips ---------------------------------------------------------------------


def assert_tracks_follow_the_codes(result: dict, known: KnownClip, label: str, tolerance: float = 2.0) -> None:
    """Each code of `label` is one track (0 identity switches): seen in every frame it is whole in the frame, in no
    frame it is not inside it at all, its box within `tolerance` px of the truth; each frame's detections carry
    their track's id."""
    expected = {t for t, truths in known.truths.items() if label == ("aruco" if t.isdigit() else "qrcode")}
    assert sorted(t["text"] for t in result["tracks"]) == sorted(expected)
    for track in result["tracks"]:
        truths = {t.frame: t for t in known.truths[track["text"]]}
        rows = frames_of(track)
        seen = set(rows[:, 0].astype(int))
        assert {f for f, t in truths.items() if t.whole} <= seen <= set(truths), track["text"]
        errors = [np.abs(row[1:5] - np.asarray(truths[int(row[0])].truth.box)).max() for row in rows]
        assert max(errors) <= tolerance, (track["text"], max(errors))
        assert (track["first"], track["last"]) == (min(seen), max(seen))
    ids = {t["text"]: t["id"] for t in result["tracks"]}
    for frame in result["per_frame"]:
        for detection in frame["detections"]:
            assert detection["track"] == ids[detection["text"]]


def test_no_clip_overlaps_its_own_codes():
    assert overlapping(movers()) == []  # a covered code could not be read: the scene itself must not cover any


@pytest.mark.parametrize("recognizer", ["qrcode", "aruco"])
def test_each_code_is_one_track_from_entry_to_exit_in_process(known, in_process, recognizer):
    result = in_process[recognizer]
    assert result["frames"] == {"total": FRAMES, "processed": FRAMES, "skipped": 0, "failed": 0}
    assert result["tiling"]["segments"] == 5 and result["video"]["keyframes"] == FRAMES // GOP
    assert_tracks_follow_the_codes(result, known, recognizer)


def test_a_frame_step_and_a_time_range_count_frames_exactly(known):
    result = recognize_video(known.path, "qrcode", step=3, start=1.0, end=3.0, **OPTIONS).to_json()
    chosen = list(range(30, 90, 3))
    assert [f["frame"] for f in result["per_frame"]] == chosen
    assert result["frames"] == {"total": FRAMES, "processed": len(chosen), "skipped": FRAMES - len(chosen), "failed": 0}
    for track in result["tracks"]:
        assert set(frames_of(track)[:, 0].astype(int)) <= set(chosen)


def test_an_untiled_job_reads_each_frame_whole(known):
    result = recognize_video(known.path, "aruco", tiled=False, segment_frames=SEGMENT).to_json()
    assert result["tiling"]["tiles"] == 1
    assert_tracks_follow_the_codes(result, known, "aruco")


def test_a_folder_of_frames_is_a_clip(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    from pipeline.scenes.codes import moving_frame

    for frame in range(40):
        image, _ = moving_frame(WIDTH, HEIGHT, movers(), frame)
        cv2.imwrite(str(folder / f"{frame:05d}.png"), image)
    result = recognize_video(folder, "aruco", frame_rate=10, segment_frames=15, **{"tile": TILE, "overlap": OVERLAP})
    document = result.to_json()
    assert document["video"]["fps"] == 10 and document["frames"]["processed"] == 40
    assert sorted((t["text"], t["first"], t["last"]) for t in document["tracks"]) == [("3", 0, 39), ("7", 0, 39)]


# --- on workers ------------------------------------------------------------------------------------------------


def comparable(result: dict) -> dict:
    return {key: result[key] for key in ("frames", "per_frame", "tracks", "failed_segments", "failed_frames")}


def test_distributed_gives_the_same_result_as_in_process(worker, redis_server, known, in_process):
    job = submit_video(str(known.path), "qrcode", **OPTIONS)
    recognition = job.get(timeout=TIMEOUT)
    result = recognition.to_json()
    assert comparable(result) == comparable(in_process["qrcode"])  # the typed result gives the document back
    assert_tracks_follow_the_codes(result, known, "qrcode")
    ids = {track.text: track.id for track in recognition.tracks}
    assert sorted(ids) == ["alpha", "bravo", "charlie"]
    for frame in recognition.per_frame:
        assert list(frame.tracks) == [ids[text] for text in frame.detections.texts]
    assert job.progress() == (FRAMES, FRAMES)
    assert tilerec_keys(redis_server) == []


def test_an_uploaded_clip_gives_the_same_result(worker, redis_server, known):
    result = submit_video(known.path.read_bytes(), "aruco", **OPTIONS).get(timeout=TIMEOUT).to_json()
    assert_tracks_follow_the_codes(result, known, "aruco")
    assert tilerec_keys(redis_server) == []


def test_a_segment_of_an_uploaded_clip_reads_only_its_part_of_it(redis_server, tmp_path):
    """An upload is read by ranges: decoding the last 12 of 120 frames fetches the clip's index and the frames from
    the keyframe before them, not the whole clip (Redis's own count of the bytes it sent), and gives the frames the
    file gives."""
    noise = np.random.default_rng(3).integers(0, 256, (120, 240, 320), dtype=np.uint8)  # ~100 kB a frame encoded
    path = tmp_path / "noise.mp4"
    write_video(path, iter(noise), 30, gop=12)
    client = redis_server.client()
    data = path.read_bytes()
    stored = store.stored_input(client, store.put_bytes(client, data, 60))
    clip = probe(stored, "upload", 10**8)
    wanted = list(range(108, 120))

    def sent() -> int:
        return int(client.info("stats")["total_net_output_bytes"])

    before = sent()
    read = [picture for _, picture in read_frames(stored, "upload", clip, wanted, grey=True)]
    fetched = sent() - before
    client.delete(stored.key)
    assert fetched < len(data) / 3, (fetched, len(data))
    from_file = [picture for _, picture in read_frames(path, "file", clip, wanted, grey=True)]
    assert len(read) == 12 and all(np.array_equal(a, b) for a, b in zip(read, from_file, strict=True))


def test_a_process_killed_mid_segment_changes_nothing(worker, redis_server, red_clip):
    import tests.faulty

    recognizer = "tests.faulty:HoldsOnRed"
    undisturbed = submit_video(str(red_clip.path), recognizer, **OPTIONS).get(timeout=TIMEOUT).to_json()
    flag, held = IMAGES_ROOT / tests.faulty.HOLD_ON_RED, IMAGES_ROOT / tests.faulty.HELD
    held.unlink(missing_ok=True)
    flag.touch()
    try:
        job = submit_video(str(red_clip.path), recognizer, **OPTIONS)
        wait_for(held.exists, TIMEOUT)  # a process is in the middle of the third segment, at frame 60
        wait_for(lambda: held.read_text().strip().isdigit())
        os.kill(int(held.read_text()), signal.SIGKILL)
    finally:
        flag.unlink(missing_ok=True)
    assert comparable(job.get(timeout=TIMEOUT).to_json()) == comparable(undisturbed)
    assert_tracks_follow_the_codes(undisturbed, red_clip, "qrcode")
    wait_for(lambda: len(worker.child_pids()) == 2)
    assert tilerec_keys(redis_server) == []


def test_a_segment_that_always_kills_its_process_is_reported_in_a_partial_result(worker, redis_server, red_clip):
    result = submit_video(str(red_clip.path), "tests.faulty:CrashesOnRed", on_tile_error="partial",
                          **OPTIONS).get(timeout=TIMEOUT).to_json()  # fmt: skip
    assert [s["segment"] for s in result["failed_segments"]] == [2]
    assert "the worker process died all 3 times" in result["failed_segments"][0]["error"]
    first, stop = result["failed_segments"][0]["frames"]
    assert not any(first <= f["frame"] < stop for f in result["per_frame"])
    assert result["frames"]["processed"] == FRAMES - (stop - first)
    assert tilerec_keys(redis_server) == []


def test_a_cancelled_video_job_stops_and_leaves_nothing(worker, redis_server, red_clip):
    import tests.faulty

    held = IMAGES_ROOT / tests.faulty.HELD
    held.unlink(missing_ok=True)
    flag = IMAGES_ROOT / tests.faulty.HOLD_ON_RED
    flag.touch()
    try:
        job = submit_video(str(red_clip.path), "tests.faulty:HoldsOnRed", **OPTIONS)
        wait_for(held.exists, TIMEOUT)
        job.cancel()
    finally:
        flag.unlink(missing_ok=True)
    with pytest.raises(JobCancelled, match="was cancelled"):
        job.get(timeout=TIMEOUT)
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (truncated, "is truncated"),
        (lambda tmp: audio_only(tmp / "a.m4a"), "has no video stream"),
        (lambda tmp: (tmp / "t.mp4").write_text("not a video\n" * 40) and tmp / "t.mp4", "is not a video FFmpeg"),
    ],
)
def test_bad_videos_fail_the_job_in_one_line_and_leave_nothing(worker, redis_server, tmp_path, make, said):
    made = make(tmp_path)
    path = IMAGES_ROOT / f"bad-{made.name}"
    path.write_bytes(made.read_bytes())
    with pytest.raises(VideoError, match=said) as refused:
        submit_video(str(path), "qrcode").get(timeout=TIMEOUT)
    assert "\n" not in str(refused.value)
    assert tilerec_keys(redis_server) == []


def test_exports_follow_the_tracks(in_process):
    from pipeline.outputs.export import frame_lines, mot_lines

    result = in_process["aruco"]
    rows = [line.split(",") for line in mot_lines(result)]
    by_track = {t["id"]: t for t in result["tracks"]}
    assert len(rows) == sum(len(t["frames"]) for t in result["tracks"])
    for frame, track, x, y, w, h, *_ in rows[:50]:
        assert [int(frame) - 1, *map(float, (x, y, w, h))] in [r[:5] for r in by_track[int(track)]["frames"]]
    lines = [json.loads(line) for line in frame_lines(result)]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert {d["track"] for line in lines for d in line["detections"]} == set(by_track)


def test_no_detection_is_left_untracked_on_a_clean_clip(in_process):
    result = in_process["qrcode"]
    found = Detections.from_records([d for f in result["per_frame"] for d in f["detections"]])
    assert len(found) == sum(len(t["frames"]) for t in result["tracks"])


FLICKER_OPTIONS = {"tiled": False, "segment_frames": FLICKER_SEGMENT}


@pytest.fixture(scope="module")
def flicker() -> KnownClip:
    return write_flickering_clip(IMAGES_ROOT / "flickering.mp4")


@pytest.fixture(scope="module")
def flicker_job(worker, redis_server, flicker) -> dict:
    """The flickering clip's markers, ids forgotten, recognized by a job on the workers."""
    job = submit_video(str(flicker.path), "tests.faulty:UnnamedMarkers", **FLICKER_OPTIONS)
    return job.get(timeout=TIMEOUT).to_json()


def test_a_marker_missed_in_a_segments_first_frames_keeps_one_track(flicker, flicker_job, redis_server):
    """Markers without ids, each left out of some frames: two of them in the first frames of a segment, where a
    tracker that starts with the segment would lose them; each is one track, in every frame it is drawn in."""
    assert flicker_job["tiling"]["segment_frames"] == [[0, 30], [30, 60], [60, 90], [90, 120]]
    assert len(flicker_job["tracks"]) == 3 and all("text" not in track for track in flicker_job["tracks"])
    for track in flicker_job["tracks"]:
        rows = frames_of(track)
        marker = min(flicker.truths, key=lambda m: np.abs(rows[0, 1:5] - flicker.truths[m][0].truth.box).max())
        truths = {t.frame: t.truth.box for t in flicker.truths[marker]}
        assert [int(f) for f in rows[:, 0]] == sorted(truths), marker
        assert max(np.abs(row[1:5] - np.asarray(truths[int(row[0])])).max() for row in rows) <= 2.0
    assert tilerec_keys(redis_server) == []


def one_bytetrack(per_frame: list[dict], rate: float) -> set[tuple[tuple[int, int], ...]]:
    """The tracks one supervision ByteTrack makes of these frames' detections fed to it in order (a second's buffer,
    as tilerec's), each as its detections' (frame, x); ByteTrack reports a track from its second detection, or from
    its first in the first frame it is fed."""
    import supervision as sv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of the `trackers` package
        tracker = sv.ByteTrack(lost_track_buffer=30, frame_rate=rate, minimum_consecutive_frames=1)
    found = defaultdict(list)
    for frame in per_frame:
        records = frame["detections"]
        fed = sv.Detections(
            xyxy=Detections.from_records(records).xyxy, confidence=np.asarray([r["score"] for r in records])
        )
        reported = tracker.update_with_detections(fed)
        for box, track in zip(reported.xyxy, reported.tracker_id, strict=True):
            found[int(track)].append((frame["frame"], round(float(box[0]))))
    return {tuple(rows) for rows in found.values()}


def test_a_job_tracks_as_one_bytetrack_over_the_whole_clip_and_as_one_process(flicker, flicker_job):
    from tests.faulty import UnnamedMarkers

    in_process = recognize_video(flicker.path, UnnamedMarkers(), **FLICKER_OPTIONS).to_json()
    assert comparable(flicker_job) == comparable(in_process)
    tracks = defaultdict(list)
    for frame in flicker_job["per_frame"]:
        for record in frame["detections"]:
            tracks[record["track"]].append((frame["frame"], round(record["box"][0])))
    first = flicker_job["per_frame"][0]["frame"]
    assert {tuple(rows if rows[0][0] == first else rows[1:]) for rows in tracks.values()} == one_bytetrack(
        flicker_job["per_frame"], flicker_job["video"]["fps"]
    )


# --- the command line ------------------------------------------------------------------------------------------


def test_tilerec_run_writes_mot_text_and_an_annotated_mp4(worker, redis_server, known, tmp_path):
    from tests.test_cli import tilerec

    mot, annotated = tmp_path / "tracks.txt", tmp_path / "annotated.mp4"
    flags = ["--tile", str(TILE), "--overlap", str(OVERLAP), "--segment-frames", str(SEGMENT)]
    outputs = ["--json", str(mot), "--format", "mot", "--annotate", str(annotated)]
    cluster = ["--broker", redis_server.url, "--shared-path"]
    completed = tilerec("run", str(known.path), "-r", "aruco", *flags, *outputs, *cluster, timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr
    assert "120 frames recognized (0 skipped), 2 tracks (aruco 2) in 5 segments" in completed.stderr
    rows = [line.split(",") for line in mot.read_text().splitlines()]
    assert sorted({row[1] for row in rows}) == ["1", "2"] and len(rows) == 2 * FRAMES
    drawn = probe(annotated, "annotated.mp4", 10**8)
    assert (drawn.frames, drawn.width, drawn.height) == (FRAMES, WIDTH, HEIGHT)
    assert tilerec_keys(redis_server) == []


def test_tilerec_run_says_in_one_line_why_a_video_cannot_be_used(worker, redis_server, tmp_path):
    from tests.test_cli import one_error_line, tilerec

    audio = audio_only(IMAGES_ROOT / "only-audio.mp4")
    completed = tilerec("run", str(audio), "-r", "qrcode", "--broker", redis_server.url, "--shared-path")
    assert completed.returncode == 1
    assert "has no video stream (it has audio)" in one_error_line(completed)
    folder = tmp_path / "frames"
    folder.mkdir()
    refused = tilerec("run", str(folder), "-r", "qrcode", "--step", "2", "--broker", redis_server.url)
    assert refused.returncode == 2 and "--step is for a video" in one_error_line(refused)
    assert tilerec_keys(redis_server) == []


def test_tracks_without_payloads_follow_their_boxes_across_segments(known):
    """ArUco markers with their ids taken away: nothing but box overlap from frame to frame can make each marker one
    track across the 5 segments."""
    from tests.faulty import UnnamedMarkers

    result = recognize_video(known.path, UnnamedMarkers(), **OPTIONS).to_json()
    assert result["tiling"]["segments"] == 5
    assert len(result["tracks"]) == 2 and all("text" not in track for track in result["tracks"])
    for track in result["tracks"]:
        rows = frames_of(track)
        assert [int(f) for f in rows[:, 0]] == list(range(FRAMES))  # both markers are whole in every frame
        marker = min(("3", "7"), key=lambda m: np.abs(rows[0, 1:5] - known.truths[m][0].truth.box).max())
        truths = {t.frame: t.truth.box for t in known.truths[marker]}
        assert max(np.abs(row[1:5] - np.asarray(truths[int(row[0])])).max() for row in rows) <= 2.0


def test_a_frame_whose_tiles_fail_fails_the_job_or_is_listed_in_a_partial_result(red_clip):
    from pipeline.inference import TileFailure
    from pipeline.recognizers import get_recognizer
    from tests.faulty import has_red

    def raises_on_red(tile: np.ndarray) -> Detections:
        if has_red(tile):
            raise ValueError("red")
        return get_recognizer("qrcode")(cv2.cvtColor(tile, cv2.COLOR_BGR2GRAY) if tile.ndim == 3 else tile)

    with pytest.raises(TileFailure, match=r"0 of 5 segments and 5 frames failed: frame 60: tile 2: ValueError: red"):
        recognize_video(red_clip.path, raises_on_red, **OPTIONS)
    result = recognize_video(red_clip.path, raises_on_red, on_tile_error="partial", **OPTIONS).to_json()
    assert [f["frame"] for f in result["failed_frames"]] == [60, 61, 62, 63, 64]
    assert result["frames"] == {"total": FRAMES, "processed": FRAMES - 5, "skipped": 0, "failed": 5}
    assert sorted(t["text"] for t in result["tracks"]) == ["alpha", "bravo", "charlie"]  # tracks go on around them
