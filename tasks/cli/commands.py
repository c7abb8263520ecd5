"""`tilerec`, the command line: recognize objects in large images on a Celery cluster, or on a private one.

  tilerec run IMAGE [IMAGE ...] --recognizer NAME [options]   recognize images as concurrent jobs
  tilerec run CLIP.mp4 | --frames DIR -r NAME [--annotate OUT.mp4]   a video: tracks through the whole clip
  tilerec run DIR/ | 'GLOB' | --list F | --coco-images D.json --out OUT [--resume]   many images, resumable
  tilerec evaluate RESULTS --truth DATASET.json [--json OUT]   COCO metrics of a run against ground truth
  tilerec recognizers [--json]                                 the recognizers, their parameters and defaults
  tilerec demo [--size WxH] [--out DIR]                        a synthetic scene with known QR codes, end to end
  tilerec view RESULT.json [--image PATH] [--export DIR]       the detections over the image, in a deep-zoom viewer
  tilerec gallery add|list|rename|remove …                     the people that `run --identify G` names
  tilerec worker [CELERY WORKER OPTIONS]                       exec `celery -A tasks worker` with those options

Where jobs run: with --broker URL (or TILEREC_BROKER_URL) jobs go to that cluster and image bytes are uploaded to
its Redis (its workers may not see this machine's files; --shared-path sends paths instead). Without a broker,
`run` and `demo` start a private cluster (a redis-server on a free port and one `celery worker`), and stop it on
exit, on error and on Ctrl-C.

Output: data (`--json -`) goes to stdout; progress bars, the summary and messages go to stderr, and bars are drawn
only on a terminal, so scripts get clean output. Errors are one line: `tilerec: error: …`.
Exit codes: 0 success, 1 a job failed, 2 bad arguments or unreadable input, 3 broker or cluster unreachable,
4 timed out, 130 interrupted (143 on SIGTERM).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import cv2
import redis
from kombu.exceptions import OperationalError
from rich.console import Console
from rich.table import Table

from pipeline.merge.detections import MATCH_METRICS, MERGE_METHODS
from pipeline.model import Recognition
from pipeline.options import DEFAULTS, ON_TILE_ERROR, parse_options
from pipeline.readers import remote
from pipeline.recognizers import available
from pipeline.recognizers.dnn import OnnxObjects, plan_execution
from pipeline.scenes.codes import qr_scene, score
from tasks.cli.clusters import exec_worker, ping, remote_cluster
from tasks.cli.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    Interrupted,
    markup_safe,
    print_error,
    say,
)
from tasks.cli.evaluate import add_evaluate
from tasks.cli.gallery import add_gallery
from tasks.cli.inputs import (
    add_read_flags,
    annotate_paths,
    check_image,
    job_options,
    parse_size,
    positive_float,
    positive_int,
)
from tasks.cli.jobs import execute
from tasks.cli.many import is_many, run_many
from tasks.cli.output import report_failures, summarize, write_annotated, write_json, write_outputs
from tasks.cli.settings import environment, run_settings, set_up
from tasks.cli.video import VIDEO_FORMATS, add_video_flags, is_video_run, run_video
from tasks.cli.view import Viewed, add_view_parser, open_pyramid, view


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: usage is a `--help` away, a script's log wants the reason."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    options = job_options(args)
    if args.format in ("coco", "geojson", "text", "hocr") and args.json is None:
        raise CliError(f"--format {args.format} needs --json OUT (or --json - for stdout)")
    if args.wgs84 and args.format != "geojson":
        raise CliError("--wgs84 is for --format geojson")
    from tasks.celery import settings

    if not (args.images or args.list or args.coco_images):
        raise CliError("run needs images: files, a folder, a glob pattern, --list FILE or --coco-images DATASET.json")
    if args.view and (len(args.images) != 1 or is_many(args)):
        raise CliError("--view shows one image; run the images, then `tilerec view` each result")
    if args.view and remote.is_url(args.images[0]):
        raise CliError("--view shows local images; `tilerec view` the result with --image PATH of a local copy")
    if is_video_run(args):
        return run_video(args, options, run_settings(args, console), console)
    if args.format in VIDEO_FORMATS[1:]:
        raise CliError(
            f"--format {args.format} is for a video (its tracks); images take json, coco, geojson, text or hocr"
        )
    if is_many(args):
        return run_many(args, options, run_settings(args, console), console, settings().max_pixels)
    targets = [check_image(given, settings().max_pixels) for given in args.images]
    annotated = annotate_paths(args.annotate, targets)
    settings = run_settings(args, console)
    outcomes = execute(targets, args.recognizer, options, settings, console)
    write_outputs(outcomes, args.json, args.format, annotated, args.wgs84)
    if not args.quiet:
        summarize(outcomes, console)
    code = report_failures(outcomes)
    if args.view and outcomes[0].result is not None:
        spec = parse_options(args.recognizer, options).read_spec()
        viewed = Viewed(outcomes[0].result, open_pyramid(targets[0].path, outcomes[0].result, spec))
        return max(code, view(viewed, "127.0.0.1", 0, True, console))
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel jobs on a running cluster by id (what `tilerec run` and `Job.id` give)."""
    settings = replace(run_settings(args), quiet=True)
    if not settings.broker:
        raise CliError("cancel needs the cluster: --broker URL or TILEREC_BROKER_URL")
    with remote_cluster(settings.broker, settings, Console(stderr=True)):
        from tasks.client import cancel

        for job_id in args.job_ids:
            cancel(job_id)
            print(f"cancelled {job_id}", file=sys.stderr)
    return 0


def param_text(key: str, value: Any) -> str:
    """`key=value` as it would be typed after --param: plain strings bare, everything else as JSON."""
    plain = isinstance(value, str) and value and value == value.strip() and not value.startswith(("{", "[", '"'))
    return f"{key}={value if plain else json.dumps(value, default=str)}"


def executions() -> dict[str, Any]:
    """Where ONNX Runtime sessions run: here, as a worker started on this machine would run them (its settings,
    this onnxruntime), and with a broker (TILEREC_BROKER_URL) on each worker that answers within a second."""
    from tasks.celery import app, settings

    configured = settings()
    here = plan_execution(configured.onnx_providers, configured.device, configured.onnx_providers_strict)
    listing: dict[str, Any] = {"local": here.to_json()}
    broker = environment().broker
    if broker:
        ping(broker, "broker")  # unreachable: fails within seconds, as `run` does
        replies = app.control.broadcast("tilerec_execution", reply=True, timeout=1.0)
        listing["workers"] = {host: reply for answer in replies for host, reply in answer.items()}
    return listing


def cmd_recognizers(args: argparse.Namespace) -> int:
    specs = available()
    if args.json:
        listed = [
            {"name": s.name, "description": s.description, "params": dict(s.params), "cost_ms": s.cost_ms}
            for s in specs
        ]
        on_onnx_runtime = [entry for entry, spec in zip(listed, specs, strict=True) if spec.factory is OnnxObjects]
        if on_onnx_runtime:
            found = executions()
            for entry in on_onnx_runtime:
                entry["execution"] = found
        print(json.dumps(listed, indent=2, default=str))
        return EXIT_OK
    console = Console()
    rows = [(s.name, [param_text(key, value) for key, value in s.params.items()], s) for s in specs]
    if not console.is_terminal:
        width = max(len(name) for name, _, _ in rows) + 2
        for name, params, spec in rows:
            print(f"{name:{width}}{spec.description}")
            print(f"{'':{width}}params: {' '.join(params) or '(none)'}")
        return EXIT_OK
    table = Table(title="recognizers (set a parameter with --param key=value)", title_justify="left")
    for column in ("name", "parameters (defaults)", "cost ms/tile", "description"):
        table.add_column(column)
    for name, params, spec in rows:
        shown = "\n".join(markup_safe(param) for param in params) or "-"
        table.add_row(markup_safe(name), shown, f"{spec.cost_ms:g}", markup_safe(spec.description))
    console.print(table)
    return EXIT_OK


def demo_count(width: int, height: int) -> int:
    """About two codes per megapixel, like `qr_scene`'s own default (12 in 3000x2000)."""
    return max(1, round(width * height / 500_000))


def cmd_demo(args: argparse.Namespace) -> int:
    """Scene with known QR codes → PNG → the cluster → JSON and annotated PNG → found vs known."""
    console = Console(stderr=True)
    width, height = args.size
    count = args.count or demo_count(width, height)
    try:
        scene = qr_scene(width, height, count=count, seed=args.seed)
    except ValueError as error:
        raise CliError(f"cannot make a {width}x{height} demo scene with {count} QR codes: {error}") from None
    out = Path(args.out)
    image_path, truth_path = out / "scene.png", out / "truth.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(image_path), scene.image):
            raise OSError(f"OpenCV could not write {image_path}")
    except OSError as error:
        raise CliError(f"cannot write the demo scene to {str(out)!r}: {error}", EXIT_FAILED) from None
    write_json(str(truth_path), [{"label": t.label, "box": list(t.box), "text": t.text} for t in scene.truths])
    if not args.quiet:
        say(console, f"tilerec: wrote {image_path} ({width}x{height}, {count} QR codes; ground truth in {truth_path})")
    target = check_image(str(image_path))
    outcomes = execute([target], "qrcode", {}, run_settings(args, console), console)
    if report_failures(outcomes) != EXIT_OK:
        return EXIT_FAILED
    result = outcomes[0].result
    assert result is not None
    write_json(str(out / "scene.json"), result.to_json())
    write_annotated(target, result, out / "scene-annotated.png")
    if not args.quiet:
        summarize(outcomes, console)
    return report_demo(scene, result, out, args.quiet)


def report_demo(scene: Any, result: Recognition, out: Path, quiet: bool) -> int:
    """Found vs known on stdout; success only if every code was found once and nothing else was reported."""
    found = score(result.detections, scene.truths)
    seen = set(result.detections.texts)
    missed = [truth.text for truth in scene.truths if truth.text not in seen]
    if not quiet:
        print(
            f"found {found.found} of {found.truths} known QR codes "
            f"(duplicates {found.duplicates}, false positives {found.false_positives}, mean IoU {found.mean_iou:.3f})"
        )
        if missed:
            print(f"missed: {', '.join(str(text) for text in missed)}")
        print(f"outputs in {out}: scene.png, truth.json, scene.json, scene-annotated.png")
    if found.found == found.truths and not found.duplicates and not found.false_positives:
        return EXIT_OK
    print_error(f"the demo found {found.found} of {found.truths} QR codes with {found.false_positives} false positives")
    return EXIT_FAILED


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="submit to this cluster's broker (default: TILEREC_BROKER_URL; without one a private local cluster "
        "is started)",
    )
    parser.add_argument(
        "--workers", type=positive_int, metavar="N", help="worker processes of the local cluster (default: CPU count)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help="give up when the jobs are not done after S seconds (exit code 4)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress, no summary: only errors (and --json -)"
    )


def add_many_flags(parser: argparse.ArgumentParser) -> None:
    """`run` over many images (docs/datasets.md)."""
    parser.add_argument("--list", metavar="FILE", help="image paths, one a line (relative to FILE's folder)")
    parser.add_argument(
        "--coco-images", metavar="DATASET.json", help="the images of a COCO dataset (its ids go in the COCO output)"
    )
    parser.add_argument(
        "--images-root", metavar="DIR", help="the folder --coco-images file names are in (default: the JSON's)"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write DIR/results.jsonl (a line per image, as each ends) and DIR/coco.json"
    )
    parser.add_argument("--resume", action="store_true", help="with --out: skip images that already have a result")
    parser.add_argument(
        "--max-in-flight", type=positive_int, metavar="N", help="jobs submitted at a time (default: 3 a worker process)"
    )


def add_identity_flags(parser: argparse.ArgumentParser) -> None:
    """Who the faces are (docs/faces.md): a face detector with five landmarks, such as faces-dnn."""
    parser.add_argument(
        "--identify", metavar="G", help="name the faces from gallery G (`tilerec gallery`); with --out, group the "
        "unknown ones into people across the run"
    )  # fmt: skip
    parser.add_argument(
        "--identity-threshold", type=float, metavar="S", help="least similarity that names a face (default: the "
        "embedder's, 0.4 for dlib: distance 0.6)"
    )  # fmt: skip
    parser.add_argument(
        "--identity-repeats", action="store_true", help="a person may be several faces of one image (default: once)"
    )


def add_spatial_flags(parser: argparse.ArgumentParser) -> None:
    """GeoTIFF and slide options (docs/geospatial.md)."""
    add_read_flags(parser)
    parser.add_argument("--mpp", type=positive_float, metavar="UM", help="slides: the level nearest UM microns/pixel")


def build_parser() -> Parser:
    parser = Parser(
        prog="tilerec",
        description="Recognize objects in large images with Celery workers: tiles in parallel, merged into one result.",
        epilog="Exit codes: 0 ok, 1 job failed, 2 bad arguments or input, 3 broker/cluster unreachable, 4 timeout, "
        "130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="recognize objects in images",
        description="Recognize objects in one or more images, as concurrent jobs.",
    )
    run.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files (PNG, JPEG, TIFF, … or .npy), folders (their files) or quoted glob patterns ('**' recurses)",
    )
    add_many_flags(run)
    run.add_argument("--recognizer", "-r", required=True, metavar="NAME", help="see `tilerec recognizers`")
    run.add_argument(
        "--param",
        "-p",
        action="append",
        metavar="KEY=VALUE",
        help="a recognizer parameter (repeatable); VALUE is read as JSON if it is JSON, else as a string",
    )
    run.add_argument("--tile", type=int, metavar="PX", help=f"tile size in pixels (default {DEFAULTS.tile})")
    run.add_argument(
        "--overlap", type=float, metavar="RATIO", help=f"tile overlap ratio in [0, 1) (default {DEFAULTS.overlap})"
    )
    run.add_argument(
        "--min-score", type=float, metavar="S", help=f"drop detections scoring below S (default {DEFAULTS.min_score:g})"
    )
    run.add_argument(
        "--merge",
        choices=MERGE_METHODS,
        help="how seam duplicates merge (default: the recognizer's, greedy_nmm but for text: lines)",
    )
    run.add_argument(
        "--match-metric", choices=MATCH_METRICS, help=f"overlap measure for merging (default {DEFAULTS.match_metric})"
    )
    run.add_argument(
        "--match-threshold",
        type=float,
        metavar="T",
        help=f"overlap that makes two boxes one (default {DEFAULTS.match_threshold})",
    )
    run.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="tiles per batch (default: from the recognizer's cost)"
    )
    run.add_argument(
        "--on-tile-error",
        choices=ON_TILE_ERROR,
        help="fail the job when a tile fails (default), or return the rest and list the failed tiles",
    )
    run.add_argument(
        "--second-stage",
        action=argparse.BooleanOptionalAction,
        help="run the recognizer's second stage on each detection's full-resolution crop (default: as it declares)",
    )
    run.add_argument("--max-crops", type=positive_int, metavar="N", help="second stage: at most N crops, best first")
    add_identity_flags(run)
    add_spatial_flags(run)
    add_video_flags(run)
    run.add_argument(
        "--json", metavar="OUT", help="write the result as JSON to OUT (- for stdout); several images give a list"
    )
    run.add_argument(
        "--format",
        choices=("coco", "geojson", "text", "hocr", *VIDEO_FORMATS),
        default="json",
        help="--json output: tilerec's schema, one COCO document for all images, a GeoJSON FeatureCollection "
        "of polygons in the raster's CRS, the text read in reading order (text) or hOCR (hocr); for a video, "
        "MOTChallenge text (mot) or JSON lines per frame (jsonl)",
    )
    run.add_argument("--wgs84", action="store_true", help="--format geojson: reproject to EPSG:4326 (lon/lat)")
    run.add_argument(
        "--annotate",
        metavar="OUT.png",
        help="draw the detections on the image; several images: use {stem} or {index} in OUT; a video: OUT.mp4 "
        "with boxes and track ids",
    )
    run.add_argument(
        "--shared-path",
        action="store_true",
        help="with --broker: send file paths (workers see the same files) instead of uploading bytes",
    )
    run.add_argument("--view", action="store_true", help="open the result in the deep-zoom viewer when the job ends")
    add_cluster_flags(run)
    run.set_defaults(handler=cmd_run)

    listing = commands.add_parser("recognizers", help="list recognizers, their parameters and defaults")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(handler=cmd_recognizers)

    demo = commands.add_parser(
        "demo",
        help="the whole flow on a synthetic scene with known QR codes",
        description="Make a scene with known QR codes, recognize it on the cluster, write JSON and an annotated PNG, "
        "print found vs known.",
    )
    demo.add_argument(
        "--size", type=parse_size, default=(4000, 3000), metavar="WxH", help="scene size (default 4000x3000)"
    )
    demo.add_argument("--out", default="tilerec-out", metavar="DIR", help="output folder (default tilerec-out)")
    demo.add_argument("--count", type=positive_int, metavar="N", help="QR codes (default: about 2 per megapixel)")
    demo.add_argument("--seed", type=int, default=0, help="scene random seed (default 0)")
    add_cluster_flags(demo)
    demo.set_defaults(handler=cmd_demo)

    add_evaluate(commands)
    add_gallery(commands, add_cluster_flags)

    cancelling = commands.add_parser(
        "cancel",
        help="cancel jobs by id: their unstarted tiles are skipped, their keys removed, the job fails as cancelled",
    )
    cancelling.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    cancelling.add_argument("--broker", metavar="URL", help="the cluster's broker (default: TILEREC_BROKER_URL)")
    cancelling.set_defaults(handler=cmd_cancel)

    add_view_parser(commands)

    commands.add_parser(
        "worker",
        help="run a worker: exec `celery -A tasks worker` with the options that follow "
        "(--broker URL sets TILEREC_BROKER_URL; --help shows celery's)",
        add_help=False,
    )
    return parser


REDELIVER_S = 0.05  # an interrupt a finalizer swallowed is delivered again this much later


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def reraise_swallowed_interrupts() -> None:
    """A Ctrl-C (or SIGTERM, SIGHUP) that arrives while a finalizer runs (a Redis connection's `__del__` while the
    CLI polls for its worker, say) is raised there, and Python only reports it as unraisable: the CLI would go on
    as if nothing had come. This hook delivers it again to the main thread, through the signal's own handler,
    REDELIVER_S later: delivered at once, it would land in the hook, and be swallowed again."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
            again = threading.Timer(REDELIVER_S, _thread.interrupt_main, (signum,))
            again.daemon = True
            again.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["worker"]:
            exec_worker(argv[1:])
        args = build_parser().parse_args(argv)
        reraise_swallowed_interrupts()
        for number in (signal.SIGTERM, signal.SIGHUP):
            # only where the default (dying without cleanup) applies: a SIGHUP ignored by nohup stays ignored
            if signal.getsignal(number) == signal.SIG_DFL:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(number, _raise_interrupted)
        set_up()
        return args.handler(args)
    except CliError as error:
        print_error(str(error))
        return error.code
    except KeyboardInterrupt as interrupt:
        print_error("interrupted")
        return 128 + interrupt.signum if isinstance(interrupt, Interrupted) else EXIT_INTERRUPTED
    except (redis.RedisError, OperationalError) as error:
        print_error(f"lost the connection to the broker or result backend: {error}")
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no second error while Python flushes at exit)
        return EXIT_FAILED
