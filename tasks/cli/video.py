"""`tilerec run CLIP` for video: one video job (tasks.client.submit_video) with a progress bar in frames, its result
as tilerec's JSON, MOTChallenge text or JSON lines per frame, and an annotated MP4 with boxes and track ids.

A video is told from an image by its name (pipeline.video.frames.VIDEO_SUFFIXES); a folder is a folder of frames only
with --frames (without it, a folder's images are separate image jobs, as ever)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.options import VIDEO_DEFAULTS, VIDEO_OPTIONS, parse_video_options
from pipeline.outputs.export import frame_lines, mot_lines
from pipeline.readers import remote
from pipeline.readers.images import ImageError
from pipeline.video.clips import VideoRecognition, annotated_frames, open_clip
from pipeline.video.frames import FOLDER_RATE, is_video_name, write_video
from tasks.cli.clusters import ignoring_interrupts, open_cluster
from tasks.cli.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, CliError, print_error, say
from tasks.cli.inputs import Target, positive_float, positive_int
from tasks.cli.settings import RunSettings

VIDEO_FORMATS = ("json", "mot", "jsonl")
ANNOTATE_SUFFIXES = (".mp4", ".mkv", ".mov")


def add_video_flags(parser: argparse.ArgumentParser) -> None:
    """Video options of `run` (docs/video.md)."""
    parser.add_argument("--frames", action="store_true", help="the folder given is one clip of its image files, "
                        "in name order (zero-padded numbers)")  # fmt: skip
    parser.add_argument(
        "--step", type=positive_int, metavar="N", help=f"video: every N-th frame (default {VIDEO_DEFAULTS.step})"
    )
    parser.add_argument("--fps", type=positive_float, metavar="F", help="video: F frames a second, evenly in time")
    parser.add_argument(
        "--start", type=float, metavar="S", help=f"video: from S seconds (default {VIDEO_DEFAULTS.start:g})"
    )
    parser.add_argument("--end", type=float, metavar="S", help="video: up to S seconds (default: the end)")
    parser.add_argument("--no-tiling", dest="tiled", action="store_false", default=None,
                        help="video: recognize each frame whole (its --roi), not tiled")  # fmt: skip
    parser.add_argument("--segment-frames", type=positive_int, metavar="N",
                        help="video: recognized frames per segment task (default: from the clip)")  # fmt: skip
    parser.add_argument(
        "--frame-rate", type=positive_float, metavar="F", help=f"--frames: the clip's rate (default {FOLDER_RATE:g})"
    )


def is_video_run(args: argparse.Namespace) -> bool:
    """The run is of a video: --frames, or one input named like a video file. Video flags on images are refused
    (a folder of frames given without --frames would otherwise run as separate images)."""
    if args.frames or any(is_video_name(given) for given in args.images):
        return True
    used = [name for name in VIDEO_OPTIONS if getattr(args, name, None) is not None]
    if used:
        flag = "--no-tiling" if used[0] == "tiled" else "--" + used[0].replace("_", "-")
        raise CliError(f"{flag} is for a video: a clip, or a folder of frames read as one clip with --frames")
    return False


def video_options(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The image job options plus the video flags the user set, checked with the workers' own parser."""
    chosen = {**options, **{name: getattr(args, name) for name in VIDEO_OPTIONS if getattr(args, name) is not None}}
    try:
        parse_video_options(args.recognizer, chosen)
    except ValueError as error:
        raise CliError(str(error)) from None
    return chosen


def check_video(args: argparse.Namespace) -> Target:
    """The one clip of the run, checked here: it exists (a folder only with --frames), outputs make sense."""
    if len(args.images) != 1 or args.list or args.coco_images:
        raise CliError("run one video (or --frames folder) at a time")
    given = args.images[0]
    if args.format not in VIDEO_FORMATS:
        raise CliError(f"--format {args.format} is for images; a video's are {', '.join(VIDEO_FORMATS)}")
    if args.annotate and not args.annotate.lower().endswith(ANNOTATE_SUFFIXES):
        raise CliError(f"--annotate {args.annotate!r}: a video is annotated as {', '.join(ANNOTATE_SUFFIXES)}")
    if args.view:
        raise CliError("--view shows images; a video's result has its tracks and per-frame detections")
    if remote.is_url(given):
        if args.annotate:
            raise CliError("--annotate draws on local videos only")
        return Target(given, None)
    path = Path(given).expanduser()
    if not path.exists():
        raise CliError(f"cannot read video {given!r}: no such file or folder")
    if path.is_dir() != bool(args.frames):
        raise CliError(f"{given!r} is a folder: give --frames to read it as one clip" if path.is_dir() else
                       f"--frames reads a folder of frames; {given!r} is a file")  # fmt: skip
    return Target(given, path.resolve())


def run_video(args: argparse.Namespace, options: dict[str, Any], settings: RunSettings, console: Console) -> int:
    """One video job on the chosen cluster, its outputs written; a timeout or an interrupt cancels it."""
    from tasks.client import submit_video

    target = check_video(args)
    chosen = video_options(args, options)
    live = console.is_terminal and not settings.quiet
    began = time.monotonic()
    with open_cluster([target], settings, console) as cluster:
        if cluster.upload and clip_is_folder(target):
            raise CliError("a --frames folder is read by the workers themselves: give --shared-path (they must see it)")
        job = submit_video(target.__fspath__(), args.recognizer, upload=cluster.upload, **chosen)
        bar = Progress(TextColumn(target.given), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn("frames"),
                       TimeRemainingColumn(), console=console) if live else None  # fmt: skip
        line = bar.add_task(target.given, total=None) if bar else None
        try:
            if bar:
                bar.start()
            while not job.result.ready():
                done, total = job.progress()
                if bar:
                    bar.update(line, completed=done, total=total)
                cluster.check()
                if settings.timeout is not None and time.monotonic() - began > settings.timeout:
                    raise CliError(f"timed out after {settings.timeout:g} s", EXIT_TIMEOUT)
                time.sleep(0.2)
            result = replace(job.get(), source=target.given)
        except BaseException as error:
            with ignoring_interrupts():
                if not job.result.ready():
                    job.cancel()
            if isinstance(error, (CliError, KeyboardInterrupt)):
                raise
            print_error(f"{target.given}: {type(error).__name__}: {error}")
            return EXIT_FAILED
        finally:
            if bar:
                bar.stop()
    write_video_outputs(target, result, args.json, args.format, args.annotate)
    if not settings.quiet:
        say(console, summary(target, result, time.monotonic() - began))
    return EXIT_OK


def summary(target: Target, result: VideoRecognition, seconds: float) -> str:
    labels = Counter(track.label for track in result.tracks)
    per_label = ", ".join(f"{label} {n}" for label, n in sorted(labels.items())) or "none"
    failed = f", {len(result.failed_segments)} segments failed" if result.failed_segments else ""
    return (f"{target.given}: {len(result.per_frame)} frames recognized ({result.skipped} skipped), "
            f"{len(result.tracks)} tracks ({per_label}) in {len(result.segments)} segments{failed}, "
            f"{seconds:.1f} s")  # fmt: skip


def write_video_outputs(target: Target, result: VideoRecognition, json_to: str | None, fmt: str,
                        annotate: str | None) -> None:  # fmt: skip
    """--json in the chosen format (- for stdout), and --annotate as an MP4 drawn from the local clip."""
    document = result.to_json()
    if json_to is not None:
        if fmt == "json":
            text = json.dumps(document, indent=2) + "\n"
        else:
            text = "".join(line + "\n" for line in (mot_lines(document) if fmt == "mot" else frame_lines(document)))
        _write_text(json_to, text)
    if annotate is not None and target.path is not None:
        try:
            source, clip = open_clip(target.path, 2**62, result.clip.fps if clip_is_folder(target) else None)
            Path(annotate).parent.mkdir(parents=True, exist_ok=True)
            write_video(Path(annotate), annotated_frames(source, target.given, clip, document), clip.fps)
        except (ImageError, OSError) as error:
            raise CliError(f"cannot write the annotated video {annotate!r}: {error}", EXIT_FAILED) from None


def clip_is_folder(target: Target) -> bool:
    return target.path is not None and target.path.is_dir()


def _write_text(destination: str, text: str) -> None:
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        Path(destination).write_text(text)
    except OSError as error:
        raise CliError(f"cannot write {destination!r}: {error.strerror or error}", EXIT_FAILED) from None
