"""tilerec driven by another Celery app that knows it only by task names, and a deployment that splits the queues.

The other app lives in its own files, run in their own processes: a client script and a `celery worker` of its own,
importing neither `tasks`, `pipeline` nor `celeryconfig` (each process reports what it imported).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import cv2
import pytest
from celery import Celery

from pipeline.scenes.codes import qr_scene
from pipeline.tiling import grid
from tasks.local import RedisServer, Worker, _die_with_parent, _stop, _wait
from tests.conftest import IMAGES_ROOT
from tests.scenes import assert_each_code_once

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

TIMEOUT = 120
OTHER_APP = textwrap.dedent(
    '''
    """Another team's Celery app. It knows tilerec only by its message contract: task names, arguments, queues."""

    import os
    import sys

    from celery import Celery

    URL = os.environ["OTHERAPP_REDIS_URL"]
    TILEREC_MODULES = ("tasks", "pipeline", "celeryconfig", "cv2")

    app = Celery("otherapp", broker=URL, backend=URL)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue="otherapp",
        task_routes={"tilerec.*": {"queue": "tilerec"}},
        broker_connection_retry_on_startup=True,
    )


    def imported_from_tilerec():
        return sorted(name for name in TILEREC_MODULES if name in sys.modules)


    @app.task(name="otherapp.count_detections")
    def count_detections(result):
        """Runs on this app's own worker, after tilerec's merge, with the merged result as its argument."""
        return {
            "count": len(result["detections"]),
            "texts": sorted(d.get("text") for d in result["detections"]),
            "schema": result["schema"],
            "imported": imported_from_tilerec(),
        }
    '''
)

CLIENT = textwrap.dedent(
    '''
    """Submit tilerec jobs by name from the other app: plain, chained to our own task, and linked to it."""

    import json
    import sys

    from celery import chain, signature

    from otherapp import app, imported_from_tilerec

    image = sys.argv[1]
    options = {"tile": 640, "overlap": 0.2, "batch_size": 4}
    # our own task runs after tilerec's merge, sent by a tilerec worker: its queue must travel in the signature
    count = signature("otherapp.count_detections", queue="otherapp")

    plain = app.send_task("tilerec.recognize", args=[image, "qrcode"], kwargs=options).get(timeout=120)
    chained = chain(signature("tilerec.recognize", args=[image, "qrcode"], kwargs=options), count.clone())
    counted = chained.apply_async().get(timeout=120)
    callback = count.clone().freeze()
    app.send_task("tilerec.recognize", args=[image, "qrcode"], kwargs=options, link=count.clone(task_id=callback.id))
    linked = app.AsyncResult(callback.id).get(timeout=120)

    json.dump({"plain": plain, "chained": counted, "linked": linked, "imported": imported_from_tilerec()}, sys.stdout)
    '''
)


@pytest.fixture(scope="module")
def scene():
    return qr_scene(1920, 1280, count=6, seam_share=0.5, seed=21)


@pytest.fixture(scope="module")
def scene_path(scene):
    path = IMAGES_ROOT / "other-apps-scene.png"
    cv2.imwrite(str(path), scene.image)
    return str(path)


@pytest.fixture(scope="module")
def other_app(tmp_path_factory, redis_server):
    """The other app's files, and its own worker on its own queue (solo pool: one process is plenty here)."""
    folder = tmp_path_factory.mktemp("otherapp")
    (folder / "otherapp.py").write_text(OTHER_APP)
    (folder / "client.py").write_text(CLIENT)
    env = {**os.environ, "OTHERAPP_REDIS_URL": redis_server.url, "PYTHONPATH": str(folder)}
    env = {name: value for name, value in env.items() if not name.startswith("TILEREC_")}
    hostname = f"otherapp-{os.getpid()}@{socket.gethostname()}"
    log = folder / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "otherapp", "worker", "--queues", "otherapp", "--pool", "solo",
               "--hostname", hostname, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    probe = Celery("otherapp-probe", broker=redis_server.url, set_as_current=False)
    try:
        _wait(lambda: bool(probe.control.ping([hostname], timeout=0.5)), 60, f"worker {hostname}", process)
        yield folder, env
    finally:
        probe.close()
        _stop(process, 10)
    assert process.poll() is not None


def test_another_celery_app_sends_by_name_and_chains_its_own_task(worker, other_app, scene, scene_path):
    folder, env = other_app
    done = subprocess.run(
        [sys.executable, str(folder / "client.py"), scene_path],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["imported"] == [], "the other app's client must not import tilerec's modules"
    plain = report["plain"]
    assert plain["schema"] == "tilerec/recognition@2"
    assert plain["image"] == {"width": 1920, "height": 1280, "source": scene_path}
    assert plain["tiling"]["tiles"] == len(grid(1280, 1920, 640, 0.2))
    assert_each_code_once(plain["detections"], scene.truths)
    expected = {
        "count": len(scene.truths),
        "texts": sorted(truth.text for truth in scene.truths),
        "schema": "tilerec/recognition@2",
        "imported": [],  # the other app's worker did not import tilerec either
    }
    assert report["chained"] == expected
    assert report["linked"] == expected


def test_a_plain_send_task_with_celerys_default_routing_is_taken_too(worker, redis_server, scene, scene_path):
    """An app that routes nothing sends to Celery's default queue, `celery`: tilerec's workers take jobs from it."""
    plain = Celery("plain", broker=redis_server.url, backend=redis_server.url, set_as_current=False)
    try:
        outcome = plain.send_task("tilerec.recognize", args=[scene_path, "qrcode"])
        assert outcome.backend.get_task_meta(outcome.id)["status"] in ("PENDING", "STARTED", "PROGRESS", "SUCCESS")
        result = outcome.get(timeout=TIMEOUT)
    finally:
        plain.close()
    assert_each_code_once(result["detections"], scene.truths)


def _metas(client) -> list[dict]:
    return [json.loads(client.get(key)) for key in client.scan_iter("celery-task-meta-*")]


def test_tiling_and_merging_on_one_queue_recognition_on_another(tmp_path, scene, scene_path):
    """Two workers on a Redis of their own, each bound to one of the (renamed) queues; the result backend's
    extended metadata and the workers' logs tell which one ran what."""
    queues = {"TILEREC_JOBS_QUEUE": "acme.jobs", "TILEREC_TILES_QUEUE": "acme.gpu"}
    with RedisServer() as server:
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT), **queues}
        logs = {"jobs": tmp_path / "jobs.log", "tiles": tmp_path / "tiles.log"}
        jobs = Worker(server.url, 1, ["acme.jobs"], env, name="jobs", log_file=str(logs["jobs"]))
        tiles = Worker(server.url, 1, ["acme.gpu"], env, name="tiles", log_file=str(logs["tiles"]))
        client = Celery("caller", broker=server.url, backend=server.url, set_as_current=False)
        client.conf.update(accept_content=["json"], result_accept_content=["json"])
        try:
            jobs.start(wait=False)
            tiles.start(wait=False)
            jobs.wait_ready()
            tiles.wait_ready()
            job = client.send_task("tilerec.recognize", args=[scene_path, "qrcode"], kwargs={"batch_size": 4},
                                   queue="acme.jobs")  # fmt: skip
            result = job.get(timeout=TIMEOUT)
        finally:
            client.close()
            jobs.stop()
            tiles.stop()
        assert_each_code_once(result["detections"], scene.truths)
        metas = {meta["task_id"]: meta for meta in _metas(server.client())}
    batches = math.ceil(len(grid(1280, 1920, 640, 0.2)) / 4)
    assert result["tiling"]["batches"] == batches
    # tilerec.recognize replaces itself with the chord, whose merge inherits the job's id and so its result entry;
    # each batch task has its own, on the tiles worker
    merged = metas.pop(job.id)
    assert (merged["name"], merged["worker"], merged["queue"]) == ("tilerec.merge", jobs.hostname, "acme.jobs")
    assert [(m["name"], m["worker"], m["queue"], m["args"][0]) for m in metas.values()] == [
        ("tilerec.recognize_tiles", tiles.hostname, "acme.gpu", job.id)
    ] * batches
    jobs_log, tiles_log = logs["jobs"].read_text(), logs["tiles"].read_text()
    assert f"Task tilerec.recognize[{job.id}] received" in jobs_log
    assert jobs_log.count("Task tilerec.recognize_tiles[") == 0
    assert tiles_log.count("Task tilerec.recognize_tiles[") == 2 * batches  # received and succeeded
    assert "Task tilerec.recognize[" not in tiles_log and "Task tilerec.merge[" not in tiles_log
