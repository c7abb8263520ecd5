"""`python -m bench.video [--frames 96] [--segments 0] [--repeats 3] [--sizes 1080p,4k] [--out FILE]`: frames per
second of a video job at W=2 (tilerec.recognize_video on a private cluster of 2 worker processes) against the user's
alternative, a loop in one process with the same decoder (PyAV, frames read in order), the same recognizer on the
same tiles and the same tracker (ByteTrack, one for the whole clip). The loop runs twice: at one thread (the
decoder's thread_count=1 and cv2.setNumThreads(1): the same work as a worker process does, on one core) and at its
libraries' default threads (FFmpeg's and OpenCV's pools over every core); both ratios are reported. Runs are
interleaved (the three in turn, the order rotating each repeat) and each records the load average and the CPU
seconds it used, for a shared machine. Each row also says what the job's plan costs on top of the loop's work:
frames decoded before a segment's first (from the keyframe before it); no frame is recognized twice (the merge
tracks the segments' detections through the clip with one tracker, as the loop does).

`python -m bench.video --merge --frames 18000`: the merge alone (it tracks the whole clip, serially) on the scenes'
boxes, no pixels: its seconds for a clip of that many frames.

`python -m bench.video --decoders`: PyAV against OpenCV's FFmpeg backend on the same clips: decoding speed (frames
read in order, as BGR), seek accuracy (a frame asked for by number, after a seek, is it that frame?), and what each
tells of the frame count, keyframes, rotation and a variable frame rate.

The clips are generated: QR codes moving at known speeds over a textured grey background, H.264 (x264 CRF 18,
a keyframe every 24 frames), 1920×1080 and 3840×2160; each frame carries its number in a row of black and white
blocks at the bottom, so a decoded frame says which it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.options import parse_video_options
from pipeline.scenes.codes import Mover, moving_frame, qr_sticker
from pipeline.video.clips import assemble_video, plan_video, run_segment
from pipeline.video.frames import probe, write_video

SIZES = {"1080p": (1920, 1080), "4k": (3840, 2160)}
OPTIONS = {"tile": 640, "overlap": 0.2}
GOP = 24
BITS = 12  # frame-number blocks at the bottom of each frame
BLOCK = 16
DEFAULT_CV_THREADS = cv2.getNumThreads()  # OpenCV's own choice, before anything changes it


def stamp(image: np.ndarray, number: int) -> np.ndarray:
    """The frame's number in BITS blocks along its bottom edge, black for 0 and white for 1."""
    for bit in range(BITS):
        image[-BLOCK:, bit * BLOCK : (bit + 1) * BLOCK] = 255 if number >> bit & 1 else 0
    return image


def read_stamp(image: np.ndarray) -> int:
    grey = image if image.ndim == 2 else image.mean(axis=2)
    return sum(1 << bit for bit in range(BITS) if grey[-BLOCK:, bit * BLOCK : (bit + 1) * BLOCK].mean() > 128)


def scene(width: int, height: int, seed: int = 0) -> tuple[list[Mover], np.ndarray]:
    """The clip's QR codes (one per half megapixel, at least 4) drifting at their own speeds, and its background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(120, 200, (height // 8, width // 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    count = max(4, width * height // 500_000)
    movers = [
        Mover(qr_sticker(f"code-{n}", 6), (int(rng.integers(0, width - 200)), int(rng.integers(0, height - 240))),
              (int(rng.integers(-4, 5)), int(rng.integers(-3, 4))))
        for n in range(count)
    ]  # fmt: skip
    return movers, background


def write_clip(path: Path, width: int, height: int, frames: int, seed: int = 0) -> None:
    """QR codes drifting across the frame (some through tile seams), a numbered frame each."""
    movers, background = scene(width, height, seed)

    def pictures():
        for frame in range(frames):
            image, _ = moving_frame(width, height, movers, frame, background=0)
            image = np.where(image == 0, background, image)
            yield stamp(image, frame)

    write_video(path, pictures(), 30, gop=GOP, quality=18)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_s(pids: list[int]) -> float:
    """CPU time (user + system) these processes have used so far, from /proc: what a run costs in work, which a
    loaded machine stretches far less than it stretches wall time."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def opencv_threads(threads: int) -> Iterator[None]:
    """OpenCV's pool at `threads` (0: its default) for the block, then as it was."""
    was = cv2.getNumThreads()
    cv2.setNumThreads(threads or DEFAULT_CV_THREADS)
    try:
        yield
    finally:
        cv2.setNumThreads(was)


def single_loop(path: Path, recognizer: str, threads: int = 0) -> dict[str, float]:
    """The user's alternative: one process reads the clip in order and recognizes and tracks every frame (the
    plan's one segment, then the same tracking as a job's merge), its decoder and OpenCV at `threads` (0: their
    defaults). Returns its seconds, frames, tracked detections and CPU seconds (all its threads)."""
    with opencv_threads(threads):
        began, spent = time.perf_counter(), time.process_time()
        options = parse_video_options(recognizer, {**OPTIONS, "segment_frames": 10**9})
        clip = probe(path, str(path), 10**10)
        plan = plan_video(clip, options)
        outcome = run_segment(path, str(path), plan, 0, options, threads=threads)
        result = assemble_video([outcome], plan, options, time.time())
        return {"s": time.perf_counter() - began, "frames": len(result.per_frame),
                "tracked": sum(len(t.rows) for t in result.tracks), "cpu_s": time.process_time() - spent}  # fmt: skip


def plan_costs(path: Path, recognizer: str, segment_frames: int | None) -> dict[str, int]:
    """What the W=2 job's plan adds to the loop's work: its segments, and the frames decoded only to reach a
    segment's first (from the keyframe before it)."""
    options = parse_video_options(recognizer, {**OPTIONS, "segment_frames": segment_frames})
    plan = plan_video(probe(path, str(path), 10**10), options)
    lead_in = sum(s.first - plan.clip.keyframe_before(s.first) for s in plan.segments)
    return {"segments": len(plan.segments), "lead_in_frames": lead_in}


def distributed(path: Path, recognizer: str, segment_frames: int | None, cluster: Any) -> dict[str, float]:
    """The same clip as a video job on the running private cluster (W=2): as `single_loop`'s, with the CPU seconds
    of its worker's processes (the main one and the pool's), of its redis-server and of this client, and the
    seconds of its serial parts (the probe before the segments, the merge after them)."""
    from tasks.client import submit_video

    pids = [cluster.worker.process.pid, *cluster.worker.child_pids(), cluster.redis.process.pid]
    began, spent, used = time.perf_counter(), time.process_time(), cpu_s(pids)
    result = submit_video(str(path), recognizer, segment_frames=segment_frames, **OPTIONS).get(timeout=3600)
    cpu = cpu_s(pids) - used + time.process_time() - spent
    tracked = sum(len(t.rows) for t in result.tracks)
    serial = result.timings["probe_s"] + result.timings["merge_s"]
    return {"s": time.perf_counter() - began, "frames": len(result.per_frame), "tracked": tracked, "cpu_s": cpu,
            "serial_s": serial}  # fmt: skip


def compare(
    folder: Path, sizes: list[str], frames: int, repeats: int, recognizer: str, segments: int
) -> list[dict[str, Any]]:
    from tasks.cli.clusters import configure_app
    from tasks.local import LocalCluster

    clips = {}
    for size in sizes:
        width, height = SIZES[size]
        clips[size] = folder / f"clip-{size}.mp4"
        write_clip(clips[size], width, height, frames)
    length = -(-frames // segments) if segments else None  # None: the job's own plan, as a user gets it
    rows = []
    with LocalCluster(workers=2, env={"TILEREC_ALLOWED_ROOTS": str(folder)}) as cluster:
        configure_app(cluster.url, cluster.url, cluster.url)
        distributed(clips[sizes[0]], recognizer, length, cluster)  # the processes build their recognizers
        single_loop(clips[sizes[0]], recognizer)  # and this one
        for size in sizes:
            order = [("loop, 1 thread", partial(single_loop, threads=1)),
                     ("loop, default threads", single_loop),
                     ("W=2", partial(distributed, segment_frames=length, cluster=cluster))]  # fmt: skip
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in order}
            for repeat in range(repeats):
                for name, run in order[repeat % 3 :] + order[: repeat % 3]:
                    before = load()
                    ran = run(clips[size], recognizer)
                    runs[name].append({**{key: round(value, 3) for key, value in ran.items()},
                                       "fps": round(ran["frames"] / ran["s"], 3),
                                       "cores": round(ran["cpu_s"] / ran["s"], 2),
                                       "load": [before, load()]})  # fmt: skip
            median = {key: {name: statistics.median(r[key] for r in found) for name, found in runs.items()}
                      for key in ("fps", "cpu_s", "cores")}  # fmt: skip
            fps, cpu = median["fps"], median["cpu_s"]
            rows.append({"size": size, "frames": frames, "recognizer": recognizer,
                         **plan_costs(clips[size], recognizer, length), "runs": runs, "median": median,
                         "speedup_vs_one_thread": round(fps["W=2"] / fps["loop, 1 thread"], 3),
                         "speedup_vs_default_threads": round(fps["W=2"] / fps["loop, default threads"], 3),
                         "cpu_ratio_vs_one_thread": round(cpu["W=2"] / cpu["loop, 1 thread"], 3)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def decoders(folder: Path, sizes: list[str], frames: int) -> list[dict[str, Any]]:
    """PyAV against OpenCV's FFmpeg backend, clip by clip."""

    from pipeline.video.frames import read_frames

    rows = []
    rng = np.random.default_rng(1)
    for size in sizes:
        width, height = SIZES[size]
        path = folder / f"decode-{size}.mp4"
        write_clip(path, width, height, frames)
        clip = probe(path, str(path), 10**10)
        targets = sorted(int(t) for t in rng.choice(np.arange(1, frames), size=min(10, frames - 1), replace=False))
        began = time.perf_counter()
        pyav_numbers = [read_stamp(p) for _, p in read_frames(path, str(path), clip, list(range(frames)))]
        pyav_s = time.perf_counter() - began
        pyav_seeks = [read_stamp(next(iter(read_frames(path, str(path), clip, [t])))[1]) == t for t in targets]
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        began = time.perf_counter()
        cv_numbers = []
        while True:
            ok, image = capture.read()
            if not ok:
                break
            cv_numbers.append(read_stamp(image))
        cv_s = time.perf_counter() - began
        cv_seeks = []
        for target in targets:
            capture.set(cv2.CAP_PROP_POS_FRAMES, target)
            ok, image = capture.read()
            cv_seeks.append(ok and read_stamp(image) == target)
        rows.append({
            "size": size, "frames": frames, "load": load(),
            "pyav": {"decode_fps": round(frames / pyav_s, 1), "in_order": pyav_numbers == list(range(frames)),
                     "seeks_exact": f"{sum(pyav_seeks)}/{len(targets)}", "frame_count": clip.frames,
                     "keyframes": list(clip.keyframes)},
            "opencv": {"decode_fps": round(len(cv_numbers) / cv_s, 1), "in_order": cv_numbers == list(range(frames)),
                       "seeks_exact": f"{sum(cv_seeks)}/{len(targets)}",
                       "frame_count": int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), "keyframes": None},
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    rows.append(vfr_counts(folder))
    if REAL_CLIP.exists():
        rows.append(real_seeks(REAL_CLIP))
    return rows


REAL_CLIP = Path(__file__).resolve().parents[2] / "shared" / "video" / "bikes.mp4"


def real_seeks(path: Path, tries: int = 20) -> dict[str, Any]:
    """A real camera file (B-frames, shot cuts): does a frame decoded after a seek equal the same frame decoded in
    order, for each decoder?"""

    from pipeline.video.frames import read_frames

    clip = probe(path, str(path), 10**10)
    in_order = [p for _, p in read_frames(path, str(path), clip, list(range(clip.frames)))]
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    cv_order = []
    while (found := capture.read())[0]:
        cv_order.append(found[1])
    targets = sorted(int(t) for t in np.random.default_rng(2).choice(np.arange(1, clip.frames), tries, replace=False))
    pyav_exact = cv_exact = 0
    for target in targets:
        (_, picture), *_ = read_frames(path, str(path), clip, [target])
        pyav_exact += bool(np.array_equal(picture, in_order[target]))
        capture.set(cv2.CAP_PROP_POS_FRAMES, target)
        ok, image = capture.read()
        cv_exact += bool(ok and target < len(cv_order) and np.array_equal(image, cv_order[target]))
    return {"clip": path.name, "frames": clip.frames, "pyav": {"seeks_exact": f"{pyav_exact}/{tries}",
            "frame_count": clip.frames}, "opencv": {"seeks_exact": f"{cv_exact}/{tries}",
            "frame_count": int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), "frames_read": len(cv_order)}}  # fmt: skip


def vfr_counts(folder: Path) -> dict[str, Any]:
    """A variable-frame-rate clip (frames 20 and 80 ms apart, in turn): the frame count and times each reports."""
    import av

    path = folder / "vfr.mp4"
    base = Fraction(1, 1000)
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=30, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.codec_context.time_base = base
        for number in range(60):
            frame = av.VideoFrame.from_ndarray(stamp(np.full((240, 320), 128, np.uint8), number), format="gray")
            frame.pts, frame.time_base = 50 * (number // 2) + 20 * (number % 2), base
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    clip = probe(path, str(path), 10**10)
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    return {"vfr_clip_frames": 60, "pyav": {"frames": clip.frames, "vfr": clip.vfr, "last_time_s": clip.times[-1]},
            "opencv": {"frames": int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
                       "fps": round(capture.get(cv2.CAP_PROP_FPS), 3)}}  # fmt: skip


def boxes_at(movers: list[Mover], frame: int, width: int, height: int, period: int = 96) -> Detections:
    """The detections of the codes wholly inside the frame at `frame`, with their payloads (what `qrcode` finds);
    the codes go back and forth along their first `period` frames' paths, so a long clip has them all along."""
    step = frame % (2 * period)
    step = min(step, 2 * period - step)
    boxes = [(x + m.sticker.box[0], y + m.sticker.box[1], m.sticker.box[2], m.sticker.box[3], m.sticker.text)
             for m in movers for x, y in [m.at(step)]]  # fmt: skip
    inside = [b for b in boxes if b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= width and b[1] + b[3] <= height]
    xyxy = np.asarray([[x, y, x + w, y + h] for x, y, w, h, _ in inside], float).reshape(-1, 4)
    return Detections(xyxy, np.ones(len(inside)), ["qrcode"] * len(inside), [b[4] for b in inside])


def merge_cost(sizes: list[str], frames: int, repeats: int) -> list[dict[str, Any]]:
    """The merge alone, which tracks the whole clip: the scene's codes' boxes in every frame (from their paths, no
    pixels: what recognition finds in the generated clips), stored as the job's segments (its own plan) would
    store them, then read, assembled and written as the merge task does. Returns, by size, the median seconds of
    `repeats` runs and the milliseconds a frame."""
    from pipeline.video.clips import FrameOutcome, SegmentOutcome
    from pipeline.video.frames import Clip

    rows = []
    for size in sizes:
        width, height = SIZES[size]
        movers, _ = scene(width, height)
        clip = Clip(width, height, frames, 30.0, tuple(f / 30 for f in range(frames)), tuple(range(0, frames, GOP)))
        options = parse_video_options("qrcode", OPTIONS)
        plan = plan_video(clip, options)
        records = [
            json.dumps(SegmentOutcome(n, tuple(FrameOutcome(f, boxes_at(movers, f, width, height))
                                               for f in plan.wanted(n))).to_json())
            for n in range(len(plan.segments))
        ]  # fmt: skip
        spent = []
        for _ in range(repeats):
            began = time.perf_counter()
            outcomes = [SegmentOutcome.from_json(json.loads(record)) for record in records]
            document = assemble_video(outcomes, plan, options, time.time()).to_json()
            json.dumps(document)
            spent.append(time.perf_counter() - began)
        seconds = statistics.median(spent)
        detections = sum(len(f.detections) for o in outcomes for f in o.frames if f.detections is not None)
        rows.append({"clip": size, "frames": frames, "segments": len(plan.segments), "detections": detections,
                     "tracks": len(document["tracks"]), "merge_s": round(seconds, 3),
                     "ms_a_frame": round(1000 * seconds / frames, 3), "load": load()})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=96, help="frames per clip")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved")
    parser.add_argument("--sizes", default="1080p,4k", help="of " + ", ".join(SIZES))
    parser.add_argument("--recognizer", default="qrcode")
    parser.add_argument("--segments", type=int, default=0, help="segments of the W=2 job (0: the job's own plan)")
    parser.add_argument("--decoders", action="store_true", help="PyAV against OpenCV's FFmpeg backend instead")
    parser.add_argument("--merge", action="store_true", help="the merge alone (it tracks the whole clip) instead")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    with tempfile.TemporaryDirectory(prefix="tilerec-bench-video-") as folder:
        if args.decoders:
            rows = decoders(Path(folder), sizes, args.frames)
        elif args.merge:
            rows = merge_cost(sizes, args.frames, args.repeats)
        else:
            rows = compare(Path(folder), sizes, args.frames, args.repeats, args.recognizer, args.segments)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
