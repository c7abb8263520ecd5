"""Jobs in flight: submitted together, polled with a progress bar per job, cancelled if the run is interrupted."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
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
from rich.table import Column
from rich.text import Text

from tasks.cli.clusters import Cluster, Settings, ignoring_interrupts, open_cluster
from tasks.cli.errors import EXIT_TIMEOUT, EXIT_UNREACHABLE, CliError
from tasks.cli.inputs import Target

POLL_S = 0.15  # between progress polls: live enough for a bar, a few Redis GETs per job per poll
OUTAGE_S = 60.0  # a Redis unreachable this long is gone, not restarting


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
    """What the job is sent: the file's bytes in the cluster's Redis (its workers may not see our disk), the path, or
    a URL as given."""
    if target.path is None:
        return target.given
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
    seconds = time.monotonic() - run.started
    if not result.ready():
        done, total = run.job.progress()
        tracker.update(index, done, total)
        if run.job.lost():
            lost = "JobLost: its state vanished from Redis (a failover or restart lost it); submit it again"
            run.outcome = Outcome(run.target, error=lost, seconds=seconds)
            tracker.finish(index, None, ok=False)
        return
    if result.successful():
        from tasks.client import fetch_result

        recognition = dict(fetch_result(result.result))
        source = run.target.given if run.target.path is None else str(run.target.path)
        recognition["image"] = {**recognition["image"], "source": source}
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
    unreachable_since: float | None = None
    while True:
        try:
            for index, run in enumerate(runs):
                if run.outcome is None:
                    poll(index, run, tracker)
            unreachable_since = None
        except (redis.ConnectionError, redis.TimeoutError) as error:  # Redis restarting or failing over: a pause
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > OUTAGE_S:
                raise CliError(f"lost the cluster's Redis for over {OUTAGE_S:g} s: {error}", EXIT_UNREACHABLE) from None
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
    from tasks.celery import store_client
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
                        store.delete_ref(store_client(), ref)
    return [run.outcome for run in runs if run.outcome is not None]
