"""Jobs in flight (tasks.client.submit_many): a progress bar per job, or one overall bar for many images, and the
jobs in flight cancelled if the run is interrupted."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
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

from tasks.cli.clusters import Cluster, ignoring_interrupts, open_cluster
from tasks.cli.errors import EXIT_TIMEOUT, CliError, markup_safe
from tasks.cli.inputs import Target
from tasks.cli.settings import RunSettings

if TYPE_CHECKING:  # tasks.client loads the Celery app: imported when a run starts, not for `--help`
    from tasks.client import Completed


WAITING_NOTE = " (waiting for room in the tile store)"  # after a job's name while it waits in line


class RateColumn(ProgressColumn):
    """Tiles (or a second stage's crops) per second, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed, unit = task.finished_speed or task.speed, task.fields.get("unit", "tiles")
        return Text(f"{speed:.1f} {unit}/s" if speed else f"– {unit}/s", style="progress.data.speed", no_wrap=True)


def _progress(console: Console, fixed: Column, *extra: ProgressColumn) -> Progress:
    """Bars with a job's (or the run's) name, its bar, done of total and unit, the `extra` columns, then the time
    left; `fixed`: the table column of the narrow ones."""
    return Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        BarColumn(bar_width=20),
        MofNCompleteColumn(table_column=fixed),
        TextColumn("{task.fields[unit]}", table_column=fixed),
        *extra,
        TimeRemainingColumn(table_column=fixed),
        console=console,
        expand=True,
    )


class _Bars:
    """A display of rich progress bars (None off a terminal), drawn while the run is in its `with` block."""

    progress: Progress | None

    def __enter__(self) -> _Bars:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress:
            self.progress.stop()


class Tracker(_Bars):
    """One progress bar per job on a terminal; nothing at all otherwise, so scripts and --quiet stay clean. A job
    whose tiles are done and whose recognizer has a second stage goes on as a bar of its crops.

    Counts never go back: a job's counters are deleted by its merge a moment before its result is stored."""

    def __init__(self, console: Console, targets: Sequence[Target], live: bool) -> None:
        fixed = Column(no_wrap=True)
        extra = (RateColumn(table_column=fixed), TextColumn("ETA", table_column=fixed))
        self.progress = _progress(console, fixed, *extra) if live else None
        self.index = {id(target): number for number, target in enumerate(targets)}
        self.names = [short(target.given) for target in targets]
        self.ids = (
            [self.progress.add_task(name, total=None, unit="tiles") for name in self.names] if self.progress else []
        )
        self.done = [0] * len(targets)

    def poll(self, running: Sequence[Any]) -> None:
        """Each job in flight (tasks.client.InFlight) at the tiles it has done, or, once they all are, at the crops
        of its second stage, if it has one."""
        for run in running:
            index = self.index[id(run.image)]
            done, total = run.job.seen
            crops = run.job.crops() if self.progress and total and done >= total else None
            self.done[index] = max(self.done[index], done)
            if crops is not None:
                self.progress.update(self.ids[index], completed=crops[0], total=crops[1], unit="crops")
            elif self.progress:
                name = self.names[index] + (WAITING_NOTE if run.job.waiting else "")
                self.progress.update(self.ids[index], completed=self.done[index], total=total, description=name)

    def finish(self, target: Target, tiles: int | None, ok: bool) -> None:
        index = self.index[id(target)]
        if self.progress:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            done = {"completed": tiles, "total": tiles, "unit": "tiles"} if tiles else {}
            self.progress.update(self.ids[index], description=f"{mark} {self.names[index]}", **done)
            self.progress.stop_task(self.ids[index])


class Overview(_Bars):
    """For many images: one overall bar (images done of all, tiles/s, ETA, failures so far) and a line per job in
    flight, removed when it ends; nothing at all off a terminal or with --quiet."""

    def __init__(self, console: Console, total: int, skipped: int, live: bool) -> None:
        fixed = Column(no_wrap=True)
        extra = (TextColumn("{task.fields[rate]}", table_column=fixed),
                 TextColumn("{task.fields[failed]}", style="red", table_column=fixed))  # fmt: skip
        self.progress = _progress(console, fixed, *extra) if live else None
        self.started = time.monotonic()
        self.tiles = 0  # of finished jobs
        self.failed = 0
        self.overall = (
            self.progress.add_task("images", total=total, completed=skipped, unit="images", rate="", failed="")
            if self.progress
            else None
        )
        self.lines: dict[int, Any] = {}  # id(target) to its job's task

    def poll(self, running: Sequence[Any]) -> None:
        """Show the jobs in flight (tasks.client.InFlight) with the tiles each has done."""
        if not self.progress:
            return
        tiles = self.tiles
        for run in running:
            done, total = run.job.seen
            tiles += done
            line = self.lines.get(id(run.image))
            if line is None:
                line = self.lines[id(run.image)] = self.progress.add_task(
                    "", total=total, unit="tiles", rate="", failed=""
                )
            name = "  " + short(run.image.given) + (WAITING_NOTE if run.job.waiting else "")
            self.progress.update(line, completed=done, total=total, description=name)
        rate = tiles / max(time.monotonic() - self.started, 1e-6)
        self.progress.update(self.overall, rate=f"{rate:.1f} tiles/s")

    def finish(self, target: Target, tiles: int | None, ok: bool) -> None:
        self.tiles += tiles or 0
        self.failed += not ok
        if not self.progress:
            return
        line = self.lines.pop(id(target), None)
        if line is not None:
            self.progress.remove_task(line)
        failed = f"{self.failed} failed" if self.failed else ""
        self.progress.update(self.overall, advance=1, failed=failed)


def short(name: str) -> str:
    """A name for a progress line: its end, which holds the file name."""
    return markup_safe(name if len(name) <= 30 else "…" + name[-29:])


def named(done: Completed) -> Completed:
    """A finished job whose recognition names the file as the user gave it."""
    if done.result is None:
        return done
    return dataclasses.replace(done, result=dataclasses.replace(done.result, source=os.fspath(done.image)))


def in_flight(settings: RunSettings, cluster: Cluster, images: int, many: bool) -> int | None:
    """Jobs at a time: --max-in-flight; else every named image at once, as ever; for many images, a few per
    process of the private cluster, or None to let submit_many ask a shared cluster's workers."""
    from tasks.client import IN_FLIGHT_PER_PROCESS

    if settings.in_flight:
        return settings.in_flight
    if not many:
        return images
    return IN_FLIGHT_PER_PROCESS * cluster.processes if cluster.processes else None


def execute(
    targets: Sequence[Target],
    recognizer: str,
    options: dict[str, Any],
    settings: RunSettings,
    console: Console,
    sink: Callable[[Completed], Completed] | None = None,
    overview: Overview | None = None,
) -> list[Completed]:
    """Run one job per image on the chosen cluster, at most `settings.in_flight` at a time (tasks.client.
    submit_many); returns an outcome per image, in the order given. `sink` gets each outcome as its job ends and
    returns the one to keep (a run's faces take their embeddings out of it);
    `overview` replaces the bar per job (for many images). An interrupt, a timeout or a dead local worker cancels
    the jobs in flight, so the run leaves neither work nor data behind."""
    from tasks.client import submit_many

    live = console.is_terminal and not settings.quiet
    order = {id(target): index for index, target in enumerate(targets)}
    outcomes: list[Completed] = []
    began = time.monotonic()
    with open_cluster(targets, settings, console) as cluster:
        display = overview or Tracker(console, targets, live)

        def on_poll(running: Sequence[Any]) -> None:
            display.poll(running)
            cluster.check()
            if settings.timeout is not None and time.monotonic() - began > settings.timeout:
                pending = len(targets) - len(outcomes)
                raise CliError(
                    f"timed out after {settings.timeout:g} s with {pending} of {len(targets)} job(s) unfinished",
                    EXIT_TIMEOUT,
                )

        limit = in_flight(settings, cluster, len(targets), overview is not None)
        jobs = submit_many(targets, recognizer, max_in_flight=limit, upload=cluster.upload, on_poll=on_poll, **options)
        with display:
            try:
                for done in jobs:
                    outcome = named(done)
                    display.finish(outcome.image, outcome.result.tiles if outcome.result else None, outcome.ok)
                    if sink is not None:
                        outcome = sink(outcome)
                    outcomes.append(outcome)
            finally:
                with ignoring_interrupts():  # cancelling the jobs in flight must finish
                    jobs.close()
    return sorted(outcomes, key=lambda outcome: order[id(outcome.image)])
