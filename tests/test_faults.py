"""Losing a node, the broker or memory, on default settings: every single fault ends in a correct result.

Real processes throughout: worker nodes are killed or frozen as whole process groups, redis-server is stopped and
started again from its append-only file, a Sentinel master is killed. Each fault is injected only once the job is
seen in progress (some tiles done, not all), so it can never land after the job ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.tiling import grid
from tasks.local import RedisServer, Worker, _stop, free_port
from tests.conftest import IMAGES_ROOT, caller_app
from tests.scenes import assert_each_code_once
from tests.sentinels import SentinelGroup
from tests.test_reliability import marked_scene, wait_for

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

TIMEOUT = 180
TILES = len(grid(3000, 4000))  # 48, a batch each here
SLOW_S = 0.2  # per tile: 48 tiles are 4.8 s of work on 2 processes, 9.6 s on one


def env_for(url: str, **settings: str) -> dict[str, str]:
    return {
        "TILEREC_BROKER_URL": url,
        "TILEREC_RESULT_BACKEND": url,
        "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
        "TILEREC_PLUGIN_MODULES": "tests.faulty",
        **settings,
    }


CLIENT = """
import json, sys, time, traceback
from tasks.celery import configure
url, path, recognizer, options, plain = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
configure(broker_url=url, result_backend=url, tilerec_store_url=url)
from tasks import recognize
from tasks.client import Job


job = Job(recognize.delay(path, recognizer, **options))
print(json.dumps({"id": job.id}), flush=True)
sys.stdin.readline()  # the test says when to wait: after it saw the job in progress
began = time.monotonic()
try:
    result = job.result.get(timeout=180) if plain == "plain" else job.get(timeout=180).to_json()
    print(json.dumps({"result": result, "waited": time.monotonic() - began}), flush=True)
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}", "waited": time.monotonic() - began,
                      "trace": traceback.format_exc()}), flush=True)
"""


class Client:
    """A client process with one job; `wait()` lets it call get() and returns what it got."""

    def __init__(self, url: str, path: str, recognizer: str, plain: bool = False, **options: object) -> None:
        command = [sys.executable, "-c", CLIENT, url, path, recognizer, json.dumps(options), "plain" if plain else ""]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdin is not None
        self.id = json.loads(self.process.stdout.readline())["id"]

    def wait(self) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        self.process.wait(30)
        return json.loads(line)


def done_tiles(client, job_id: str) -> int:
    return int(client.hlen(f"tilerec:job:{job_id}:records"))


def in_progress(client, job_id: str, at_least: int = 4) -> None:
    """The job has tiles done, and not all: a fault injected now hits a running job."""
    wait_for(lambda: done_tiles(client, job_id) >= at_least, timeout=60)
    assert done_tiles(client, job_id) < TILES, "the job ended before the fault"


def keys_left(client) -> list[bytes]:
    return sorted(client.scan_iter("tilerec:job:*"))


@pytest.fixture
def two_nodes(tmp_path) -> Iterator[tuple[RedisServer, Worker, Worker]]:
    with RedisServer() as server:
        env = env_for(server.url)
        first = Worker(server.url, 1, env=env, log_file=str(tmp_path / "first.log")).start()
        second = Worker(server.url, 1, env=env, log_file=str(tmp_path / "second.log")).start()
        try:
            yield server, first, second
        finally:
            first.stop()
            second.stop()


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_node_s_work_comes_back_within_seconds(two_nodes, big_scene, fault):
    """A whole node SIGKILLed (main process and pool), or frozen with SIGSTOP as a network partition looks: the
    batches it held come back once their leases lapse (TILEREC_VISIBILITY_TIMEOUT, 15 s) and the other node
    finishes the job, each tile once, within the client's wait (an hour's visibility timeout, as before the
    leases, would outlast it). A frozen node resumed later does no harm: its late batch finds the job over and
    writes nothing."""
    server, lost, _ = two_nodes
    truth, path = big_scene
    client = Client(server.url, path, "tests.faulty:Slow", batch_size=1, seconds=SLOW_S)
    in_progress(server.client(), client.id)
    os.killpg(lost.process.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    try:
        outcome = client.wait()
    finally:
        if fault == "frozen":
            os.killpg(lost.process.pid, signal.SIGCONT)
    assert "result" in outcome, outcome
    assert_each_code_once(outcome["result"]["detections"], truth.truths)
    assert outcome["result"]["failed_tiles"] == []
    if fault == "frozen":
        caller = caller_app(server.url)
        try:  # the resumed node finishes its batch: late, once the job is over
            wait_for(lambda: idle(caller, lost), timeout=60, step=0.2)
        finally:
            caller.close()
    assert keys_left(server.client()) == []
    assert server.client().get(f"celery-task-meta-{client.id}") is not None
    assert json.loads(server.client().get(f"celery-task-meta-{client.id}"))["status"] == "SUCCESS"


def idle(caller, node: Worker) -> bool:
    """The node answers, running no task."""
    return caller.control.inspect([node.hostname], timeout=1.0).active() == {node.hostname: []}


@pytest.mark.parametrize("down_s", [1.0, 5.0])
def test_a_broker_restart_loses_no_job(tmp_path, big_scene, down_s):
    """redis-server (append-only file on) stopped and started again while one job runs and others wait: every job
    completes correctly; tilerec's Job.get() and Celery's own AsyncResult.get() ride through it."""
    truth, path = big_scene
    server = RedisServer(appendonly=True, options=["--appendfsync", "always"]).start()
    worker = Worker(server.url, 2, env=env_for(server.url), log_file=str(tmp_path / "worker.log")).start()
    try:
        running = Client(server.url, path, "tests.faulty:Slow", batch_size=2, seconds=0.1)
        queued = Client(server.url, path, "tests.faulty:Slow", batch_size=2, seconds=0.1)
        plain = Client(server.url, path, "tests.faulty:Slow", plain=True, batch_size=2, seconds=0.1)
        in_progress(server.client(), running.id)
        assert done_tiles(server.client(), queued.id) < TILES and done_tiles(server.client(), plain.id) < TILES
        server.stop(keep=True)
        time.sleep(down_s)
        server.start()
        outcomes = [client.wait() for client in (running, queued, plain)]
        for outcome in outcomes:
            assert "result" in outcome, outcome
            assert_each_code_once(outcome["result"]["detections"], truth.truths)
            assert outcome["result"]["failed_tiles"] == []
        wait_for(lambda: keys_left(server.client()) == [], timeout=20)
        assert worker.process.poll() is None
    finally:
        worker.stop()
        server.stop()


def test_tilerec_run_rides_through_a_broker_restart(tmp_path, big_scene):
    truth, path = big_scene
    server = RedisServer(appendonly=True, options=["--appendfsync", "always"]).start()
    worker = Worker(server.url, 2, env=env_for(server.url), log_file=str(tmp_path / "worker.log")).start()
    try:
        command = [sys.executable, "-m", "tasks.cli", "run", path, "-r", "tests.faulty:Slow", "-p", "seconds=0.1",
                   "--batch-size", "2", "--broker", server.url, "--shared-path", "--json", "-", "-q"]  # fmt: skip
        env = {**os.environ, "TILEREC_PLUGIN_MODULES": "tests.faulty"}  # the CLI checks the job's options too
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(done_tiles(server.client(), key.decode().split(":")[2]) >= 4
                             for key in server.client().scan_iter("tilerec:job:*:records")), timeout=60)  # fmt: skip
        server.stop(keep=True)
        time.sleep(2)
        server.start()
        output, errors = run.communicate(timeout=TIMEOUT)
        assert run.returncode == 0, errors[-2000:]
        assert_each_code_once(json.loads(output)["detections"], truth.truths)
    finally:
        worker.stop()
        server.stop()


@contextmanager
def supervised(worker: Worker) -> Iterator[list[int]]:
    """The worker started again whenever it exits, as compose's `restart: unless-stopped` and a Kubernetes
    Deployment do; yields the exit codes seen."""
    exits: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if worker.process is not None and (code := worker.process.poll()) is not None:
                exits.append(code)
                worker.start(wait=False)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield exits
    finally:
        done.set()
        watcher.join()


def test_a_sentinel_failover_mid_job_ends_the_job(tmp_path, big_scene):
    """Redis with Sentinel: the master killed mid-job. The sentinels promote the replica and the workers, the
    store and the client follow them; the job completes (or, had the failover lost the job's latest writes, fails
    with an error saying so), and never hangs. The worker is supervised as deployed: kombu 5.7's Sentinel channel
    can end the worker's consumer when its connection drops with a task unacknowledged ("Unrecoverable error:
    AttributeError ... 'hostname'", restoring the unacked message after the connection was let go), and the
    supervisor's restart is what brings it back."""
    truth, path = big_scene
    with SentinelGroup() as group:
        env = env_for(group.url)
        worker = Worker(group.url, 2, env=env, log_file=str(tmp_path / "worker.log")).start()
        try:
            with supervised(worker):
                client = Client(group.url, path, "tests.faulty:Slow", batch_size=2, seconds=0.1)
                in_progress(group.master.client(), client.id)
                old = group.master_port()
                os.killpg(group.master.process.pid, signal.SIGKILL)
                outcome = client.wait()
                assert group.master_port() != old, "no failover happened"
        finally:
            worker.stop()
    if "error" in outcome:  # the client's 180 s wait running out would be an error too: the job never hangs
        assert "lost its state in Redis" in outcome["error"], outcome
    else:
        assert_each_code_once(outcome["result"]["detections"], truth.truths)


def test_a_whole_cluster_restarted_finishes_its_jobs(tmp_path, big_scene):
    """Every node stopped with SIGTERM (warm shutdown: running batches finish, the rest go back to the queue),
    then started again: the running and the queued job complete."""
    truth, path = big_scene
    with RedisServer() as server:
        env = env_for(server.url)
        nodes = [Worker(server.url, 1, env=env, log_file=str(tmp_path / f"node{n}.log")) for n in range(2)]
        try:
            for node in nodes:
                node.start()
            running = Client(server.url, path, "tests.faulty:Slow", batch_size=1, seconds=0.1)
            queued = Client(server.url, path, "tests.faulty:Slow", batch_size=1, seconds=0.1)
            in_progress(server.client(), running.id)
            for node in nodes:
                node.process.send_signal(signal.SIGTERM)
            for node in nodes:
                assert node.process.wait(60) == 0
            assert done_tiles(server.client(), running.id) < TILES
            for node in nodes:
                node.start()
            for client in (running, queued):
                outcome = client.wait()
                assert "result" in outcome, outcome
                assert_each_code_once(outcome["result"]["detections"], truth.truths)
            assert keys_left(server.client()) == []
        finally:
            for node in nodes:
                node.stop()


@pytest.mark.parametrize("recognizer", ["ExhaustsMemoryOnMarker", "KilledOnMarker"])
def test_running_out_of_memory_fails_the_tile_and_the_job_still_merges(worker, redis_server, recognizer):
    """A tile whose recognizer raises MemoryError (its process's address space capped, for real) is a failed tile
    saying so, and the process is replaced; one whose process the OOM killer would kill (SIGKILL after a big
    allocation) is a crash: retried, then a failed tile after 3 deaths. Either way the job merges the rest."""
    from tasks import recognize

    path, failing, expected = marked_scene(f"oom-{recognizer}.png")
    before = set(worker.child_pids())
    result = recognize.delay(path, f"tests.faulty:{recognizer}", on_tile_error="partial", batch_size=1).get(
        timeout=TIMEOUT
    )
    assert sorted(f["tile"] for f in result["failed_tiles"]) == [w.index for w in failing]
    reason = "MemoryError: Unable to allocate 1.00 GiB" if "Memory" in recognizer else "died all 3 times"
    assert all(reason in f["error"] for f in result["failed_tiles"]), result["failed_tiles"]
    assert sorted(d["text"] for d in result["detections"]) == expected
    # the result is stored before the process exits, so its replacement may still be starting
    wait_for(lambda: len(worker.child_pids()) == 2 and set(worker.child_pids()) != before)
    assert Path(worker.log_file).exists() and worker.process.poll() is None


def test_sentinel_urls_work_for_workers_the_cli_and_flower(tmp_path, big_scene):
    """The broker, backend and store given as sentinels: a worker takes jobs, `tilerec run --broker` submits and
    waits, and Flower sees the worker and the job."""
    from tests.test_flower import PASSWORD, USER, Flower

    truth, path = big_scene
    with SentinelGroup() as group:
        env = env_for(group.url)
        worker = Worker(group.url, 1, env=env, name="sentinel-node", log_file=str(tmp_path / "worker.log")).start()
        port = free_port()
        command = [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={port}", "--address=127.0.0.1",
                   f"--basic-auth={USER}:{PASSWORD}"]  # fmt: skip
        flower = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            watching = Flower(f"http://127.0.0.1:{port}", flower)
            wait_for(lambda: _answers(watching), timeout=30, step=0.2)
            run = subprocess.run(
                [sys.executable, "-m", "tasks.cli", "run", path, "-r", "qrcode", "--broker", group.url,
                 "--shared-path", "--json", "-", "-q"],
                env={**os.environ, "TILEREC_RESULT_BACKEND": group.url}, capture_output=True, text=True,
                timeout=TIMEOUT,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr[-2000:]
            result = json.loads(run.stdout)
            assert_each_code_once(result["detections"], truth.truths)
            wait_for(lambda: worker.hostname in watching.json("/api/workers?refresh=1"), timeout=30, step=0.5)
        finally:
            _stop(flower, 10)
            worker.stop()


def _answers(flower) -> bool:
    try:
        return flower.get("/healthcheck", credentials=None) == (200, "OK")
    except OSError:
        return False
