"""The tile worker registry, for real: worker nodes register their processes in Redis while they consume the tiles
queue, and a job gets a tile task per live process and enough automatic batches for each to take its share. A Redis
and workers of their own, so no other test's workers are counted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cv2
import pytest

from celeryconfig import tilerec_batch_target_ms
from pipeline.inference import plan
from pipeline.options import parse_options
from pipeline.scenes import code_scene
from tasks import BATCHES_PER_PROCESS, UNKNOWN_CLUSTER_BATCHES, registry
from tasks.local import RedisServer, Worker
from tests.conftest import IMAGES_ROOT, caller_app
from tests.scenes import assert_each_code_once

TILES_QUEUE = "tilerec.tiles"
TILE_PROCESSES = 3


def test_live_tile_processes_set_how_many_tasks_and_batches_a_job_gets(tmp_path):
    scene = code_scene(8000, 2000, kinds=("aruco",), seed=11)  # 4 rows of 16 tiles
    path = IMAGES_ROOT / "registry-scene.png"
    cv2.imwrite(str(path), scene.image)
    options = parse_options("aruco", {})
    target = tilerec_batch_target_ms
    # a PNG, and a tile process other than the tiling one: streamed, so cut row by row of tiles
    expected_batches = len(
        plan(2000, 8000, options, None, target, BATCHES_PER_PROCESS * TILE_PROCESSES, row_by_row=True)
    )
    assert expected_batches != len(plan(2000, 8000, options, None, target, UNKNOWN_CLUSTER_BATCHES, row_by_row=True)), (
        "the scene tells apart"
    )

    with RedisServer() as server:
        client = server.client()
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT)}
        jobs = Worker(server.url, 1, queues=["tilerec"], env=env, log_file=str(tmp_path / "jobs.log"))
        tiles = Worker(server.url, TILE_PROCESSES, queues=[TILES_QUEUE], env=env, log_file=str(tmp_path / "tiles.log"))
        jobs.start(wait=False)
        tiles.start(wait=False)
        try:
            jobs.wait_ready()
            tiles.wait_ready()
            # the jobs-only node is not counted: it never takes a tile task
            assert registry.live_processes(client, TILES_QUEUE) == TILE_PROCESSES

            caller = caller_app(server.url)
            result = caller.send_task("tilerec.recognize", args=[str(path), "aruco"], queue="tilerec").get(timeout=120)
            caller.close()
            assert (result["tiling"]["batches"], result["tiling"]["tasks"]) == (expected_batches, TILE_PROCESSES)
            assert_each_code_once(result["detections"], scene.truths)

            # a node that died without unregistering lapses
            registry.register(client, TILES_QUEUE, "dead@elsewhere", 5, lapse_s=0.5)
            assert registry.live_processes(client, TILES_QUEUE) == TILE_PROCESSES + 5
            time.sleep(0.7)
            assert registry.live_processes(client, TILES_QUEUE) == TILE_PROCESSES
            assert client.hkeys(registry.registry_key(TILES_QUEUE)) == [tiles.hostname.encode()]

            tiles.stop()
            assert registry.live_processes(client, TILES_QUEUE) == 0
            assert not client.exists(registry.registry_key(TILES_QUEUE)), "a stopped cluster leaves nothing behind"
        finally:
            tiles.stop()
            jobs.stop()


def test_a_single_live_process_gets_no_tapered_tail(tmp_path):
    """One worker process takes every batch in turn: the halving tail that lets several finish together would only
    add batches. 2000² at 640/0.2 is 4 x 4 tiles; a batch target far above the whole job leaves the
    4-batches-per-process floor to decide: 4 batches of 4 tiles (tapered, it would be 1, 4, 4, 4, 2, 1), in one
    tile task."""
    path = IMAGES_ROOT / "registry-single.png"
    scene = code_scene(2000, 2000, kinds=("aruco",), seed=12)
    cv2.imwrite(str(path), scene.image)
    with RedisServer() as server:
        env = {
            "TILEREC_RESULT_BACKEND": server.url,
            "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
            "TILEREC_BATCH_TARGET_MS": "1000000",
        }
        worker = Worker(server.url, 1, env=env, log_file=str(tmp_path / "worker.log"))
        worker.start()
        try:
            assert registry.live_processes(server.client(), TILES_QUEUE) == 1
            caller = caller_app(server.url)
            result = caller.send_task("tilerec.recognize", args=[str(path), "aruco"], queue="tilerec").get(timeout=120)
            caller.close()
            tiling = result["tiling"]
            assert (tiling["tiles"], tiling["batches"], tiling["tasks"]) == (16, BATCHES_PER_PROCESS, 1)
            assert_each_code_once(result["detections"], scene.truths)
        finally:
            worker.stop()


COUNTS = (("TILEREC_MIN_BATCHES", "tilerec_min_batches"), ("TILEREC_TILE_TASKS", "tilerec_tile_tasks"))


@pytest.mark.parametrize("value", ["0", "-3", "many"])
@pytest.mark.parametrize(("name", "setting"), COUNTS)
def test_a_bad_count_setting_stops_the_worker_with_the_reason(name, setting, value):
    env = {**os.environ, name: value}
    loaded = subprocess.run([sys.executable, "-c", "import celeryconfig"], env=env, capture_output=True, text=True)
    assert loaded.returncode != 0
    assert f"{name} must be 'auto' or a whole number of at least 1, got '{value}'" in loaded.stderr


@pytest.mark.parametrize(("name", "setting"), COUNTS)
def test_count_settings_are_auto_by_default_or_the_number_given(name, setting):
    code = f"import celeryconfig; print(celeryconfig.{setting})"
    for value, parsed in (("", "None"), ("auto", "None"), (" AUTO ", "None"), ("5", "5")):
        env = {**os.environ, name: value}
        shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
        assert shown == parsed + "\n", value
