"""Real tilerec clusters for the benchmark: a private redis-server and `celery worker` processes (tasks.local), a
client app of our own per cluster, and the job timeline read back from the worker's log.

The timeline comes from Celery's own INFO lines ("received", "succeeded in Xs", "ignored" for the replaced tiling
task), so the tasks need no extra instrumentation and are measured exactly as they run in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench.analysis import idle_time
from tasks.local import LocalCluster, Worker

JOBS_QUEUE = "tilerec"
TILES_QUEUE = "tilerec.tiles"
LOG_LINE = re.compile(
    r"^\[(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/(?P<process>[^\]]+)\] "
    r"Task (?P<task>tilerec\.\w+)\[(?P<id>[0-9a-f-]+)\] (?P<what>received|ignored|succeeded in (?P<runtime>[0-9.e-]+)s)"
)


@dataclass
class TaskSpan:
    """One task execution as the worker logged it; times are epoch seconds."""

    task: str
    id: str
    process: str = ""
    received: float | None = None
    start: float | None = None
    end: float | None = None


@dataclass
class JobRun:
    """A finished (or failed) job: the result JSON, the client's clock around it, and its task spans."""

    result: dict[str, Any] | None
    submitted: float
    done: float
    spans: list[TaskSpan] = field(default_factory=list)
    error: str | None = None

    @property
    def wall_s(self) -> float:
        return self.done - self.submitted


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_log(text: str) -> list[TaskSpan]:
    """Task spans from worker log lines; a span's start is its end minus the runtime Celery measured."""
    spans: dict[str, TaskSpan] = {}
    order: list[str] = []
    for line in text.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        key = f"{match['task']}:{match['id']}"
        if key not in spans:
            spans[key] = TaskSpan(match["task"], match["id"])
            order.append(key)
        span, when = spans[key], _epoch(match["when"])
        if match["what"] == "received":
            span.received = when
        else:
            span.process, span.end = match["process"], when
            if match["runtime"]:
                span.start = when - float(match["runtime"])
    return [spans[key] for key in order]


def client_app(url: str) -> Celery:
    """A client per cluster (tilerec's settings, this cluster's broker), so several clusters can live at once."""
    app = Celery("tilerec-bench", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=url, result_backend=url, broker_connection_retry_on_startup=False)
    return app


def whole_result(client: redis.Redis, out: Any) -> Any:
    """A result too large for the result backend comes as a summary naming the Redis key of the whole document
    (`result_ref`, TILEREC_RESULT_INLINE_MAX_BYTES); fetch that document, as tasks.client.Job.get does."""
    reference = out.get("result_ref") if isinstance(out, dict) else None
    if not reference:
        return out
    text = client.get(str(reference).removeprefix("redis:"))
    return out if text is None else json.loads(text)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds the processes have used so far, from /proc (a process gone counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


WHATIF_DIR = Path(__file__).resolve().parent / "whatif"


class TreeWorker(Worker):
    """tasks.local.Worker started in the folder `tree`, which `python -m celery` puts first on sys.path (another
    checkout's `tasks` and `pipeline`, or bench/whatif's celeryconfig), run by `python` (another installation's, to
    run its code with its own packages)."""

    def __init__(self, *args: Any, tree: Path | str, python: str = sys.executable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tree = str(tree)
        self.python = python

    def command(self) -> list[str]:
        _, *arguments = super().command()
        return ["env", "--chdir", self.tree, self.python, *arguments]  # env execs it: the worker keeps env's pid


class Cluster(LocalCluster):
    """tasks.local.LocalCluster (a redis-server plus one `celery worker` with `workers` prefork processes, consuming
    both queues) with a client app, its worker's log, and the job runs read back from it.

    `overrides` (Celery settings) start the worker on bench/whatif/celeryconfig.py: tilerec's settings with those
    replaced, to measure a configuration change side by side with today's. `tree` and `python` run another
    checkout's code (TreeWorker).
    """

    def __init__(
        self,
        workers: int,
        folder: Path,
        env: dict[str, str],
        overrides: dict[str, Any] | None = None,
        tree: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        super().__init__(workers, dict(env))
        self.env["TILEREC_RESULT_BACKEND"] = self.url
        self.tree, self.python = tree, python
        if overrides is not None:
            self.env["TILEREC_BENCH_OVERRIDES"] = json.dumps(overrides)
            self.tree = WHATIF_DIR
        self.log_path = folder / f"worker-W{workers}-{self.redis.port}.log"
        self.log_file = str(self.log_path)
        self.app: Celery | None = None

    def start(self) -> Cluster:
        super().start()
        try:
            self.app = client_app(self.url)
        except BaseException:
            self.stop()
            raise
        return self

    def new_worker(self) -> Worker:
        if self.tree is None:
            return super().new_worker()
        return TreeWorker(
            self.url, self.workers, env=self.env, log_file=self.log_file, tree=self.tree, python=self.python
        )

    def stop(self) -> None:
        if self.app is not None:
            self.app.close()
            self.app = None
        super().stop()

    def __enter__(self) -> Cluster:
        return self.start()

    def client(self) -> redis.Redis:
        return self.redis.client()

    def pids(self) -> list[int]:
        """Every process of the cluster: the worker, its pool, and the Redis."""
        assert self.worker is not None and self.worker.process is not None and self.redis.process is not None
        return [self.worker.process.pid, *self.worker.child_pids(), self.redis.process.pid]

    def _log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def run(self, image: str, recognizer: str, options: dict[str, Any], timeout: float) -> JobRun:
        """Submit one job and wait for it; spans are the log lines the job added (jobs run one at a time)."""
        assert self.app is not None, "start the cluster first"
        offset = self._log_size()
        submitted, job_id = time.time(), ""
        try:
            result = self.app.send_task("tilerec.recognize", args=[image, recognizer], kwargs=options)
            job_id = result.id
            out = whole_result(self.client(), result.get(timeout=timeout, interval=0.01))
            done, error = time.time(), None
        except Exception as failure:  # a failed job is a benchmark figure, not a benchmark crash
            out, done, error = None, time.time(), f"{type(failure).__name__}: {failure}"[:300]
        return JobRun(out, submitted, done, self._spans_since(offset, job_id), error)

    def _spans_since(self, offset: int, job_id: str, settle_s: float = 0.05, tries: int = 20) -> list[TaskSpan]:
        """Spans logged since `offset`, waiting briefly for the line of the task that stored the job's result (logged
        after storing it): the merge, or the tiling task itself for a job of one batch."""
        spans: list[TaskSpan] = []
        for _ in range(tries):
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                spans = parse_log(log.read().decode("utf-8", "replace"))
            if any(s.id == job_id and s.start is not None for s in spans):  # succeeded (a replaced task is ignored)
                break
            time.sleep(settle_s)
        return spans

    def warm(self, image: str, recognizer: str, options: dict[str, Any], timeout: float) -> None:
        """Build the recognizer in every worker process (one tile per task, a few rounds), as a long-lived cluster."""
        for _ in range(2):
            self.run(image, recognizer, {**options, "batch_size": 1}, timeout)


def stages(run: JobRun) -> dict[str, float] | None:
    """A distributed job cut into consecutive stages whose sum is the client's wall time.

    queue_in: submit → tiling task starts; load/decode/store: the tiling task's own timings; dispatch: tiles stored →
    tiling task done (the chord's tile messages are published here); to_first_tile: → first tile task starts;
    recognition: first tile task start → last tile task end (wall); gather: → merge starts (chord counting and the
    merge message); merge: the merge task (merging, and deleting the job's tiles); deliver: → the client has it.
    """
    if run.result is None:
        return None
    timings = run.result["timings"]
    tiles = [s for s in run.spans if s.task == "tilerec.recognize_tiles" and s.start is not None and s.end is not None]
    merges = [s for s in run.spans if s.task == "tilerec.merge" and s.start is not None and s.end is not None]
    tiling = [s for s in run.spans if s.task == "tilerec.recognize" and s.end is not None]
    if not merges:
        return _inline_stages(run, tiling[-1]) if tiling and tiling[-1].start is not None else None
    if not tiles:
        return None
    merge = merges[-1]
    job_end = merge.end or run.done
    merge_start = merge.start if merge.start is not None else job_end - timings["merge_s"]
    # the result keeps no absolute start: the merge's own clock says finished = its start + merge_s
    started = merge_start + timings["merge_s"] - timings["total_s"]
    stored = started + timings["load_s"] + timings["decode_s"] + timings["store_s"]
    tiling_end = tiling[-1].end if tiling and tiling[-1].end else stored
    first_start = min(s.start for s in tiles if s.start is not None)
    last_end = max(s.end for s in tiles if s.end is not None)
    # at W > 1 another process starts tiles while the tiling task still publishes: stages stay consecutive by
    # ending the dispatch at whichever comes first, and the rest of the publishing overlaps recognition
    dispatch_end = min(max(tiling_end, stored), first_start)
    parts = {
        "queue_in": started - run.submitted,
        # one stage: where reading ends and decoding starts depends on the input (a TIFF is opened, not decoded)
        "read_decode": timings["load_s"] + timings["decode_s"],
        "store": timings["store_s"],
        "dispatch": max(0.0, dispatch_end - stored),
        "to_first_tile": max(0.0, first_start - max(tiling_end, stored)),
        "recognition": last_end - first_start,
        "gather": merge_start - last_end,
        "merge": job_end - merge_start,
        "deliver": run.done - job_end,
    }
    # a streamed PNG is decoded by the tiling task after it published the chord, while the tile tasks recognize
    streamed = timings.get("streamed_decode_s", 0.0) + timings.get("streamed_store_s", 0.0)
    parts["overlapped_decode"] = streamed
    parts["publish_total"] = max(0.0, tiling_end - stored - streamed)  # the whole publishing, overlapped or not
    parts["tile_task_busy"] = sum((s.end or 0) - (s.start or 0) for s in tiles)
    parts["recognize_sum"] = timings["recognize_s"]
    parts.update(idle_time([(s.process, s.start or first_start, s.end or last_end) for s in tiles]))
    return parts


def _inline_stages(run: JobRun, tiling: TaskSpan) -> dict[str, float]:
    """`stages` of a job of one batch, which its tiling task recognized and merged itself: no store, no chord."""
    timings = run.result["timings"] if run.result else {}
    job_end = tiling.end or run.done
    started = job_end - timings["total_s"]
    read_decode = timings["load_s"] + timings["decode_s"]
    return {
        "queue_in": started - run.submitted,
        "read_decode": read_decode,
        "store": 0.0,
        "dispatch": 0.0,
        "to_first_tile": 0.0,
        "recognition": timings["total_s"] - read_decode - timings["merge_s"],
        "gather": 0.0,
        "merge": timings["merge_s"],
        "deliver": run.done - job_end,
        "publish_total": 0.0,
        "overlapped_decode": 0.0,
        "tile_task_busy": 0.0,
        "recognize_sum": timings["recognize_s"],
        "idle_lead": 0.0,
        "idle_between": 0.0,
        "idle_tail": 0.0,
        "tile_processes": 1,
    }


def timeline(run: JobRun) -> list[dict[str, Any]]:
    """Spans relative to the submit, for the Gantt plot."""
    rows = []
    for span in run.spans:
        if span.start is None and span.end is None:
            continue
        start = span.start if span.start is not None else span.received
        rows.append(
            {
                "task": span.task.removeprefix("tilerec."),
                "process": span.process,
                "received": None if span.received is None else span.received - run.submitted,
                "start": None if start is None else start - run.submitted,
                "end": None if span.end is None else span.end - run.submitted,
            }
        )
    return rows
