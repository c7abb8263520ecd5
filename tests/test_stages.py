"""The second stage on full-resolution crops: planning and helpers as pure functions, then whole jobs in process and
on real workers (crops exact against the scene drawn, the same result both ways, a failed crop, a killed process,
a cancel, message sizes, nothing left in Redis)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import pipeline
from pipeline.model import Detections, Recognition
from pipeline.options import OptionsError, parse_options
from pipeline.recognizers import RecognizerSpec, register
from pipeline.recognizers.stages import (
    CropPlan,
    SecondStage,
    StageError,
    crop_spans,
    crop_window,
    expand,
    plan_crops,
    quad_of,
    read_crops,
    rectify,
    shape_bounds,
)
from pipeline.shapes import obb_corners
from pipeline.tiling import Window, grid
from tasks.client import submit
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.staged import GREEN, RED, blob_scene, digest
from tests.test_reliability import wait_for

TIMEOUT = 120
STAGED = "tests.staged:DarkBlobs"
PAD = 3
# 1600x1200 at 640 px, 20 %: seams at x 512, 1024 and y 512. The second rectangle crosses three columns and two rows
# of tiles (six tiles), larger than any tile; the others lie inside one tile, one of them at the image's corner.
RECTS = [(100, 100, 50, 40), (500, 300, 900, 300), (1200, 900, 200, 100), (1560, 1170, 40, 30)]


@pytest.fixture(autouse=True)
def staged_allowed(allow_modules):
    allow_modules(["tests.faulty", "tests.shaped", "tests.staged"])


def expected(image: np.ndarray, rects=RECTS, pad: int = PAD) -> dict[tuple, dict]:
    """Per rectangle (its box): the crop window (box and pad, clipped to the image) and that window's digest."""
    height, width = image.shape[:2]
    found = {}
    for x, y, w, h in rects:
        x1, y1, x2, y2 = max(0, x - pad), max(0, y - pad), min(width, x + w + pad), min(height, y + h + pad)
        found[(x, y, w, h)] = {"window": [x1, y1, x2 - x1, y2 - y1], "digest": digest(image[y1:y2, x1:x2]),
                               "dark": w * h, "box_in_crop": [x - x1, y - y1, w, h]}  # fmt: skip
    return found


STAGE_COLUMNS = ("digest", "window", "dark", "box_in_crop")


def measured(document: dict) -> dict[tuple, dict]:
    """The stage's columns per detection (by box); the first stage's `pixels` counts one tile's piece only."""
    return {tuple(int(v) for v in d["box"]): {k: v for k, v in d["data"].items() if k in STAGE_COLUMNS}
            for d in document["detections"]}  # fmt: skip


def assert_crops_exact(document: dict, image: np.ndarray, rects=RECTS) -> None:
    assert measured(document) == expected(image, rects)
    stage = document["second_stage"]
    assert (stage["name"], stage["crops"], stage["failed_crops"]) == ("measure", len(rects), [])
    assert stage["output"] == {"read": len(rects), "dark_pixels": sum(w * h for *_, w, h in rects)}
    assert "secret" not in json.dumps(document), "records reach the result only through finish"


# -- pure functions


def test_a_crop_window_is_the_shape_with_its_margin_in_whole_pixels_clipped_to_the_region():
    assert crop_window(np.array([10.2, 20.7, 30.1, 40.0]), Window(0, 0, 0, 100, 100)) == Window(0, 10, 20, 21, 20)
    assert crop_window(expand(np.array([10, 20, 30, 40]), 0.5, 2), Window(0, 0, 0, 100, 100), 7) == Window(
        7, 0, 8, 42, 44
    )
    assert crop_window(np.array([90, 90, 130, 120]), Window(0, 50, 50, 60, 60)) == Window(0, 90, 90, 20, 20)
    assert crop_window(np.array([200, 200, 230, 230]), Window(0, 0, 0, 100, 100)) is None


def test_shape_bounds_hold_the_box_the_oriented_box_s_corners_and_the_mask():
    detections = Detections.from_xywh(
        [[100, 100, 10, 10], [0, 0, 5, 5], [50, 50, 4, 4]], [1.0] * 3, "x",
        obb=[[105, 105, 40, 10, 30], None, None], masks=[None, None, [[[[40, 60], [70, 60], [70, 90]]]]],
    )  # fmt: skip
    corners = obb_corners(detections.obb[:1])[0]
    assert np.allclose(shape_bounds(detections, 0), [*corners.min(axis=0), *corners.max(axis=0)])
    assert shape_bounds(detections, 1).tolist() == [0, 0, 5, 5]
    assert shape_bounds(detections, 2).tolist() == [40, 50, 70, 90]


def test_the_plan_takes_the_wanted_rows_the_best_scored_within_max_crops_in_row_order():
    class EveryOther(SecondStage):
        pad = 1

        def wants(self, detections: Detections) -> np.ndarray:
            return np.arange(0, len(detections), 2)

    boxes = [[10 * i, 0, 5, 5] for i in range(6)]
    detections = Detections.from_xywh(boxes, [0.1, 0.9, 0.5, 0.9, 0.7, 0.9], "x")
    bounds = Window(0, 0, 0, 100, 100)
    plan = plan_crops(detections, EveryOther(), bounds)
    assert [(c.row, c.window.to_list()) for c in plan.crops] == [
        (0, [0, 0, 0, 6, 6]), (2, [1, 19, 0, 7, 6]), (4, [2, 39, 0, 7, 6])
    ]  # fmt: skip
    limited = plan_crops(detections, EveryOther(), bounds, max_crops=2)
    assert [c.row for c in limited.crops] == [2, 4] and limited.over_limit == 1
    assert [c.window.index for c in limited.crops] == [0, 1]
    assert CropPlan.from_json(json.loads(json.dumps(limited.to_json()))) == limited


def test_crop_batches_cover_every_crop_once():
    for count, size, least in [(1, None, 8), (37, None, 8), (100, 7, 1), (5, None, 1), (1000, None, 4)]:
        spans = crop_spans(count, 10.0, 400.0, least, size)
        assert [i for first, stop in spans for i in range(first, stop)] == list(range(count))
    assert crop_spans(100, 10.0, 400.0, 1, 7)[0] == (0, 7)
    assert crop_spans(0, 10.0, 400.0, 4) == []
    # cheap crops: no batch under a quarter of the target's work (100 ms: 100 crops of 1 ms), the remainder aside
    assert crop_spans(199, 1.0, 400.0, 8) == [(0, 99), (99, 199)]
    assert min(stop - first for first, stop in crop_spans(1000, 1.0, 400.0, 8)[1:]) >= 100
    # costly crops: at least `least` batches, tapering down to one crop (a quarter of 400 ms is one 100 ms crop)
    assert len(crop_spans(80, 100.0, 400.0, 8)) >= 8 and crop_spans(80, 100.0, 400.0, 8)[-1] == (79, 80)


def test_rectify_cuts_an_upright_box_exactly_and_straightens_a_rotated_one():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    box = Detections.from_xywh([[40, 30, 100, 50]], [1.0], "line")
    assert np.array_equal(rectify(image, quad_of(box)), image[30:80, 40:140])

    # a smooth pattern (interpolation keeps it) turned by 30 degrees about a known centre, then read straight
    pattern = np.zeros((60, 200), dtype=np.uint8)
    pattern[:, :] = (np.arange(200) * 255 // 199).astype(np.uint8)
    pattern[20:40, :] = 255 - pattern[20:40, :]
    canvas = np.zeros((400, 400), dtype=np.uint8)
    canvas[170:230, 100:300] = pattern
    turned = cv2.warpAffine(canvas, cv2.getRotationMatrix2D((199.5, 199.5), -30, 1.0), (400, 400))
    line = Detections.from_xywh([[100, 100, 200, 200]], [1.0], "line", obb=[[200, 200, 200, 60, 30]])
    straight = rectify(turned, quad_of(line))
    assert straight.shape == (60, 200)
    inner = (slice(3, -3), slice(3, -3))  # edges blend with the black around
    assert np.abs(straight[inner].astype(int) - pattern[inner]).mean() < 3


def test_a_crop_s_own_fault_fails_that_crop_alone():
    """Too large a crop, a record that is not JSON, a raise: each fails its own crop, even inside a call of several
    (the call is made again crop by crop); the other crops of the call keep their records."""

    class Picky(SecondStage):
        max_batch = 8
        max_crop_pixels = 50 * 50

        def recognize(self, crops):
            records = []
            for crop in crops:
                if crop.window.x == 200:
                    raise ValueError("no crops at x 200")
                records.append(
                    {"x": crop.window.x, "bad": float("nan")} if crop.window.x == 100 else {"x": crop.window.x}
                )
            return records

    image = np.zeros((300, 400), dtype=np.uint8)
    detections = Detections.from_xywh(
        [[0, 0, 10, 10], [100, 0, 10, 10], [200, 0, 10, 10], [300, 0, 60, 60]], [1.0] * 4, "x"
    )
    plan = plan_crops(detections, Picky(), Window(0, 0, 0, 400, 300))
    read = lambda window: image[window.y : window.y2, window.x : window.x2]  # noqa: E731
    outcomes = read_crops(read, plan.crops, detections, Picky())
    assert [o.record for o in outcomes] == [{"x": 0}, None, None, None]
    assert outcomes[1].error.startswith("StageError: a crop's record is not JSON")
    assert outcomes[2].error == "ValueError: no crops at x 200"
    assert (
        outcomes[3].error
        == "StageError: the crop is 60x60 pixels, more than the stage reads (2,500 pixels, its max_crop_pixels)"
    )


def test_options_turn_the_second_stage_on_off_and_bound_it_with_clear_errors():
    assert parse_options(STAGED, {}).second_stage is True
    assert parse_options(STAGED, {"second_stage": False}).second_stage is False
    assert parse_options("qrcode", {}).second_stage is False
    with pytest.raises(OptionsError, match="recognizer 'qrcode' has no second stage"):
        parse_options("qrcode", {"second_stage": True})
    with pytest.raises(OptionsError, match="second_stage must be true or false"):
        parse_options(STAGED, {"second_stage": "yes"})
    with pytest.raises(OptionsError, match="max_crops must be a whole number >= 1"):
        parse_options(STAGED, {"max_crops": 0})
    with pytest.raises(OptionsError, match="crop_batch_size must be a positive whole number or 'auto'"):
        parse_options(STAGED, {"crop_batch_size": 1.5})


def test_a_result_with_a_second_stage_survives_json():
    scene = blob_scene(1600, 1200, RECTS, seed=1)
    result = pipeline.recognize_image(scene.image, STAGED)
    again = Recognition.from_json(json.loads(json.dumps(result.to_json())))
    assert again.second_stage == result.second_stage
    assert again.to_json()["detections"] == result.to_json()["detections"]


# -- in process


def test_in_process_each_crop_is_the_scene_s_window_at_full_resolution():
    scene = blob_scene(1600, 1200, RECTS, seed=1)
    document = pipeline.recognize_image(scene.image, STAGED).to_json()
    assert_crops_exact(document, scene.image)
    assert document["timings"]["crops_s"] > 0

    off = pipeline.recognize_image(scene.image, STAGED, second_stage=False).to_json()
    assert "second_stage" not in off and all("digest" not in d.get("data", {}) for d in off["detections"])
    limited = pipeline.recognize_image(scene.image, STAGED, max_crops=1).to_json()
    assert limited["second_stage"]["crops"] == 1 and limited["second_stage"]["over_limit"] == len(RECTS) - 1
    read = [d for d in limited["detections"] if d["data"].get("digest")]
    assert read == limited["detections"][:1], "equal scores: the first row wins"


def test_a_grey_image_gives_grey_crops():
    scene = blob_scene(1600, 1200, RECTS, seed=2)
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
    assert_crops_exact(pipeline.recognize_image(grey, STAGED).to_json(), grey)


def test_resources_a_finish_needs_are_given_by_name_and_missing_ones_say_so():
    class Counted(SecondStage):
        resources = ("gallery",)

        def recognize(self, crops):
            return [{"w": crop.pixels.shape[1]} for crop in crops]

        def finish(self, detections, records, resources):
            names = [resources["gallery"].get(r["w"]) for r in records]
            return pipeline.recognizers.stages.StageResult(
                detections.with_data({"name": names}), {"people": len(names)}
            )

    register(RecognizerSpec("test-gallery", staged_segmenter,
                            second_stage=lambda params: Counted()))  # fmt: skip
    scene = blob_scene(640, 480, [(10, 10, 30, 20), (100, 100, 50, 20)], seed=4)
    result = pipeline.recognize_image(scene.image, "test-gallery", resources={"gallery": {30: "ann", 50: "bo"}})
    assert sorted(d["data"]["name"] for d in result.to_json()["detections"]) == ["ann", "bo"]
    with pytest.raises(StageError, match="needs gallery, which nobody provided"):
        pipeline.recognize_image(scene.image, "test-gallery")


def staged_segmenter(**_: object):
    """The first stage of the recognizers registered here (their parameters are their second stage's)."""
    from tests.shaped import Segmenter

    return Segmenter()


def test_a_stage_can_be_on_by_default_only_where_the_job_s_parameters_ask_for_it():
    class Widths(SecondStage):
        def recognize(self, crops):
            return [{"w": crop.pixels.shape[1]} for crop in crops]

    register(RecognizerSpec("test-asks", staged_segmenter, {"measure": False}, second_stage=lambda params: Widths(),
                            stage_by_default=lambda params: params["measure"]))  # fmt: skip
    scene = blob_scene(640, 480, [(10, 10, 30, 20)], seed=15)
    assert "second_stage" not in pipeline.recognize_image(scene.image, "test-asks").to_json()
    assert parse_options("test-asks", {"measure": True}).second_stage is True
    widths = pipeline.recognize_image(scene.image, "test-asks", measure=True).to_json()
    assert widths["detections"][0]["data"]["w"] == 30 and widths["second_stage"]["crops"] == 1
    assert "second_stage" not in pipeline.recognize_image(scene.image, "test-asks", measure=True,
                                                          second_stage=False).to_json()  # fmt: skip


# -- on workers


def scene_file(name: str, seed: int, rects=RECTS) -> tuple[np.ndarray, str]:
    scene = blob_scene(1600, 1200, rects, seed=seed)
    path = IMAGES_ROOT / name
    cv2.imwrite(str(path), scene.image)
    return scene.image, str(path)


class Messages:
    """Every task message published to the broker while it runs (Redis MONITOR: kombu's LPUSH of each message)."""

    def __init__(self, server) -> None:
        self.client, self.sizes, self.names = server.client(), [], []
        self.stopping, self.watching = False, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            for command in monitor.listen():
                self.watching.set()
                text = command["command"]
                if text.startswith("LPUSH ") and '"body"' in text:
                    message = text[text.index("{") :]
                    self.sizes.append(len(message.encode()))
                    self.names.append(json.loads(message)["headers"]["task"])
                if self.stopping:
                    return

    def __enter__(self) -> Messages:
        self.thread.start()
        while not self.watching.wait(0.05):  # MONITOR is on once it reports a command
            self.client.ping()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping = True
        self.client.ping()
        self.thread.join(10)


@pytest.mark.parametrize("given", ["png", "array"])
def test_on_workers_crops_from_stored_tiles_are_exact_and_equal_the_in_process_result(worker, redis_server, given):
    """A PNG is decoded band by band while its first tiles are recognized (the worker has two processes); an array
    is stored whole first: either way the crops are assembled from the stored tiles."""
    image, path = scene_file("staged-store.png", seed=5)
    job = submit(path if given == "png" else image, STAGED, batch_size=2, crop_batch_size=1)
    distributed = job.get(timeout=TIMEOUT).to_json()
    assert_crops_exact(distributed, image)
    local = pipeline.recognize_image(image, STAGED).to_json()
    assert distributed["detections"] == local["detections"]
    assert distributed["second_stage"] == {**local["second_stage"], "batches": len(RECTS)}
    assert tilerec_keys(redis_server) == []


def test_with_a_roi_crops_stop_at_its_edge_alike_in_process_and_on_workers(worker, redis_server):
    """Only the roi's tiles are stored: a crop whose margin reaches past the roi is clipped to it, both ways."""
    image, path = scene_file("staged-roi.png", seed=18)
    options = {"roi": [498, 250, 1000, 400], "pad": 5}
    local = pipeline.recognize_image(image, STAGED, **options).to_json()
    remote = submit(path, STAGED, batch_size=1, **options).get(timeout=TIMEOUT).to_json()
    [line] = local["detections"]
    assert line["data"]["window"] == [498, 295, 907, 310]  # x clipped at the roi, y grown by the pad
    assert line["data"]["digest"] == digest(image[295:605, 498:1405])
    assert remote["detections"] == local["detections"]
    assert tilerec_keys(redis_server) == []


def test_on_workers_crops_from_a_shared_tiff_are_exact_and_every_message_is_small(worker, redis_server):
    """The batch tasks read the TIFF's windows themselves, so Redis carries no pixels and MONITOR can follow every
    command (it cannot keep up with tiles going through the store)."""
    image, _ = scene_file("unused.png", seed=6)
    path = IMAGES_ROOT / "staged-shared.tif"
    tifffile.imwrite(path, image[:, :, ::-1], photometric="rgb", tile=(256, 256))
    with Messages(redis_server) as messages:
        result = submit(str(path), STAGED, batch_size=3, crop_batch_size=1).get(timeout=TIMEOUT).to_json()
    assert_crops_exact(result, image)
    assert result["detections"] == pipeline.recognize_image(image, STAGED).to_json()["detections"]
    assert messages.names.count("tilerec.recognize_crops") == len(RECTS)
    assert [messages.names.count(name) for name in ("tilerec.recognize", "tilerec.merge", "tilerec.finish")] == [
        1, 1, 1
    ]  # fmt: skip
    assert max(messages.sizes) <= 2048, "every message carries references and ranges, never pixels or records"
    assert tilerec_keys(redis_server) == []


def test_a_one_batch_job_runs_its_second_stage_on_the_tiling_task(worker, redis_server):
    image, path = scene_file("staged-one.png", seed=7)
    result = submit(path, STAGED, batch_size=len(grid(1200, 1600))).get(timeout=TIMEOUT).to_json()
    assert_crops_exact(result, image)
    assert tilerec_keys(redis_server) == []


def test_a_failed_crop_is_listed_and_the_others_are_read(worker, redis_server):
    rects = RECTS[:3]
    scene = blob_scene(1600, 1200, rects, seed=8)
    scene.image[320, 700] = RED  # inside the large rectangle: its crop fails, its tiles do not
    path = IMAGES_ROOT / "staged-red.png"
    cv2.imwrite(str(path), scene.image)
    result = submit(str(path), STAGED, batch_size=2, crop_batch_size=1).get(timeout=TIMEOUT).to_json()
    failed = result["second_stage"]["failed_crops"]
    assert [(f["box"], f["error"]) for f in failed] == [([500, 300, 900, 300], "ValueError: a red pixel in this crop")]
    assert failed[0]["window"] == [497, 297, 906, 306]
    good = expected(scene.image, rects)
    got = measured(result)
    assert got.pop(rects[1]) == {}, "a failed crop's detection stays, without the stage's fields"
    assert got == {rect: good[rect] for rect in (rects[0], rects[2])}
    assert result["second_stage"]["output"]["read"] == 2
    assert tilerec_keys(redis_server) == []


def test_a_second_finish_or_crop_batch_of_an_ended_job_leaves_its_result_alone(worker, redis_server, app):
    """A finish delivered again after the job's result was stored (its process died before acknowledging it) finds
    the job's keys gone and is ignored; a crop batch delivered again then does nothing and fails nothing: the stored
    result stays."""
    image, path = scene_file("staged-again.png", seed=13)
    job = submit(path, STAGED, batch_size=2)
    result = job.get(timeout=TIMEOUT).to_json()
    again = app.send_task("tilerec.finish", args=[path, STAGED], kwargs={"batch_size": 2}, task_id=job.id)
    wait_for(lambda: f"Task tilerec.finish[{job.id}] ignored" in Path(worker.log_file).read_text())
    late = app.send_task("tilerec.recognize_crops", args=[job.id, 0, 2]).get(timeout=TIMEOUT)
    assert late["crops"] == 2
    assert again.state == "SUCCESS" and job.get(timeout=5).to_json() == result
    assert_crops_exact(result, image)
    assert tilerec_keys(redis_server) == []


def test_a_crop_that_kills_its_process_every_time_fails_alone_after_three_deaths(worker, redis_server):
    rects = RECTS[:3]
    scene = blob_scene(1600, 1200, rects, seed=14)
    scene.image[920, 1250] = GREEN  # inside the third rectangle: only its crop has it
    path = IMAGES_ROOT / "staged-green.png"
    cv2.imwrite(str(path), scene.image)
    result = submit(str(path), STAGED, batch_size=2, crop_batch_size=1).get(timeout=TIMEOUT).to_json()
    failed = result["second_stage"]["failed_crops"]
    assert [(f["box"], f["error"]) for f in failed] == [
        ([1200, 900, 200, 100], "gave up: the worker process died all 3 times it ran this crop")
    ]
    good = expected(scene.image, rects)
    assert {rect: measured(result)[rect] for rect in rects[:2]} == {rect: good[rect] for rect in rects[:2]}
    wait_for(lambda: len(worker.child_pids()) == 2)
    assert tilerec_keys(redis_server) == []


def test_a_grey_recognizer_s_crops_are_grey_from_its_grey_tiles(worker, redis_server):
    image, path = scene_file("staged-grey.png", seed=17)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    result = submit(path, "tests.staged:GREY_BLOBS", batch_size=2).get(timeout=TIMEOUT).to_json()
    assert measured(result) == expected(grey)
    assert result["detections"] == pipeline.recognize_image(image, "tests.staged:GREY_BLOBS").to_json()["detections"]
    assert tilerec_keys(redis_server) == []


def test_a_finish_gets_the_resource_its_job_names_from_the_registered_loader(worker, redis_server):
    """The label set a job names (as faces name a gallery) is loaded on the worker from the store's Redis by the
    loader tests.staged registers; a set that is not there fails the job with the loader's words."""
    _, path = scene_file("staged-labels.png", seed=16)
    redis_server.client().set("tilerec:test:labels:sizes", json.dumps({"2000": "small", "270000": "large"}))
    result = submit(path, STAGED, labels="sizes", batch_size=2).get(timeout=TIMEOUT).to_json()
    names = {tuple(int(v) for v in d["box"]): d["data"]["name"] for d in result["detections"]}
    assert names == {RECTS[0]: "small", RECTS[1]: "large", RECTS[2]: "unknown", RECTS[3]: "unknown"}
    with pytest.raises(Exception, match="no label set named 'nope'"):
        submit(path, STAGED, labels="nope", batch_size=2).get(timeout=TIMEOUT)
    assert tilerec_keys(redis_server) == []
    redis_server.client().delete("tilerec:test:labels:sizes")


def held(flag: Path) -> list[int]:
    """The worker processes holding a crop batch at the flag (each leaves `<flag>.<pid>`)."""
    return [int(p.suffix[1:]) for p in flag.parent.glob(flag.name + ".*")]


def test_a_process_killed_in_the_second_stage_changes_nothing(worker, redis_server):
    """The large rectangle's crop is held while the others are read: the job shows its crops' progress; then the
    process holding it is killed, and the batch runs again on another."""
    image, path = scene_file("staged-kill.png", seed=9)
    flag = IMAGES_ROOT / "hold-kill"
    flag.touch()
    try:
        job = submit(path, STAGED, batch_size=2, crop_batch_size=1, hold=str(flag), hold_wider=500)
        wait_for(lambda: held(flag) and job.crops() == (len(RECTS) - 1, len(RECTS)), timeout=60)
        wait_for(lambda: job.result.state == "PROGRESS" and job.result.info.get("stage") == "crops")
        assert job.result.info["total"] == len(RECTS) and 1 <= job.result.info["done"] < len(RECTS)
        os.kill(held(flag)[0], signal.SIGKILL)  # mid-crop: its batch goes back to the queue and runs again
    finally:
        flag.unlink(missing_ok=True)
    result = job.get(timeout=TIMEOUT).to_json()
    for marker in IMAGES_ROOT.glob("hold-kill.*"):
        marker.unlink()
    assert_crops_exact(result, image)
    assert job.crops() == (len(RECTS), len(RECTS))
    wait_for(lambda: len(worker.child_pids()) == 2)
    assert tilerec_keys(redis_server) == []


def test_a_cancel_in_the_second_stage_ends_the_job_and_leaves_nothing(worker, redis_server):
    _, path = scene_file("staged-cancel.png", seed=10)
    flag = IMAGES_ROOT / "hold-cancel"
    flag.touch()
    try:
        job = submit(path, STAGED, batch_size=2, crop_batch_size=1, hold=str(flag))
        wait_for(lambda: held(flag), timeout=60)
        assert job.progress() == (len(grid(1200, 1600)), len(grid(1200, 1600))), "the tiles are done"
        assert job.crops() == (0, len(RECTS)), "the crops are planned, none is done: all are held or queued"
        job.cancel()
    finally:
        flag.unlink(missing_ok=True)
    with pytest.raises(Exception) as raised:
        job.get(timeout=TIMEOUT)
    for marker in IMAGES_ROOT.glob("hold-cancel.*"):
        marker.unlink()
    assert type(raised.value).__name__ == "JobCancelled"
    assert "cancelled in its second stage" in str(raised.value)
    wait_for(lambda: tilerec_keys(redis_server) == [], timeout=10)


def test_blank_tiles_are_skipped_alike_and_crops_reaching_into_them_stay_exact(worker, redis_server):
    """With skip_blank, a job with a second stage still stores its blank tiles (a crop's margin may reach into
    them) and still skips them: the same tiles skipped, and the same crops, as in one process."""
    rects = [(100, 100, 300, 200), (1400, 1000, 150, 150)]
    image = np.full((1200, 1600, 3), 200, dtype=np.uint8)  # flat: every tile without a rectangle is blank
    image[:, :] = blob_scene(1600, 1200, rects, seed=12).image.clip(0, 200) // 128 * 200  # dark 0, light 200
    path = IMAGES_ROOT / "staged-blank.png"
    cv2.imwrite(str(path), image)
    local = pipeline.recognize_image(image, STAGED, skip_blank=True, pad=300).to_json()
    remote = submit(str(path), STAGED, skip_blank=True, pad=300, batch_size=2).get(timeout=TIMEOUT).to_json()
    assert remote["tiling"]["skipped"] == local["tiling"]["skipped"] > 0
    assert remote["detections"] == local["detections"]
    assert measured(remote) == expected(image, rects, pad=300)
    assert tilerec_keys(redis_server) == []
