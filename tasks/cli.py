"""`tilerec`, the command line: recognize objects in large images on a Celery cluster, or on a private one.

  tilerec run IMAGE [IMAGE ...] --recognizer NAME [options]   recognize images as concurrent jobs
  tilerec recognizers [--json]                                 the recognizers, their parameters and defaults
  tilerec demo [--size WxH] [--out DIR]                        a synthetic scene with known QR codes, end to end
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

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import cv2
import redis
from kombu import Connection
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from pipeline import images
from pipeline.export import coco_document
from pipeline.merge import MATCH_METRICS, MERGE_METHODS
from pipeline.model import Detections, Recognition
from pipeline.options import JOB_OPTIONS, ON_TILE_ERROR, parse_options
from pipeline.recognizers import available
from pipeline.render import draw_detections
from pipeline.scenes import qr_scene, score

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
POLL_S = 0.15  # between progress polls: live enough for a bar, a few Redis GETs per job per poll
PING_TIMEOUT_S = 3.0  # an unreachable broker is reported after this, instead of Celery retrying for ever
WORKER_STOP_S = 1.0  # the private cluster holds nothing worth a warm shutdown's wait


class CliError(Exception):
    """A failure the user can act on: printed as one line, no traceback, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(" ".join(str(message).split()))
        self.code = code


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same cleanup runs (nothing is orphaned)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: usage is a `--help` away, a script's log wants the reason."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------- arguments


def parse_param(pair: str) -> tuple[str, Any]:
    """`key=value`, the value read as JSON when it is JSON (numbers, true, lists), else kept as a string."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise CliError(f"--param wants key=value, got {pair!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_size(text: str) -> tuple[int, int]:
    """`4000x3000` to (width, height); argparse turns the ValueError into a usage error."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) <= 0 or int(height) <= 0:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT in pixels, e.g. 4000x3000, got {text!r}")
    return int(width), int(height)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The job's keyword options from the flags the user set (unset flags keep the pipeline's defaults), checked
    here with the workers' own parser so a bad option fails before any cluster starts."""
    options: dict[str, Any] = {
        name: getattr(args, name) for name in JOB_OPTIONS if getattr(args, name, None) is not None
    }
    params = dict(parse_param(pair) for pair in args.param or [])
    if params:
        options["params"] = params
    try:
        parse_options(args.recognizer, options)
    except ValueError as error:  # OptionsError, RecognizerError
        raise CliError(str(error)) from None
    return options


# ------------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Target:
    """One input image: the name the user gave (for messages and outputs) and its real absolute path."""

    given: str
    path: Path


def check_image(given: str, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Target:
    """Fail early, in this process, for a missing, unreadable or non-image file, rather than as a job error later."""
    path = Path(given).expanduser()
    try:
        real = path.resolve(strict=True)
        data = real.read_bytes()
    except FileNotFoundError:
        raise CliError(f"cannot read image {given!r}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"cannot read image {given!r}: it is a directory") from None
    except OSError as error:
        raise CliError(f"cannot read image {given!r}: {error.strerror or error}") from None
    try:
        size = images.header_size(data)
        if size is not None:
            images.check_pixels(*size, max_pixels)
        elif not data.startswith(images.NPY_MAGIC) and not cv2.haveImageReader(str(real)):
            raise images.ImageError("it is not an image format OpenCV can read")
    except images.ImageError as error:
        raise CliError(f"cannot use image {given!r}: {error}") from None
    return Target(given, real)


def output_path(template: str, target: Target, index: int, count: int) -> Path:
    """Where one image's output goes: the path itself for one image; for several, `{stem}`, `{name}` and `{index}`
    in the path are filled in, or else `-STEM` is put before the suffix."""
    if count == 1:
        return Path(template)
    if "{" in template:
        try:
            return Path(template.format(stem=target.path.stem, name=target.path.name, index=index + 1))
        except (KeyError, IndexError, ValueError) as error:
            raise CliError(f"bad output template {template!r}: use {{stem}}, {{name}} or {{index}} ({error})") from None
    path = Path(template)
    return path.with_name(f"{path.stem}-{target.path.stem}{path.suffix}")


def annotate_paths(template: str | None, targets: Sequence[Target]) -> list[Path]:
    """Checked before any work: a format OpenCV can write, and one distinct file per image."""
    if template is None:
        return []
    paths = [output_path(template, target, i, len(targets)) for i, target in enumerate(targets)]
    if len(set(paths)) != len(paths):
        raise CliError(f"--annotate {template!r} gives two images the same file; put {{index}} in it")
    for path in paths:
        if not cv2.haveImageWriter(str(path)):
            raise CliError(f"--annotate {str(path)!r}: OpenCV cannot write that format (use .png or .jpg)")
    return paths


# ---------------------------------------------------------------------------------------------------- clusters


@dataclass
class Settings:
    """How and where jobs run, shared by `run` and `demo`."""

    broker: str | None
    workers: int | None = None
    shared_path: bool = False
    timeout: float | None = None
    quiet: bool = False


@dataclass
class Cluster:
    """What jobs need from a cluster: the store's URL, how images are referenced, and a health check."""

    store_url: str
    upload: bool
    remote: bool
    check: Callable[[], None] = lambda: None


def sanitize(url: str) -> str:
    """A URL with its password masked, fit for messages."""
    return str(maybe_sanitize_url(url))


def ping(url: str, what: str, timeout: float = PING_TIMEOUT_S) -> None:
    """Connect once with a short timeout: Celery itself would retry an unreachable broker for ever."""
    if url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        except ValueError as error:
            raise CliError(f"bad {what} URL {sanitize(url)!r}: {error}") from None
        try:
            client.ping()
        except redis.RedisError as error:
            raise CliError(f"cannot reach the {what} at {sanitize(url)}: {error}", EXIT_UNREACHABLE) from None
        finally:
            client.close()
        return
    try:
        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as error:  # kombu raises transport-specific errors
        raise CliError(f"cannot reach the {what} at {sanitize(url)}: {error}", EXIT_UNREACHABLE) from None


def configure_app(broker: str, backend: str, store_url: str) -> None:
    """Point this process's Celery app (which reads celeryconfig lazily) at the cluster before anything is sent."""
    from tasks import app

    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        tilerec_store_url=store_url,
        broker_connection_timeout=PING_TIMEOUT_S,
        redis_socket_connect_timeout=PING_TIMEOUT_S,
    )


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C during it would orphan the processes it is stopping."""
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to block
        previous = {number: signal.signal(number, signal.SIG_IGN) for number in caught}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def remote_cluster(broker: str, settings: Settings, console: Console) -> Iterator[Cluster]:
    """An existing cluster: checked reachable within seconds, then used as is."""
    backend = os.environ.get("TILEREC_RESULT_BACKEND") or broker
    store_url = os.environ.get("TILEREC_STORE_URL") or backend
    ping(broker, "broker")
    if backend.split(":", 1)[0] in ("redis", "rediss") and backend != broker:
        ping(backend, "result backend")
    if store_url not in (broker, backend):
        ping(store_url, "tile store")
    configure_app(broker, backend, store_url)
    if not settings.quiet:
        warn_if_no_worker(console, broker)
    yield Cluster(store_url, upload=not settings.shared_path, remote=True)


def warn_if_no_worker(console: Console, broker: str) -> None:
    """Jobs sent where no worker listens wait silently; say so (but still submit: a worker may be starting)."""
    from tasks import app

    with contextlib.suppress(Exception):
        if not app.control.ping(timeout=1.0, limit=1):  # returns at the first reply
            say(console, f"tilerec: warning: no worker answered on {sanitize(broker)}; jobs wait until one starts")


@contextlib.contextmanager
def local_cluster(targets: Sequence[Target], settings: Settings, console: Console) -> Iterator[Cluster]:
    """A private redis-server and celery worker for this run, always stopped on the way out."""
    from tasks.local import LocalCluster

    handle, name = tempfile.mkstemp(prefix="tilerec-worker-", suffix=".log")
    os.close(handle)
    log = Path(name)
    roots = os.pathsep.join(sorted({str(target.path.parent) for target in targets}))
    cluster = LocalCluster(workers=settings.workers, log_file=str(log), env={"TILEREC_ALLOWED_ROOTS": roots})
    keep_log = False
    try:
        start_local(cluster, log, console, settings.quiet)

        def check() -> None:
            nonlocal keep_log
            process = cluster.worker.process if cluster.worker else None
            if process is None or process.poll() is not None:
                keep_log = True
                code = process.returncode if process else "?"
                raise CliError(f"the local worker stopped unexpectedly (exit code {code}); its log: {log}", EXIT_FAILED)

        yield Cluster(cluster.url, upload=False, remote=False, check=check)
    except CliError as error:
        keep_log = keep_log or error.code == EXIT_UNREACHABLE
        raise
    finally:
        with ignoring_interrupts():
            if cluster.worker is not None:
                cluster.worker.stop(timeout=WORKER_STOP_S)
            cluster.stop()
            if not keep_log:
                log.unlink(missing_ok=True)


def start_local(cluster: Any, log: Path, console: Console, quiet: bool) -> None:
    """Start the private cluster; its workers get the private URLs, whatever TILEREC_* this shell has set."""
    url = cluster.url
    cluster.env.update(TILEREC_BROKER_URL=url, TILEREC_RESULT_BACKEND=url, TILEREC_STORE_URL=url)
    if not quiet:
        say(console, f"tilerec: starting a local cluster ({cluster.workers} worker processes, Redis at {url})")
    try:
        cluster.start()
    except (RuntimeError, OSError) as error:  # TimeoutError is an OSError
        raise CliError(f"could not start the local cluster: {error}; worker log: {log}", EXIT_UNREACHABLE) from None
    configure_app(url, url, url)


@contextlib.contextmanager
def open_cluster(targets: Sequence[Target], settings: Settings, console: Console) -> Iterator[Cluster]:
    if settings.broker:
        with remote_cluster(settings.broker, settings, console) as cluster:
            yield cluster
    else:
        with local_cluster(targets, settings, console) as cluster:
            yield cluster


# -------------------------------------------------------------------------------------------------------- jobs


@dataclass
class Outcome:
    """One image's job: its result (the recognition JSON) or its error, and the wall time it took."""

    target: Target
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Running:
    target: Target
    job: Any  # tasks.client.Job
    started: float = field(default_factory=time.monotonic)
    outcome: Outcome | None = None


class RateColumn(ProgressColumn):
    """Tiles per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} tiles/s" if speed else "– tiles/s", style="progress.data.speed", no_wrap=True)


class Tracker:
    """One progress bar per job on a terminal; nothing at all otherwise, so scripts and --quiet stay clean.

    Counts never go back: a job's counters are deleted by its merge a moment before its result is stored."""

    def __init__(self, console: Console, names: Sequence[str], live: bool) -> None:
        fixed = Column(no_wrap=True)
        self.progress = (
            Progress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                BarColumn(bar_width=20),
                MofNCompleteColumn(table_column=fixed),
                TextColumn("tiles", table_column=fixed),
                RateColumn(table_column=fixed),
                TextColumn("ETA", table_column=fixed),
                TimeRemainingColumn(table_column=fixed),
                console=console,
                expand=True,
            )
            if live
            else None
        )
        self.names = [escape(name if len(name) <= 30 else "…" + name[-29:]) for name in names]  # keep the file name
        self.ids = [self.progress.add_task(name, total=None) for name in self.names] if self.progress else []
        self.done = [0] * len(names)

    def __enter__(self) -> Tracker:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, index: int, done: int, total: int | None) -> None:
        self.done[index] = max(self.done[index], done)
        if self.progress:
            self.progress.update(self.ids[index], completed=self.done[index], total=total)

    def finish(self, index: int, tiles: int | None, ok: bool) -> None:
        if self.progress:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            done = {"completed": tiles, "total": tiles} if tiles else {}
            self.progress.update(self.ids[index], description=f"{mark} {self.names[index]}", **done)
            self.progress.stop_task(self.ids[index])


def reference(target: Target, cluster: Cluster) -> str:
    """What the job is sent: the file's bytes in the cluster's Redis (its workers may not see our disk) or the path."""
    if not cluster.upload:
        return str(target.path)
    from tasks.client import put_image

    return put_image(target.path.read_bytes())


def job_error(result: Any) -> str:
    """The worker's exception as `Type: message`, one line."""
    error = result.result
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return f"job ended in state {result.state}: {error}"


def poll(index: int, run: Running, tracker: Tracker) -> None:
    """One look at a job: finished (result or error), or how many tiles are done."""
    result = run.job.result
    if not result.ready():
        done, total = run.job.progress()
        tracker.update(index, done, total)
        return
    seconds = time.monotonic() - run.started
    if result.successful():
        from tasks.client import fetch_result

        recognition = dict(fetch_result(result.result))
        recognition["image"] = {**recognition["image"], "source": str(run.target.path)}
        run.outcome = Outcome(run.target, result=recognition, seconds=seconds)
        tracker.finish(index, recognition["tiling"]["tiles"], ok=True)
    else:
        run.outcome = Outcome(run.target, error=job_error(result), seconds=seconds)
        tracker.finish(index, None, ok=False)
    with contextlib.suppress(Exception):
        result.forget()


def wait_all(runs: Sequence[Running], tracker: Tracker, cluster: Cluster, timeout: float | None) -> None:
    """Poll every job until all are done; sleeps between polls, so waiting costs no CPU."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for index, run in enumerate(runs):
            if run.outcome is None:
                poll(index, run, tracker)
        pending = sum(run.outcome is None for run in runs)
        if not pending:
            return
        cluster.check()
        if deadline is not None and time.monotonic() > deadline:
            raise CliError(
                f"timed out after {timeout:g} s with {pending} of {len(runs)} job(s) unfinished", EXIT_TIMEOUT
            )
        time.sleep(POLL_S)


def cancel(runs: Sequence[Running]) -> None:
    """On a shared cluster, cancel unfinished jobs (tasks.client.cancel): their tile tasks skip the tiles left and
    their merge deletes their keys, so an interrupted run leaves neither work nor data behind."""
    for run in runs:
        if run.outcome is None:
            with contextlib.suppress(Exception):
                run.job.cancel()


def execute(
    targets: Sequence[Target], recognizer: str, options: dict[str, Any], settings: Settings, console: Console
) -> list[Outcome]:
    """Run one job per image, all at once, on the chosen cluster; returns an outcome per image, in order."""
    from tasks import store
    from tasks.client import Job, submit

    live = console.is_terminal and not settings.quiet
    with open_cluster(targets, settings, console) as cluster:
        runs: list[Running] = []
        uploads: list[str] = []
        finished = False
        try:
            for target in targets:
                ref = reference(target, cluster)
                uploads += [ref] if cluster.upload else []
                job: Job = submit(ref, recognizer, **options)
                runs.append(Running(target, job))
            with Tracker(console, [target.given for target in targets], live) as tracker:
                wait_all(runs, tracker, cluster, settings.timeout)
            finished = True
        finally:
            with ignoring_interrupts():
                if cluster.remote and not finished:
                    cancel(runs)
                for ref in uploads:
                    with contextlib.suppress(Exception):
                        store.delete_ref(store.connect(cluster.store_url), ref)
    return [run.outcome for run in runs if run.outcome is not None]


# ------------------------------------------------------------------------------------------------------ output


def say(console: Console, message: str) -> None:
    """A plain line on stderr: no markup, so brackets in paths print as they are."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def label_counts(result: dict[str, Any]) -> str:
    counts = Counter(record["label"] for record in result["detections"])
    return ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "none"


def summary_row(outcome: Outcome) -> dict[str, str]:
    """One image's summary cells; tiles that failed in a partial result (--on-tile-error partial) are shown."""
    row = outcome.result
    cells = {"image": outcome.target.given, "wall s": f"{outcome.seconds:.1f}"}
    if row is None:
        return {**cells, "detections": "failed", "per label": "", "tiles": "", "tasks": ""}
    failed = len(row.get("failed_tiles") or [])
    return {
        **cells,
        "detections": str(len(row["detections"])),
        "per label": label_counts(row),
        "tiles": f"{row['tiling']['tiles']}" + (f" ({failed} failed)" if failed else ""),
        "tasks": str(row["tiling"]["tasks"]),
    }


def summarize(outcomes: Sequence[Outcome], console: Console) -> None:
    """A table on a terminal; one plain line per image otherwise."""
    rows = [summary_row(outcome) for outcome in outcomes]
    if console.is_terminal:
        table = Table(title="tilerec", title_justify="left")
        columns = ("image", "detections", "per label", "tiles", "tasks", "wall s")
        for column in columns:
            table.add_column(column, justify="left" if column in ("image", "per label") else "right")
        for row in rows:
            table.add_row(*(escape(row[column]) for column in columns))
        console.print(table)
        return
    for row in rows:
        if row["detections"] == "failed":
            say(console, f"{row['image']}: failed after {row['wall s']} s")
            continue
        say(
            console,
            f"{row['image']}: {row['detections']} detections ({row['per label']}), "
            f"{row['tiles']} tiles, {row['tasks']} tasks, {row['wall s']} s",
        )


def document(outcomes: Sequence[Outcome], fmt: str) -> Any:
    """The --json output: one recognition (or a list, for several images), or one COCO document for them all."""
    done = [outcome for outcome in outcomes if outcome.result is not None]
    if fmt == "coco":
        return coco_document([Recognition.from_json(o.result) for o in done], [o.target.given for o in done])
    results = [outcome.result for outcome in done]
    return results[0] if len(outcomes) == 1 else results


def write_json(destination: str, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise CliError(f"cannot write {destination!r}: {error.strerror or error}", EXIT_FAILED) from None


def write_annotated(target: Target, result: dict[str, Any], path: Path) -> None:
    """The merged detections drawn on the original image."""
    pixels = images.decode(target.path.read_bytes())
    canvas = draw_detections(pixels, Detections.from_records(result["detections"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise CliError(f"cannot write the annotated image {str(path)!r}", EXIT_FAILED)


def write_outputs(outcomes: Sequence[Outcome], json_to: str | None, fmt: str, annotated: Sequence[Path]) -> None:
    if json_to is not None and any(outcome.result is not None for outcome in outcomes):
        write_json(json_to, document(outcomes, fmt))
    for outcome, path in zip(outcomes, annotated, strict=False):
        if outcome.result is not None:
            write_annotated(outcome.target, outcome.result, path)


def report_failures(outcomes: Sequence[Outcome]) -> int:
    """One error line per failed job; the exit code of the run."""
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    for outcome in failed:
        print_error(f"{outcome.target.given}: {outcome.error}")
    return EXIT_FAILED if failed else EXIT_OK


def print_error(message: str) -> None:
    print(f"tilerec: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- commands


def settings_from(args: argparse.Namespace, console: Console) -> Settings:
    broker = args.broker or os.environ.get("TILEREC_BROKER_URL") or None
    if broker and args.workers and not args.quiet:
        say(console, "tilerec: warning: --workers is for the local cluster; ignored with a broker")
    return Settings(broker, args.workers, getattr(args, "shared_path", False), args.timeout, args.quiet)


def cmd_run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    options = job_options(args)
    if args.format == "coco" and args.json is None:
        raise CliError("--format coco needs --json OUT (or --json - for stdout)")
    from tasks import app

    targets = [check_image(given, app.conf.tilerec_max_pixels) for given in args.images]
    annotated = annotate_paths(args.annotate, targets)
    settings = settings_from(args, console)
    outcomes = execute(targets, args.recognizer, options, settings, console)
    write_outputs(outcomes, args.json, args.format, annotated)
    if not args.quiet:
        summarize(outcomes, console)
    return report_failures(outcomes)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel jobs on a running cluster by id (what `tilerec run` and `Job.id` give)."""
    broker = args.broker or os.environ.get("TILEREC_BROKER_URL")
    if not broker:
        raise CliError("cancel needs the cluster: --broker URL or TILEREC_BROKER_URL")
    settings = Settings(broker, None, False, None, True)
    with remote_cluster(broker, settings, Console(stderr=True)):
        from tasks.client import cancel

        for job_id in args.job_ids:
            cancel(job_id)
            print(f"cancelled {job_id}", file=sys.stderr)
    return 0


def param_text(key: str, value: Any) -> str:
    """`key=value` as it would be typed after --param: plain strings bare, everything else as JSON."""
    plain = isinstance(value, str) and value and value == value.strip() and not value.startswith(("{", "[", '"'))
    return f"{key}={value if plain else json.dumps(value, default=str)}"


def cmd_recognizers(args: argparse.Namespace) -> int:
    specs = available()
    if args.json:
        listed = [
            {"name": s.name, "description": s.description, "params": dict(s.params), "cost_ms": s.cost_ms}
            for s in specs
        ]
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
        table.add_row(name, escape("\n".join(params) or "-"), f"{spec.cost_ms:g}", escape(spec.description))
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
    outcomes = execute([target], "qrcode", {}, settings_from(args, console), console)
    if report_failures(outcomes) != EXIT_OK:
        return EXIT_FAILED
    result = outcomes[0].result
    assert result is not None
    write_json(str(out / "scene.json"), result)
    write_annotated(target, result, out / "scene-annotated.png")
    if not args.quiet:
        summarize(outcomes, console)
    return report_demo(scene, result, out, args.quiet)


def report_demo(scene: Any, result: dict[str, Any], out: Path, quiet: bool) -> int:
    """Found vs known on stdout; success only if every code was found once and nothing else was reported."""
    found = score(Detections.from_records(result["detections"]), scene.truths)
    seen = {record.get("text") for record in result["detections"]}
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


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (`docker run --cpus`), which
    os.cpu_count() and so celery's default concurrency ignore."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    return max(1, count)


def worker_command(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`celery -A tasks worker ARGS`, with two additions. `--broker URL` is set as TILEREC_BROKER_URL (for celery
    it is a global option that must come before `worker`; the result backend and store follow it unless their own
    variables are set). `--concurrency auto` (or `-c auto`) becomes the number of usable CPUs."""
    env, rest, broker = dict(os.environ), [], None
    items = iter(args)
    for item in items:
        name, has_value, value = item.partition("=") if item.startswith("--") else (item, "", "")
        if name not in ("--broker", "--concurrency", "-c"):
            rest.append(item)
            continue
        value = value if has_value else next(items, "")
        if not value:
            raise CliError(f"tilerec worker: {name} needs a value")
        if name == "--broker":
            broker = value
        else:
            rest += [name, str(usable_cpus()) if value == "auto" else value]
    if broker:
        env["TILEREC_BROKER_URL"] = broker
    return [sys.executable, "-m", "celery", "-A", "tasks", "worker", *rest], env


def exec_worker(args: Sequence[str]) -> NoReturn:
    """Replace this process with the worker, so signals from a supervisor reach celery directly."""
    command, env = worker_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


# ------------------------------------------------------------------------------------------------------ parser


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
    run.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, … or .npy)")
    run.add_argument("--recognizer", "-r", required=True, metavar="NAME", help="see `tilerec recognizers`")
    run.add_argument(
        "--param",
        "-p",
        action="append",
        metavar="KEY=VALUE",
        help="a recognizer parameter (repeatable); VALUE is read as JSON if it is JSON, else as a string",
    )
    run.add_argument("--tile", type=int, metavar="PX", help="tile size in pixels (default 640)")
    run.add_argument("--overlap", type=float, metavar="RATIO", help="tile overlap ratio in [0, 1) (default 0.2)")
    run.add_argument("--min-score", type=float, metavar="S", help="drop detections scoring below S (default 0)")
    run.add_argument("--merge", choices=MERGE_METHODS, help="how seam duplicates merge (default greedy_nmm)")
    run.add_argument("--match-metric", choices=MATCH_METRICS, help="overlap measure for merging (default ios)")
    run.add_argument(
        "--match-threshold", type=float, metavar="T", help="overlap that makes two boxes one (default 0.5)"
    )
    run.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="tiles per task (default: from the recognizer's cost)"
    )
    run.add_argument(
        "--on-tile-error",
        choices=ON_TILE_ERROR,
        help="fail the job when a tile fails (default), or return the rest and list the failed tiles",
    )
    run.add_argument(
        "--json", metavar="OUT", help="write the result as JSON to OUT (- for stdout); several images give a list"
    )
    run.add_argument(
        "--format",
        choices=("json", "coco"),
        default="json",
        help="--json output: tilerec's schema or one COCO document for all images",
    )
    run.add_argument(
        "--annotate",
        metavar="OUT.png",
        help="draw the detections on the image; several images: use {stem} or {index} in OUT",
    )
    run.add_argument(
        "--shared-path",
        action="store_true",
        help="with --broker: send file paths (workers see the same files) instead of uploading bytes",
    )
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

    cancelling = commands.add_parser(
        "cancel",
        help="cancel jobs by id: their unstarted tiles are skipped, their keys removed, the job fails as cancelled",
    )
    cancelling.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    cancelling.add_argument("--broker", metavar="URL", help="the cluster's broker (default: TILEREC_BROKER_URL)")
    cancelling.set_defaults(handler=cmd_cancel)

    commands.add_parser(
        "worker",
        help="run a worker: exec `celery -A tasks worker` with the options that follow "
        "(--broker URL sets TILEREC_BROKER_URL; --help shows celery's)",
        add_help=False,
    )
    return parser


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["worker"]:
            exec_worker(argv[1:])
        args = build_parser().parse_args(argv)
        for number in (signal.SIGTERM, signal.SIGHUP):
            # only where the default (dying without cleanup) applies: a SIGHUP ignored by nohup stays ignored
            if signal.getsignal(number) == signal.SIG_DFL:
                with contextlib.suppress(ValueError):  # not the main thread
                    signal.signal(number, _raise_interrupted)
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


if __name__ == "__main__":
    sys.exit(main())
