"""The whole job through a real Redis broker and real worker processes."""

import math

import cv2
import numpy as np
import pytest

from pipeline import recognize_image
from pipeline.scenes.codes import qr_code, qr_scene
from pipeline.tiling import grid, tail_smallest, tapered_sizes
from tasks import recognize, store
from tasks.client import put_image, submit
from tasks.planning import BATCHES_PER_PROCESS
from tests.conftest import tilerec_keys
from tests.scenes import assert_each_code_once

pytestmark = pytest.mark.cluster  # every test here starts Redis and Celery workers of its own

TIMEOUT = 120


@pytest.fixture(scope="module")
def scene():
    return qr_scene(3000, 2000, count=12, seam_share=0.5, seed=11)


@pytest.fixture(scope="module")
def scene_path(scene, tmp_path_factory):
    from tests.conftest import IMAGES_ROOT

    path = IMAGES_ROOT / "qr-scene.png"
    cv2.imwrite(str(path), scene.image)
    return str(path)


def test_distributed_finds_every_code_once_and_equals_in_process(worker, redis_server, scene, scene_path):
    outcome = recognize.delay(scene_path, "qrcode", tile=640, overlap=0.2)
    result = outcome.get(timeout=TIMEOUT)
    assert outcome.name == "tilerec.merge", "the tiling task became chord(tiles, merge)"
    assert result["schema"] == "tilerec/recognition@2"
    assert result["image"] == {"width": 3000, "height": 2000, "source": scene_path}
    assert result["tiling"]["tiles"] == len(grid(2000, 3000, 640, 0.2))
    assert_each_code_once(result["detections"], scene.truths)
    in_process = recognize_image(cv2.imread(scene_path), "qrcode", tile=640, overlap=0.2)
    assert result["detections"] == in_process.to_json()["detections"]
    assert result["failed_tiles"] == []
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize("batch_size", [5, 1000])  # 1000: every tile in one batch, recognized by the tiling task
def test_batches_of_tiles_give_the_same_result(worker, redis_server, scene, scene_path, batch_size):
    tiles = len(grid(2000, 3000, 640, 0.2))
    result = recognize.delay(scene_path, "qrcode", batch_size=batch_size).get(timeout=TIMEOUT)
    assert result["tiling"]["batches"] == math.ceil(tiles / batch_size)
    assert result["tiling"]["tasks"] == result["tiling"]["batches"], "one task per batch"
    assert_each_code_once(result["detections"], scene.truths)
    in_process = recognize_image(cv2.imread(scene_path), "qrcode")
    assert result["detections"] == in_process.to_json()["detections"]
    assert tilerec_keys(redis_server) == []


def test_stored_bytes_and_arrays_are_claim_checked(worker, redis_server, scene):
    _, png = cv2.imencode(".png", scene.image)
    reference = put_image(png.tobytes())
    assert reference.startswith("redis:tilerec:input:")
    by_bytes = recognize.delay(reference, "qrcode").get(timeout=TIMEOUT)
    assert_each_code_once(by_bytes["detections"], scene.truths)
    job = submit(scene.image, "qrcode")
    by_array = job.get(timeout=TIMEOUT).to_json()
    assert by_array["detections"] == by_bytes["detections"]
    assert job.progress() == (by_array["tiling"]["tiles"], by_array["tiling"]["tiles"])
    assert tilerec_keys(redis_server) == []


def test_a_one_batch_job_is_recognized_in_its_tiling_task(worker, redis_server, images_root):
    picture, (bx, by, bw, bh) = qr_code("one tile", 4)
    image = np.full((300, 420), 255, dtype=np.uint8)
    image[40 : 40 + picture.shape[0], 70 : 70 + picture.shape[1]] = picture
    path = images_root / "one.png"
    cv2.imwrite(str(path), image)
    outcome = recognize.delay(str(path), "qrcode")
    result = outcome.get(timeout=TIMEOUT)
    assert outcome.name == "tilerec.recognize", "no chord: the tiling task itself stored the result"
    assert result["tiling"]["tiles"] == result["tiling"]["batches"] == result["tiling"]["tasks"] == 1
    assert tilerec_keys(redis_server) == []
    [found] = result["detections"]
    assert found["text"] == "one tile"
    assert max(abs(a - b) for a, b in zip(found["box"], (70 + bx, 40 + by, bw, bh), strict=True)) <= 3
    assert result["image"]["width"] == 420 and result["image"]["height"] == 300


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("{root}/qr-scene.png", "cats"), {}, "RecognizerError", "unknown recognizer 'cats'"),
        (("{root}/missing.png", "qrcode"), {}, "ImageError", "does not exist"),
        (("/etc/hostname", "qrcode"), {}, "ImageError", "outside the allowed roots"),
        ((12345, "qrcode"), {}, "ImageError", "must be a file path, URL or redis: reference"),
        (("http://127.0.0.1:9/a.png", "qrcode"), {}, "ImageError", "not fetched from URLs"),
        (("redis:tilerec:input:nothing-here", "qrcode"), {}, "ImageError", "no image is stored"),
        (("{root}/qr-scene.png", "qrcode"), {"overlap": 2}, "OptionsError", "overlap must be a ratio"),
        (("{root}/qr-scene.png", "qrcode"), {"shiny": True}, "RecognizerError", "has no parameter"),
    ],
)
def test_bad_requests_fail_clearly_through_the_async_result(
    worker, redis_server, app, scene_path, images_root, args, kwargs, error, message
):
    args = tuple(a.format(root=images_root) if isinstance(a, str) else a for a in args)
    outcome = app.send_task("tilerec.recognize", args=args, kwargs=kwargs)
    with pytest.raises(Exception) as raised:
        outcome.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == error
    assert message in str(raised.value)
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize("batch_size", [None, 1000])  # through the chord, and in the tiling task
def test_a_tile_that_fails_is_named_and_the_store_is_cleaned(worker, redis_server, scene_path, batch_size):
    # the dictionary name is a string, so it passes the option check and fails only when a worker builds it
    outcome = recognize.delay(scene_path, "aruco", dictionary="DICT_NOPE", batch_size=batch_size)
    with pytest.raises(Exception) as raised:
        outcome.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "TileFailure"
    tiles = len(grid(2000, 3000))
    expected = f"{tiles} of {tiles} tiles failed: tile 0 at [0, 0, 640, 640]: RecognizerError: unknown ArUco"
    assert expected in str(raised.value)
    assert tilerec_keys(redis_server) == []


def test_the_worker_is_still_up_after_the_errors(worker, scene, scene_path):
    assert worker.process.poll() is None
    result = recognize.delay(scene_path, "qrcode").get(timeout=TIMEOUT)
    assert len(result["detections"]) == len(scene.truths)


def test_auto_batches_are_sized_from_what_earlier_tiles_cost(worker, redis_server, scene_path):
    client = redis_server.client()
    params = {"dictionary": "DICT_4X4_50"}
    client.delete(*client.scan_iter("tilerec:cost:aruco:*"), "absent")  # earlier tests' measurements
    store.record_tile_cost(client, "aruco", params, 1e6)  # as if a tile took 1000 s: one tile per task
    tiles = len(grid(2000, 3000))
    first = recognize.delay(scene_path, "aruco").get(timeout=TIMEOUT)
    assert first["tiling"]["batches"] == tiles
    # that job measured the real cost (a few ms a tile) and halved the gap to it
    learned = store.get_tile_cost(client, "aruco", params)
    assert 1e6 / 2 < learned < 1e6 / 2 + 1000
    client.delete(*client.scan_iter("tilerec:cost:aruco:*"))
    store.record_tile_cost(client, "aruco", params, 0.001)  # now nearly free: the floor of batches decides
    cheap = recognize.delay(scene_path, "aruco").get(timeout=TIMEOUT)
    least = BATCHES_PER_PROCESS * worker.concurrency  # auto: 4 per process of the tiling node
    lanes = store.tile_processes(client)  # the nodes taking tiles (tasks/roster.py): a tail for each process
    assert lanes >= worker.concurrency
    size = math.ceil(tiles / least)  # tiles so cheap that no tail batch would hold TAIL_MIN_MS: no halving tail
    assert cheap["tiling"]["batches"] == len(tapered_sizes(tiles, size, lanes, tail_smallest(0.001, size)))
    assert cheap["detections"] == first["detections"]
