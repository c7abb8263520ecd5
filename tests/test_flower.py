"""Flower, for real: a `celery flower` process with basic auth on the test Redis, watching the session's worker.

What it shows comes from events alone: the client's task-sent, the worker's task-received/started/succeeded and the
batch tasks' task-progress on the job's row. tilerec.recognize replaces itself with chord(batches, merge), and the
merge inherits the job's task id and arguments, so Flower's row for the job reads as the job from submit to result
(its name ends as tilerec.merge); a tilerec.recognize that fails keeps its own row.
"""

from __future__ import annotations

import ast
import base64
import json
import math
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import pytest

from pipeline.scenes.codes import qr_scene
from pipeline.tiling import grid
from tasks import recognize
from tasks.batches import PROGRESS_STEPS
from tasks.local import _die_with_parent, _stop, _wait, free_port
from tests.conftest import IMAGES_ROOT
from tests.scenes import assert_each_code_once

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

TIMEOUT = 120
ENABLED_BY_FLOWER = "Events of group {task} enabled by remote"  # what a worker logs when a monitor turns them on
USER, PASSWORD = "watcher", "s3cret-flower"
NAMES = ("tilerec.recognize", "tilerec.recognize_tiles", "tilerec.merge")
PIXELS = re.compile(r"(?<!\w)b['\"]|\\x[0-9a-f]{2}|array\(")  # a bytes literal, escaped bytes, a NumPy array


class Flower:
    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url = url
        self.process = process

    def get(self, path: str, credentials: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
        headers = {}
        if credentials:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one Prometheus sample, labels matched exactly; None when Flower has no such sample."""
        status, text = self.get("/metrics", credentials=None)
        assert status == 200
        for line in text.splitlines():
            match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
            if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
                return float(match.group(2))
        return None


@pytest.fixture(scope="module")
def flower(worker, redis_server, tmp_path_factory):
    """Flower on a free loopback port; stopped (and checked gone) when the module is done."""
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    command = [sys.executable, "-m", "celery", "-A", "tasks", "--broker", redis_server.url, "flower",
               f"--port={port}", "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"]  # fmt: skip
    env = {**os.environ, "TILEREC_BROKER_URL": redis_server.url, "TILEREC_RESULT_BACKEND": redis_server.url}
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
    running = Flower(f"http://127.0.0.1:{port}", process)

    def up() -> bool:
        try:
            return running.get("/healthcheck", credentials=None) == (200, "OK")
        except OSError:
            return False

    try:
        _wait(up, 30, "flower", process)
        # its event receiver is listening once it has heard the worker's heartbeat (every 2 s)
        _wait(lambda: running.metric("flower_worker_online", worker=worker.hostname) == 1.0, 30, "flower events")
        # the worker sends no task events until a monitor asks: Flower does, within 5 s of starting
        _wait(lambda: ENABLED_BY_FLOWER in Path(worker.log_file).read_text(), 30, "flower to enable task events")
        yield running
    finally:
        _stop(process, 10)
    assert process.poll() is not None, "flower is still running"


@pytest.fixture(scope="module")
def jobs(flower, worker):
    """One good job and one refused one, run while Flower watches; returns what the caller saw, and the events
    Flower counted meanwhile (the module's other tests, run before or after, send jobs of their own)."""
    before = event_counts(flower, worker)
    scene = qr_scene(1920, 1280, count=6, seam_share=0.5, seed=5)
    path = IMAGES_ROOT / "flower-scene.png"
    cv2.imwrite(str(path), scene.image)
    job = recognize.delay(str(path), "qrcode", batch_size=3)
    result = job.get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)
    refused = recognize.delay(str(path), "cats")
    with pytest.raises(Exception, match="unknown recognizer 'cats'"):
        refused.get(timeout=TIMEOUT)
    tasks: dict[str, dict[str, Any]] = {}

    def seen() -> bool:
        tasks.clear()
        tasks.update(flower.json("/api/tasks"))
        rows = [t for t in tasks.values() if t["root_id"] == job.id and t["state"] == "SUCCESS"]
        return len(rows) == result["tiling"]["batches"] + 1 and tasks.get(refused.id, {}).get("state") == "FAILURE"

    _wait(seen, 15, "flower to see the tasks' last events")
    events = {kind: count - before[kind] for kind, count in event_counts(flower, worker).items()}
    return {"path": str(path), "job": job.id, "result": result, "refused": refused.id, "tasks": tasks, "events": events}


def event_counts(flower: Flower, worker) -> dict[str, float]:
    """The tilerec.recognize events Flower has counted: sent by this test process, progress from the worker."""
    client = f"gen{os.getpid()}@{socket.gethostname()}"  # this test process, the client that sends the jobs
    sent = flower.metric("flower_events_total", task="tilerec.recognize", type="task-sent", worker=client)
    progress = flower.metric("flower_events_total", task="tilerec.recognize", type="task-progress",
                             worker=worker.hostname)  # fmt: skip
    return {"sent": sent or 0.0, "progress": progress or 0.0}


def test_flower_shows_every_tilerec_task_with_small_readable_arguments(flower, jobs, worker):
    tasks, job_id, result = jobs["tasks"], jobs["job"], jobs["result"]
    ours = {uuid: task for uuid, task in tasks.items() if task["root_id"] in (job_id, jobs["refused"])}
    for task in ours.values():
        assert task["name"] in NAMES
        for shown in (task["args"], task["kwargs"], task["result"] or ""):
            assert len(shown) < 2048, "arguments and results are shown small: references and windows, no pixels"
            assert not PIXELS.search(shown), shown

    # batch tasks: one per batch, each with the job's id and its tile range, and a summary as its result
    tiles = [task for task in ours.values() if task["name"] == "tilerec.recognize_tiles"]
    windows_expected = grid(1280, 1920, 640, 0.2)
    batches = math.ceil(len(windows_expected) / 3)
    assert len(tiles) == result["tiling"]["batches"] == batches
    ranges = []
    for task in tiles:
        assert (task["parent_id"], task["root_id"], task["worker"]) == (job_id, job_id, worker.hostname)
        job, first, stop = ast.literal_eval(task["args"])
        assert job == job_id
        ranges.append((first, stop))
        summary = ast.literal_eval(task["result"])
        assert len(task["result"]) < 300
        assert summary["tiles"] == stop - first and summary["failed"] == summary["skipped"] == 0
        assert summary["seconds"] > 0
    assert sorted(ranges) == [(n, min(n + 3, len(windows_expected))) for n in range(0, len(windows_expected), 3)]
    codes_seen = sum(ast.literal_eval(task["result"])["detections"] for task in tiles)
    assert codes_seen >= len(result["detections"]), "codes across seams are seen by two tiles, and merged"

    # the job's own row: the merge that took over its id, with the job's own arguments and the result's summary
    merged = ours[job_id]
    assert (merged["name"], merged["state"]) == ("tilerec.merge", "SUCCESS")
    assert list(ast.literal_eval(merged["args"])) == [jobs["path"], "qrcode"]
    assert ast.literal_eval(merged["kwargs"]) == {"batch_size": 3}
    assert merged["result"].startswith("{'schema': 'tilerec/recognition@2', 'image': {'width': 1920, 'height': 1280")
    assert f"'tiles': {len(windows_expected)}, 'batches': {batches}" in merged["result"]

    # a refused job keeps its tilerec.recognize row: its arguments exactly as sent, and the error
    refused = ours[jobs["refused"]]
    assert (refused["name"], refused["state"]) == ("tilerec.recognize", "FAILURE")
    assert ast.literal_eval(refused["args"]) == (jobs["path"], "cats")
    assert "RecognizerError" in refused["exception"] and "unknown recognizer 'cats'" in refused["exception"]

    assert set(NAMES) <= set(flower.json("/api/task/types")["task-types"])


def test_flower_sees_sent_events_progress_events_and_the_worker(flower, jobs, worker):
    assert jobs["events"]["sent"] == 2.0
    for name in NAMES:
        assert flower.metric("flower_events_total", task=name, type="task-started", worker=worker.hostname)
    # progress goes to the job's own row, named tilerec.recognize until the merge takes it over; it is reported
    # when the job crosses another 1/PROGRESS_STEPS of its tiles (with fewer tiles, after any batch), by a process
    # at most every PROGRESS_EVERY_S, and always by the batch that completes the job's tiles
    progress = jobs["events"]["progress"]
    assert jobs["result"]["tiling"]["tiles"] <= PROGRESS_STEPS
    assert 1 <= progress <= jobs["result"]["tiling"]["batches"]

    seen: dict[str, Any] = {}

    def inspected() -> bool:  # a refresh waits for the workers' replies for 1 s: a busy machine may need another
        seen.update(flower.json("/api/workers?refresh=1").get(worker.hostname, {}))
        return seen.get("stats", {}).get("total", {}).get("tilerec.recognize", 0) >= 2

    _wait(inspected, 20, "the worker's stats in flower")
    assert {queue["name"] for queue in seen["active_queues"]} == {"tilerec", "tilerec.tiles", "celery"}
    assert set(NAMES) <= set(seen["registered"])


def test_flower_shows_a_running_jobs_progress_and_arguments_on_its_row(flower, worker):
    """While the batches run, the job's row keeps the job's arguments and shows tiles done of total as its result
    (custom event fields are shown nowhere else in Flower); at the end it holds the job's result."""
    scene = qr_scene(3200, 1920, count=4, seed=9)
    path = IMAGES_ROOT / "flower-slow.png"
    cv2.imwrite(str(path), scene.image)
    total = len(grid(1920, 3200, 640, 0.2))
    job = recognize.delay(str(path), "tests.faulty:Slow", batch_size=2, seconds=0.2)
    shown: list[tuple[str, str, str]] = []

    def running() -> bool:
        status, body = flower.get(f"/api/task/info/{job.id}")
        if status == 200:
            row = json.loads(body)
            shown.append((row["state"], row["args"], row["result"] or ""))
        return bool(shown) and shown[-1][0] == "PROGRESS" and shown[-1][2].endswith(f"/{total} tiles")

    _wait(running, 60, "flower to show the job's progress")
    _, args, progress = shown[-1]
    assert list(ast.literal_eval(args)) == [str(path), "tests.faulty:Slow"]
    done = int(progress.split("/")[0])
    assert 0 < done < total
    result = job.get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)
    _wait(lambda: flower.json(f"/api/task/info/{job.id}")["state"] == "SUCCESS", 15, "flower to see the job end")
    row = flower.json(f"/api/task/info/{job.id}")
    assert ast.literal_eval(row["kwargs"]) == {"batch_size": 2, "seconds": 0.2}
    assert row["result"].startswith("{'schema': 'tilerec/recognition@2'")


def test_flower_wants_credentials(flower, jobs):
    for path in ("/api/tasks", "/api/workers", f"/api/task/info/{jobs['job']}", "/tasks"):
        assert flower.get(path, credentials=None)[0] == 401, path
        assert flower.get(path, credentials=(USER, "wrong"))[0] == 401, path
    assert flower.get(f"/api/task/info/{jobs['job']}")[0] == 200


def test_flower_shows_a_second_stage_s_crop_batches_and_the_job_ending_in_its_finish(flower, worker):
    """A recognizer with a second stage: after the merge, one tilerec.recognize_crops row per crop batch (the job's
    id and its crop range, a summary as its result); the job's own row shows crops done of all while the large
    crop is held, and, with its own arguments, ends as tilerec.finish with the result."""
    from tests.staged import blob_scene

    scene = blob_scene(1600, 1200, [(100, 100, 50, 40), (500, 300, 900, 300), (1200, 900, 200, 100)], seed=11)
    path = IMAGES_ROOT / "flower-staged.png"
    cv2.imwrite(str(path), scene.image)
    flag = IMAGES_ROOT / "flower-hold"
    flag.touch()
    try:
        job = recognize.delay(str(path), "tests.staged:DarkBlobs", batch_size=3, crop_batch_size=2, hold=str(flag),
                              hold_wider=500)  # fmt: skip

        def shows_crops() -> bool:
            status, body = flower.get(f"/api/task/info/{job.id}")
            return status == 200 and (json.loads(body)["result"] or "").endswith(" crops")

        _wait(shows_crops, 60, "flower to show the job's crops")
        shown = flower.json(f"/api/task/info/{job.id}")["result"]
        assert shown in ("0/3 crops", "1/3 crops", "2/3 crops"), shown
    finally:
        flag.unlink(missing_ok=True)
    result = job.get(timeout=TIMEOUT)
    for marker in IMAGES_ROOT.glob("flower-hold.*"):
        marker.unlink()
    assert result["second_stage"]["crops"] == 3 and result["second_stage"]["failed_crops"] == []

    def rows() -> list[dict[str, Any]]:
        return [t for t in flower.json("/api/tasks").values() if t["root_id"] == job.id]

    def seen() -> bool:
        done = [t for t in rows() if t["state"] == "SUCCESS"]
        return sum(t["name"] == "tilerec.recognize_crops" for t in done) == 2 and any(
            t["name"] == "tilerec.finish" for t in done
        )

    _wait(seen, 15, "flower to see the crop batches and the finish")
    crops = [t for t in rows() if t["name"] == "tilerec.recognize_crops"]
    spans = []
    for task in crops:
        assert task["worker"] == worker.hostname and len(task["args"]) < 2048
        job_id, first, stop = ast.literal_eval(task["args"])
        assert job_id == job.id
        spans.append((first, stop))
        summary = ast.literal_eval(task["result"])
        assert summary["crops"] == stop - first and summary["failed"] == 0 and len(task["result"]) < 300
        assert not PIXELS.search(task["args"] + task["result"])
    assert sorted(spans) == [(0, 2), (2, 3)]
    row = flower.json(f"/api/task/info/{job.id}")
    assert (row["name"], row["state"]) == ("tilerec.finish", "SUCCESS")
    assert list(ast.literal_eval(row["args"])) == [str(path), "tests.staged:DarkBlobs"]
    assert ast.literal_eval(row["kwargs"]) == {"batch_size": 3, "crop_batch_size": 2, "hold": str(flag),
                                               "hold_wider": 500}  # fmt: skip
    assert row["result"].startswith("{'schema': 'tilerec/recognition@2'")
