"""Crashes, broker faults, cancellation, bad input and hostile callers, with real processes and a real Redis."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from celery import Celery
from celery.exceptions import TimeoutError
from kombu import Connection, Exchange, Producer

from bench.cluster import parse_log
from pipeline.scenes.codes import qr_code, qr_scene
from pipeline.tiling import grid
from tasks import recognize, store
from tasks.batches import CANCEL_CHECK_S
from tasks.client import submit
from tasks.local import RedisServer, Worker
from tests.conftest import IMAGES_ROOT, caller_app, tilerec_keys
from tests.faulty import holding, release
from tests.held_store import StoreGate
from tests.scenes import assert_each_code_once

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

TIMEOUT = 120
CLAIM_LEFT_MS = 3000  # what is left of a dead process's claim on a chord's callback once the test has seen it die


def wait_for(predicate, timeout: float = 30, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def assert_keys_go(redis_server, timeout: float = 10) -> None:
    """No job key is left once a cancelled streamed job's tiling task has seen the cancel. The merge reports the
    cancel first: the tiling task, still decoding, may store one more tile before it looks (once per batch) and
    then deletes what it stored."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: tilerec_keys(redis_server) == [], timeout)
    assert tilerec_keys(redis_server) == []


def test_a_killed_worker_process_loses_nothing_and_reports_nothing_twice(worker, redis_server, big_scene):
    scene, path = big_scene
    job = submit(path, "qrcode", batch_size=2)
    wait_for(lambda: job.progress()[0] >= 2)
    victim = worker.child_pids()[0]
    os.kill(victim, signal.SIGKILL)  # mid-job: its batch is handed back by the broker and run again
    try:
        result = job.get(timeout=TIMEOUT).to_json()
    except TimeoutError:
        log = Path(worker.log_file).read_text(errors="replace")[-4000:]
        pytest.fail(f"job {job.id} did not finish after a worker process was killed; worker log tail:\n{log}")
    assert_each_code_once(result["detections"], scene.truths)
    assert result["failed_tiles"] == []
    wait_for(lambda: len(worker.child_pids()) == 2)  # the pool replaced the lost process
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize(
    ("recognizer", "flag"),
    [("DiesCountingItsChordPart", "DIE_COUNTING_A_CHORD_PART"), ("DiesPublishingTheMerge", "DIE_PUBLISHING_THE_MERGE")],
)
def test_a_process_killed_in_a_chords_last_steps_does_not_strand_the_job(
    worker, redis_server, big_scene, recognizer, flag
):
    """The narrowest crash windows of a chord (tasks/chords.py): a batch task's process killed as it counts its
    part for the chord (Celery has stored its SUCCESS then), or the last part's process killed after claiming the
    chord's callback and before publishing it. The batch comes back and must count once, and publish the merge
    once the dead claim lapses; either way with stock Celery the job would wait forever. The dead claim lasts as
    long as its publish could have retried (about 46 s on the default settings); the test cuts what is left of it
    to CLAIM_LEFT_MS, so the batch that came back still waits for a claim held, and sees it lapse."""
    import tests.faulty

    scene, path = big_scene
    flag_file = IMAGES_ROOT / getattr(tests.faulty, flag)
    flag_file.touch()
    try:
        job = submit(path, f"tests.faulty:{recognizer}", batch_size=4)
        if recognizer == "DiesPublishingTheMerge":
            wait_for(lambda: not flag_file.exists(), TIMEOUT)  # the process took the claim, then died
            assert shorten_held_claims(redis_server.client(), CLAIM_LEFT_MS) == 1
        try:
            result = job.get(timeout=TIMEOUT).to_json()
        except TimeoutError:
            log = Path(worker.log_file).read_text(errors="replace")[-4000:]
            pytest.fail(f"job {job.id} never merged after a process died in its chord; worker log tail:\n{log}")
        assert not flag_file.exists(), "no process died: the test did not test anything"
    finally:
        flag_file.unlink(missing_ok=True)
    assert_each_code_once(result["detections"], scene.truths)
    assert result["failed_tiles"] == []
    assert tilerec_keys(redis_server) == []


def shorten_held_claims(client, milliseconds: int) -> int:
    """Cut to `milliseconds` the time left of the chord callbacks' claims still held (a claim published is `done`);
    Redis lets them lapse then. Returns how many there were."""
    held = [key for key in client.scan_iter("celery-taskset-meta-*.c") if client.get(key) not in (None, b"done")]
    for key in held:
        client.pexpire(key, milliseconds)
    return len(held)


def test_cancel_stops_the_job_and_cleans_the_store(worker, redis_server, big_scene):
    _, path = big_scene
    job = submit(path, "qrcode", batch_size=1)
    wait_for(lambda: job.progress()[0] >= 1)
    job.cancel()
    with pytest.raises(Exception) as raised:
        job.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "JobCancelled"
    done = int(str(raised.value).split("(")[1].split(" of ")[0])
    assert done < len(grid(3000, 4000)), "cancelled tiles must not be recognized"
    assert_keys_go(redis_server)


def running_batches(app, job_id: str) -> int:
    """The job's batch tasks running now, as the workers say (celery inspect active)."""
    active = app.control.inspect(timeout=1.0, limit=1).active() or {}  # the one worker answers for both
    return sum(
        task["name"] == "tilerec.recognize_tiles" and task["args"][0] == job_id
        for tasks in active.values()
        for task in tasks
    )


def test_running_batches_stop_at_a_cancel_between_their_tiles(worker, redis_server, big_scene, app, tmp_path):
    """Both batch tasks are running when the job is cancelled: they look again between tiles (every
    CANCEL_CHECK_S), so most of the job's tiles are never recognized."""
    _, path = big_scene
    tiles = len(grid(3000, 4000))
    gate = tmp_path / "gate"
    gate.mkdir()
    job = submit(path, "tests.faulty:Held", batch_size=tiles // 2, gate=str(gate))  # 2 tasks, held at a tile each
    try:
        wait_for(lambda: running_batches(app, job.id) == 2 and holding(gate, 1), step=0.1)
        job.cancel()
        # held past a batch's cancel-check interval: its next look, right after the held tile, sees the cancel
        time.sleep(2 * CANCEL_CHECK_S)
    finally:
        release(gate)
    with pytest.raises(Exception) as raised:
        job.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "JobCancelled"
    done, total = (int(n) for n in str(raised.value).split("(")[1].split(" tiles")[0].split(" of "))
    assert total == tiles
    assert done <= tiles // 2, f"{done} of {tiles} tiles recognized after the cancel: running batches went on"
    assert_keys_go(redis_server)


def test_a_job_cancelled_before_it_starts_never_tiles(worker, redis_server, big_scene, app):
    _, path = big_scene
    from tasks.client import cancel

    job_id = "cancelled-before-start"
    cancel(job_id)
    outcome = recognize.apply_async((path, "qrcode"), task_id=job_id)
    with pytest.raises(Exception) as raised:
        outcome.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "JobCancelled"
    assert tilerec_keys(redis_server) == []


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    photo = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return {
        "empty.png": (b"", "the image is empty"),
        "text.jpg": (b"hello, I am not a picture\n" * 10, "not an image"),
        "truncated.jpg": (jpeg(photo)[:2000], "JPEG file is truncated"),
        "truncated.png": (png(photo)[:5000], "PNG file is truncated"),
        "bomb.png": (bomb, "above the limit"),
    }


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_images_fail_clearly_and_leave_nothing(worker, redis_server, name):
    data, message = bad_inputs()[name]
    path = IMAGES_ROOT / name
    path.write_bytes(data)
    with pytest.raises(Exception) as raised:
        recognize.delay(str(path), "qrcode").get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError"
    assert message in str(raised.value)
    assert tilerec_keys(redis_server) == []


def test_odd_but_valid_images_are_handled(worker, redis_server):
    picture, _ = qr_code("deep", 4)
    canvas = np.full((400, 400), 255, dtype=np.uint8)
    canvas[30 : 30 + picture.shape[0], 30 : 30 + picture.shape[1]] = picture
    sixteen = IMAGES_ROOT / "sixteen.png"
    cv2.imwrite(str(sixteen), canvas.astype(np.uint16) * 257)
    four = IMAGES_ROOT / "four.png"
    cv2.imwrite(str(four), cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGRA))
    tiny = IMAGES_ROOT / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((1, 1, 3), dtype=np.uint8))
    for path in (sixteen, four):
        assert [d["text"] for d in recognize.delay(str(path), "qrcode").get(timeout=TIMEOUT)["detections"]] == ["deep"]
    result = recognize.delay(str(tiny), "qrcode").get(timeout=TIMEOUT)
    assert (result["image"]["width"], result["image"]["height"], result["detections"]) == (1, 1, [])
    assert tilerec_keys(redis_server) == []


def test_a_pickle_message_is_refused_and_never_executed(worker, redis_server, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    body = ((Exploit(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    with Connection(redis_server.url) as connection:
        producer = Producer(connection.channel(), exchange=Exchange("tilerec", type="direct"), routing_key="tilerec")
        producer.publish(
            pickle.dumps(body),
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "tilerec.recognize", "id": "pickled-job", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
            declare=[],
        )
    log = Path(worker.log_file)
    wait_for(lambda: "pickle" in log.read_text(errors="replace"), timeout=20)
    time.sleep(0.5)
    assert not marker.exists()
    assert worker.process.poll() is None
    assert (
        "refusing to deserialize" in log.read_text(errors="replace").lower()
        or "disallowed" in log.read_text(errors="replace").lower()
    )


def test_redis_restart_mid_life_clients_get_clear_errors_and_workers_reconnect(tmp_path):
    picture, _ = qr_code("after restart", 4)
    image = np.full((400, 400), 255, dtype=np.uint8)
    image[20 : 20 + picture.shape[0], 20 : 20 + picture.shape[1]] = picture
    path = IMAGES_ROOT / "restart.png"
    cv2.imwrite(str(path), image)
    server = RedisServer().start()
    env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT)}
    worker = Worker(server.url, 1, env=env, log_file=str(tmp_path / "w.log")).start()
    client = run_client_script(server.url, str(path), timeout=20)
    try:
        assert client["texts"] == ["after restart"]
        server.stop()
        down = run_client_script(server.url, str(path), timeout=60)
        # a connection error once its retries are spent, not its own wait for the result running out
        assert down["error"] is not None and "connect" in down["error"].lower(), down
        server.start()  # same port, empty data: the worker must reconnect by itself
        wait_for(
            lambda: run_client_script(server.url, str(path), timeout=10)["texts"] == ["after restart"],
            timeout=60,
            step=1,
        )
        assert worker.process.poll() is None
    finally:
        worker.stop()
        server.stop()


CLIENT_SCRIPT = """
import json, sys
from tasks import app, recognize
url, path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
app.conf.update(broker_url=url, result_backend=url, tilerec_store_url=url,
                broker_connection_timeout=2, broker_connection_max_retries=1,
                result_backend_transport_options={"retry_policy": {"max_retries": 2, "interval_step": 0.5}},
                task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5})
try:
    result = recognize.delay(path, "qrcode").get(timeout=timeout)
    print(json.dumps({"texts": [d.get("text") for d in result["detections"]], "error": None}))
except Exception as error:
    print(json.dumps({"texts": None, "error": f"{type(error).__name__}: {error}"}))
"""


def run_client_script(url: str, path: str, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, url, path, str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def small_qr_image(name: str, text: str) -> str:
    picture, _ = qr_code(text, 4)
    image = np.full((900, 1200), 235, dtype=np.uint8)
    image[100 : 100 + picture.shape[0], 700 : 700 + picture.shape[1]] = picture
    path = IMAGES_ROOT / name
    cv2.imwrite(str(path), image)
    return str(path)


def test_a_password_protected_redis_works_and_the_password_never_shows(tmp_path):
    secret = "s3cret-Pa55-for-tilerec"
    path = small_qr_image("password.png", "behind a password")
    log = tmp_path / "worker.log"
    with RedisServer(password=secret) as server:
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT)}
        with Worker(server.url, 1, env=env, log_file=str(log)):
            outcome = run_client_script(server.url, path, timeout=30)
    assert outcome["texts"] == ["behind a password"]
    assert secret not in log.read_text(errors="replace")
    assert secret not in json.dumps(outcome)


JOB_SCRIPT = """
import json, sys
from tasks import app, recognize
url, path, recognizer, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
app.conf.update(broker_url=url, result_backend=url, tilerec_store_url=url)
print(json.dumps(recognize.delay(path, recognizer, **options).get(timeout=120)))
"""


def job_client(url: str, path: str, recognizer: str, **options: object) -> subprocess.Popen:
    """A client process submitting one job to the cluster at `url`; its last output line is the result."""
    command = [sys.executable, "-c", JOB_SCRIPT, url, path, recognizer, json.dumps(options)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def slow_workers_env(server: RedisServer, **settings: str) -> dict[str, str]:
    return {
        "TILEREC_RESULT_BACKEND": server.url,
        "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
        "TILEREC_PLUGIN_MODULES": "tests.faulty",
        **settings,
    }


RECOGNIZE_TILES_ENDED = re.compile(
    r"^\[([0-9-]+ [0-9:,]+): INFO/[^]]+\] Task tilerec\.recognize_tiles\[[^]]+\] succeeded", re.M
)


def tile_tasks_ended(log_file: str) -> list[float]:
    """When each tile task a worker's log says succeeded ended (seconds since the epoch, from the log's clock)."""
    text = Path(log_file).read_text()
    return [
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp in RECOGNIZE_TILES_ENDED.findall(text)
    ]


def records_of(server: RedisServer) -> int:
    """Tiles recognized so far by the one job on `server`."""
    return max((server.client().hlen(key) for key in server.client().scan_iter("tilerec:job:*:records")), default=0)


def test_a_node_stopped_with_sigterm_finishes_its_batch_and_leaves_the_rest(tmp_path, big_scene):
    """Warm shutdown mid-job: the node finishes the batch it runs and stops; the other node takes the batches left,
    so the stopped node is gone long before the job is done."""
    scene, path = big_scene
    with RedisServer() as server:
        env = slow_workers_env(server)
        first = Worker(server.url, 1, env=env, log_file=str(tmp_path / "first.log")).start()
        second = Worker(server.url, 1, env=env, log_file=str(tmp_path / "second.log")).start()
        try:
            client = job_client(server.url, path, "tests.faulty:Slow", batch_size=1)
            wait_for(lambda: tile_tasks_ended(first.log_file) and tile_tasks_ended(second.log_file))
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(60) == 0
            output, _ = client.communicate(timeout=120)
            assert_each_code_once(json.loads(output.splitlines()[-1])["detections"], scene.truths)
            assert list(server.client().scan_iter("tilerec:job:*")) == []
            # 48 tiles of 0.05 s: the stopped node ended about 1 s before the job, the other node went on alone
            assert max(tile_tasks_ended(second.log_file)) - max(tile_tasks_ended(first.log_file)) > 0.5
        finally:
            first.stop()
            second.stop()


def test_a_worker_that_joins_mid_job_takes_the_next_batches(tmp_path, big_scene):
    """The job starts on the one live process. A second node joins and takes the next queued batches: both
    recognize the rest at once."""
    scene, path = big_scene
    with RedisServer() as server:
        env = slow_workers_env(server)
        first = Worker(server.url, 1, env=env, log_file=str(tmp_path / "first.log")).start()
        second = Worker(server.url, 1, env=env, log_file=str(tmp_path / "second.log"))
        try:
            # 48 tiles of 0.15 s: over 7 s on one process, time enough for a worker to start
            client = job_client(server.url, path, "tests.faulty:Slow", batch_size=1, seconds=0.15)
            wait_for(lambda: records_of(server) >= 2)
            second.start()
            output, _ = client.communicate(timeout=120)
        finally:
            first.stop()
            second.stop()
    result = json.loads(output.splitlines()[-1])
    assert_each_code_once(result["detections"], scene.truths)
    assert result["failed_tiles"] == []
    # both nodes recognized at once, not in turn: a node's own batch tasks never overlap, so the overlaps of
    # theirs with the other's add up to the time both were at work
    on_first, on_second = tile_task_spans(first.log_file), tile_task_spans(second.log_file)
    together = sum(max(0.0, min(a[1], b[1]) - max(a[0], b[0])) for a in on_first for b in on_second)
    assert together > 1.0, f"the two nodes recognized at once for {together:.2f} s only"


def tile_task_spans(log_file: str) -> list[tuple[float, float]]:
    """(start, end) of every tile task a worker's log says succeeded."""
    spans = parse_log(Path(log_file).read_text())
    return [(span.start, span.end) for span in spans if span.task == "tilerec.recognize_tiles" and span.start]


@pytest.mark.parametrize("small_batches", [1, 3])
def test_a_small_job_does_not_wait_for_a_big_one_to_finish(tmp_path, big_scene, small_batches):
    """One worker process, busy with a big job of 48 batches: a small job submitted meanwhile is done long before
    the big job's remaining 2 s and more (48 tiles of 0.05 s). A job of one batch is recognized in its tiling task,
    which is taken before the big job's later batches; a small job's batches overtake them (celeryconfig's
    priorities)."""
    _, path = big_scene
    small = small_qr_image("small-behind-big.png", "small job")  # 2 rows of 3 tiles
    with RedisServer() as server:
        caller = caller_app(server.url)
        try:
            with Worker(server.url, 1, env=slow_workers_env(server), log_file=str(tmp_path / "worker.log")):
                big = caller.send_task(
                    "tilerec.recognize", args=[path, "tests.faulty:Slow"], kwargs={"batch_size": 1}, queue="tilerec"
                )
                wait_for(lambda: records_of(server) >= 2)
                submitted = time.monotonic()
                options = {"batch_size": len(grid(900, 1200)) // small_batches}
                result = caller.send_task("tilerec.recognize", args=[small, "qrcode"], kwargs=options, queue="tilerec")
                result = result.get(timeout=60)
                waited = time.monotonic() - submitted
                assert not big.ready()
                finished = big.get(timeout=120)
        finally:
            caller.close()
    assert [d["text"] for d in result["detections"]] == ["small job"]
    assert result["tiling"]["batches"] == small_batches
    assert waited < 1.5, f"the small job took {waited:.2f} s: it waited for the big one"
    assert finished["failed_tiles"] == []
    # one worker process: it could only recognize after the decoding, so the PNG was decoded whole (cheaper)
    assert "streamed_decode_s" not in finished["timings"]


LOAD_CLIENT = """
import json, sys, time
from tasks import app, recognize

url, jobs = sys.argv[1], json.loads(sys.argv[2])
app.conf.update(broker_url=url, result_backend=url, tilerec_store_url=url)
submitted = [(text, time.monotonic(), recognize.delay(path, "qrcode")) for path, text in jobs]
report = []
for text, began, outcome in submitted:
    result = outcome.get(timeout=300)
    texts = [d.get("text") for d in result["detections"]]
    report.append({"expected": text, "texts": texts, "latency": time.monotonic() - began})
print(json.dumps(report))
"""


def test_fifty_jobs_from_several_clients_all_complete_correctly(worker, redis_server):
    jobs = [(small_qr_image(f"load-{n}.png", f"load job {n}"), f"load job {n}") for n in range(50)]
    clients = [jobs[k::5] for k in range(5)]
    began = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_CLIENT, redis_server.url, json.dumps(share)], stdout=subprocess.PIPE, text=True
        )
        for share in clients
    ]
    reports = [json.loads(p.communicate(timeout=600)[0]) for p in processes]
    wall = time.monotonic() - began
    rows = [row for report in reports for row in report]
    assert len(rows) == 50
    assert all(row["texts"] == [row["expected"]] for row in rows)
    latencies = sorted(row["latency"] for row in rows)
    print(
        f"\n50 jobs from 5 clients: wall {wall:.1f} s, latency median {latencies[25]:.1f} s, max {latencies[-1]:.1f} s"
    )
    assert tilerec_keys(redis_server) == []


def marked_scene(name: str) -> tuple:
    """The QR scene with a red marker square next to a code, placed so that the tiles holding the marker are the
    only ones that see that code whole: those tiles fail, the code is lost, every other code must be found."""
    from pipeline.tiling import grid
    from tests.faulty import MARKER_BGR

    scene = qr_scene(3000, 2000, count=12, seam_share=0.5, seed=11)
    windows = grid(2000, 3000)

    def inside(box, w) -> bool:
        bx, by, bw, bh = box
        return w.x <= bx and bx + bw <= w.x2 and w.y <= by and by + bh <= w.y2

    for truth in scene.truths:
        x, y = truth.box[0] + truth.box[2] + 4, truth.box[1]  # just right of the code
        failing = [w for w in windows if inside((x, y, 20, 20), w)]
        expected = sorted(t.text for t in scene.truths if any(inside(t.box, w) for w in windows if w not in failing))
        if truth.text not in expected and failing:
            break
    else:
        raise AssertionError("no place for the marker loses a code; change the seed")
    image = scene.image.copy()
    image[y : y + 20, x : x + 20] = MARKER_BGR
    path = IMAGES_ROOT / name
    cv2.imwrite(str(path), image)
    return str(path), failing, expected


@pytest.mark.parametrize("recognizer", ["tests.faulty:RaisesOnMarker", "tests.faulty:CrashesOnMarker"])
def test_partial_results_name_exactly_the_failed_tiles(worker, redis_server, recognizer):
    path, failing, expected = marked_scene("marked.png")
    outcome = recognize.delay(path, recognizer, on_tile_error="partial", batch_size=4)
    result = outcome.get(timeout=TIMEOUT)
    assert sorted(f["tile"] for f in result["failed_tiles"]) == [w.index for w in failing]
    assert [f["window"] for f in result["failed_tiles"]] == [[w.x, w.y, w.width, w.height] for w in failing]
    reason = "the red marker" if "Raises" in recognizer else "worker process died all 3 times"
    assert all(reason in f["error"] for f in result["failed_tiles"])
    assert sorted(d["text"] for d in result["detections"]) == expected
    assert tilerec_keys(redis_server) == []
    wait_for(lambda: len(worker.child_pids()) == 2)


def test_by_default_a_failed_tile_fails_the_job_and_says_where(worker, redis_server):
    path, failing, _ = marked_scene("marked-fail.png")
    with pytest.raises(Exception) as raised:
        recognize.delay(path, "tests.faulty:RaisesOnMarker").get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "TileFailure"
    first = failing[0]
    assert f"{len(failing)} of 24 tiles failed: tile {first.index} at [{first.x}, {first.y}, 640, 640]" in str(
        raised.value
    )
    assert tilerec_keys(redis_server) == []


def test_a_job_cannot_make_a_worker_open_files_outside_the_model_folders(worker, redis_server, big_scene):
    _, path = big_scene
    with pytest.raises(Exception) as raised:
        recognize.delay(path, "objects", model="/etc/hostname").get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "RecognizerError"
    assert "parameter 'model' names '/etc/hostname', outside the model folders" in str(raised.value)
    assert tilerec_keys(redis_server) == []


def idat_damaged_at(data: bytes, share: float) -> bytes:
    """`data` with one byte of its pixel data flipped `share` of the way through: the header, the size and the
    IEND chunk all look right, so only decoding can find it (the chunk's CRC no longer matches)."""
    start = data.index(b"IDAT") + 4
    end = data.rindex(b"IEND") - 12
    spot = start + int((end - start) * share)
    return data[:spot] + bytes([data[spot] ^ 0xFF]) + data[spot + 1 :]


def test_a_png_is_recognized_while_its_rows_are_still_decoding(split_nodes, big_scene):
    """The tiling task decodes a PNG band by band after publishing the chord: tile tasks recognize the batches whose
    tiles are stored while later rows are still decoding (the serial part of the job overlaps the parallel one). The
    tiling process is held at the end of the first row of tiles until a tile of it is recognized, then let go: the
    overlap is there by construction, on a machine of any speed. One tile process is enough, if it is not the
    tiling task's own (on the tiling node the PNG would be decoded whole): uploaded or a shared file, it streams."""
    scene, path = big_scene
    tiles = len(grid(3000, 4000))
    server, caller, _, gate = split_nodes
    client = server.client()
    image = store.put_bytes(client, Path(path).read_bytes(), 600)  # through a redis: reference, like a client
    gate.hold_after(1)
    job = caller.send_task("tilerec.recognize", args=[image, "qrcode"], kwargs={"batch_size": 1}, queue="tilerec")
    held = gate.wait_held()
    ready, records = (f"tilerec:job:{job.id}:{part}" for part in ("ready", "records"))
    wait_for(lambda: client.hlen(records) > 0, TIMEOUT)
    assert held < tiles and int(client.get(ready)) == held, "the rows below the first were decoded meanwhile"
    gate.release()
    uploaded = job.get(timeout=TIMEOUT)
    shared = caller.send_task("tilerec.recognize", args=[path, "qrcode"], kwargs={"batch_size": 1}, queue="tilerec")
    results = [uploaded, shared.get(timeout=TIMEOUT)]
    leftovers = sorted(client.scan_iter("tilerec:job:*"))
    for result in results:
        assert_each_code_once(result["detections"], scene.truths)
        assert result["timings"]["streamed_decode_s"] > 0 and result["timings"]["decode_s"] == 0
    assert leftovers == []


def test_a_streamed_png_is_cut_into_batches_within_rows_of_tiles(worker, redis_server, big_scene):
    """A streamed PNG's tiles are ready row by row (once the decoding reaches a row's bottom): an auto batch that
    reached into the next row would keep its task waiting while it had tiles to recognize."""
    scene, path = big_scene
    job = recognize.delay(path, "qrcode")
    result = job.get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)
    assert result["timings"]["streamed_decode_s"] > 0
    row_of = {window.index: window.y for window in grid(3000, 4000)}  # 6 rows of 8 tiles
    spans = batch_ranges(redis_server, job.id)
    assert len(spans) == result["tiling"]["batches"] > 6
    assert [first for first, _ in spans] == [0] + [stop for _, stop in spans[:-1]] and spans[-1][1] == 48
    assert all(row_of[first] == row_of[stop - 1] for first, stop in spans), spans
    assert tilerec_keys(redis_server) == []


def batch_ranges(server: RedisServer, job_id: str) -> list[tuple[int, int]]:
    """The tile ranges of the job's batch tasks, from their results (result_extended keeps each task's args)."""
    client = server.client()
    metas = [json.loads(client.get(key)) for key in client.scan_iter("celery-task-meta-*")]
    return sorted(
        (meta["args"][1], meta["args"][2])
        for meta in metas
        if meta.get("name") == "tilerec.recognize_tiles" and meta["args"][0] == job_id
    )


def test_a_stream_that_outlives_its_merge_deletes_all_it_wrote(redis_server):
    """A cancelled job's merge can run while its tiling task still stores tiles: whatever the tiling task writes
    after that (tiles, the ready count, the decoding times) it deletes."""
    from tasks import store

    client, job_id = redis_server.client(), "outlived-by-its-stream"
    windows = grid(1300, 1300)  # 3 rows of 3 tiles
    store.put_job(client, job_id, "{}", len(windows), 60, streamed=True)

    def decoded():
        for window in windows:
            if window.index == len(windows) - 1:
                store.delete_job(client, job_id, len(windows))  # the merge ran (the job was cancelled)
            yield window, np.full((window.height, window.width), 7, np.uint8)

    assert store.put_tiles(client, job_id, decoded(), ttl=60, rows={3, 6, 9}) is False
    assert tilerec_keys(redis_server) == []


def test_a_decoding_that_stores_no_row_beats_while_it_lives_and_recreates_no_cleaned_job(redis_server, monkeypatch):
    """A WebP is decoded whole before its first row is stored: its tile tasks see the decoding's beat go up, so
    they wait rather than give their process back as for a dead decoder; once the merge cleaned the job up (a
    cancel), a beat writes nothing back."""
    from tasks import store

    monkeypatch.setattr(store, "STREAM_BEAT_S", 0.01)
    client, job_id = redis_server.client(), "decoded-whole-first"
    store.put_job(client, job_id, "{}", 4, 60, streamed=True)
    with store.decoding(client, job_id, 60):
        wait_for(lambda: store.beats(client, job_id) >= 3)
        assert store.stream_state(client, job_id)[0] == 0  # no row yet: only the beat says it is alive
        store.delete_job(client, job_id, 4)
        time.sleep(5 * store.STREAM_BEAT_S)  # beats after the cleanup: none may write the key again
    assert tilerec_keys(redis_server) == []


def test_a_png_damaged_mid_stream_fails_the_job_clearly_and_leaves_nothing(worker, redis_server, big_scene):
    _, path = big_scene
    damaged = IMAGES_ROOT / "damaged-mid-stream.png"
    damaged.write_bytes(idat_damaged_at(Path(path).read_bytes(), 0.7))
    with pytest.raises(Exception) as raised:
        recognize.delay(str(damaged), "qrcode", batch_size=2).get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError"
    assert "is damaged or cut short" in str(raised.value) and "libpng read error" in str(raised.value)
    assert tilerec_keys(redis_server) == []
    again = recognize.delay(path, "qrcode", batch_size=2).get(timeout=TIMEOUT)  # the worker is still up
    assert len(again["detections"]) == 16


def test_a_one_process_worker_decodes_a_png_before_recognizing_it(tmp_path, big_scene):
    """One tile process could only recognize after the decoding, so the PNG is not streamed: the tiling task
    decodes it and stores its tiles (row by row, never whole) before publishing the chord; libpng names the damage."""
    scene, path = big_scene
    damaged = IMAGES_ROOT / "damaged-decoded-whole.png"
    damaged.write_bytes(idat_damaged_at(Path(path).read_bytes(), 0.7))
    with RedisServer() as server:
        caller = caller_app(server.url)
        env = slow_workers_env(server, TILEREC_THREADS_PER_PROCESS="2")
        try:
            with Worker(server.url, 1, env=env, log_file=str(tmp_path / "worker.log")):
                result = caller.send_task("tilerec.recognize", args=[path, "qrcode"], queue="tilerec").get(TIMEOUT)
                with pytest.raises(Exception) as raised:
                    caller.send_task("tilerec.recognize", args=[str(damaged), "qrcode"], queue="tilerec").get(TIMEOUT)
                leftovers = sorted(server.client().scan_iter("tilerec:job:*"))
        finally:
            caller.close()
    assert_each_code_once(result["detections"], scene.truths)
    assert result["timings"]["decode_s"] > 0 and "streamed_decode_s" not in result["timings"]
    assert type(raised.value).__name__ == "ImageError"
    assert "is damaged or cut short" in str(raised.value) and "libpng read error" in str(raised.value)
    assert leftovers == []


def broker_idle(client) -> bool:
    """Nothing waits in tilerec's queues and nothing taken from them is unacknowledged: every task published has
    been run (Redis deletes a list once it is empty)."""
    queues = [key for key in client.scan_iter(match="tilerec*", _type="list") if not key.startswith(b"tilerec:")]
    return not queues and client.hlen("unacked") == 0


@pytest.fixture(scope="module")
def tiling_and_tile_nodes(tmp_path_factory) -> Iterator[tuple[RedisServer, Celery, Worker, StoreGate]]:
    """A tiling node of one process (the jobs queue only) beside a tile node of one process: the tiling process can
    be killed while it decodes a streamed PNG, and a PNG is streamed, since the tile process is not the tiling one.
    The tiling node reaches the store through the gate (tests/held_store.py), which holds it where a test says.
    Started once for the module's tests that need them (`split_nodes`)."""
    logs = tmp_path_factory.mktemp("split-nodes")
    with RedisServer() as server, StoreGate(server.port) as gate:
        env = slow_workers_env(server)
        caller = caller_app(server.url)
        tiling_env = {**env, "TILEREC_STORE_URL": gate.url}
        tiling = Worker(server.url, 1, queues=["tilerec"], env=tiling_env, log_file=str(logs / "tiling.log"))
        tiles = Worker(server.url, 1, queues=["tilerec.tiles"], env=env, log_file=str(logs / "tiles.log"))
        try:
            with tiles, tiling:
                yield server, caller, tiling, gate
        finally:
            caller.close()


@pytest.fixture
def split_nodes(tiling_and_tile_nodes) -> Iterator[tuple[RedisServer, Celery, Worker, StoreGate]]:
    """The module's tiling and tile nodes, their gate holding nothing once the test is over."""
    yield tiling_and_tile_nodes
    tiling_and_tile_nodes[3].disarm()


def test_a_tiling_process_killed_while_decoding_resumes_without_a_second_chord(split_nodes, big_scene):
    """The tiling process, killed while it decodes a PNG after publishing the chord: the redelivered tiling task
    finishes the decoding instead of planning the job again, and the job's one merge gives the result."""
    scene, path = big_scene
    server, caller, tiling, gate = split_nodes
    gate.hold_after(1)  # the end of the first row of tiles: the decoder waits there until killed
    job = caller.send_task("tilerec.recognize", args=[path, "qrcode"], kwargs={"batch_size": 1}, queue="tilerec")
    client = server.client()
    assert gate.wait_held() < len(grid(3000, 4000))
    os.kill(tiling.child_pids()[0], signal.SIGKILL)
    gate.drop()
    result = job.get(timeout=TIMEOUT)
    wait_for(lambda: broker_idle(client), TIMEOUT)  # a second chord, had one been published, has run by now
    leftovers = sorted(client.scan_iter("tilerec:job:*"))
    log = Path(tiling.log_file).read_text()
    assert_each_code_once(result["detections"], scene.truths)
    assert result["tiling"]["tiles"] == len(grid(3000, 4000)) and result["failed_tiles"] == []
    # the merge carries the job's id too (the tiling task replaces itself with the chord)
    received = {
        task: len(re.findall(rf"Task tilerec\.{task}\[{re.escape(job.id)}\] received", log))
        for task in ("recognize", "merge")
    }
    assert received == {"recognize": 2, "merge": 1}  # killed, then delivered again; one merge
    assert leftovers == []


def test_a_png_that_kills_its_tiling_process_every_time_fails_after_three_tries(split_nodes, big_scene):
    """The crash-loop guard of a streamed decoding: killed while decoding on three deliveries, the job fails with
    an ImageError saying so, instead of coming back forever."""
    _, path = big_scene
    server, caller, tiling, gate = split_nodes
    gate.hold_after(1)
    job = caller.send_task("tilerec.recognize", args=[path, "qrcode"], kwargs={"batch_size": 1}, queue="tilerec")
    client = server.client()
    killed = set()
    for _ in range(3):  # each delivery decodes a row further than the one before, is held there, then dies
        reached = gate.wait_held()
        assert reached < len(grid(3000, 4000))
        # the pool's current child (a killed one may still be listed until it is reaped)
        (victim,) = (pid for pid in tiling.child_pids() if pid not in killed)
        gate.hold_after(reached + 1)  # the next delivery sets no row end up to `reached` again
        os.kill(victim, signal.SIGKILL)
        gate.drop()
        killed.add(victim)
        wait_for(lambda: any(pid not in killed for pid in tiling.child_pids()))
    with pytest.raises(Exception) as raised:
        job.get(timeout=TIMEOUT)
    leftovers = sorted(client.scan_iter("tilerec:job:*"))
    assert type(raised.value).__name__ == "ImageError"
    assert "the worker process died all 3 times it decoded it" in str(raised.value)
    assert leftovers == []
