"""Datasets, not just images: `submit_many` on real workers, `tilerec run DIR --out` interrupted and resumed on a
real local cluster, and `tilerec evaluate` against COCO truth of generated scenes, checked against faster-coco-eval
called directly on the same files.

Expected values come from the generated scenes (pipeline.scenes.codes.code_scene: each marker's id and box are known)
and from the evaluator library itself, never from tilerec's own output.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.model import Detections as Found
from pipeline.model import Recognition
from pipeline.outputs.datasets import DatasetError, read_dataset, write_scene_set
from pipeline.outputs.evaluate import STATS, CocoResults, evaluate, load_detections, load_truth
from pipeline.outputs.export import coco_document
from pipeline.scenes.codes import code_scene
from tests.conftest import tilerec_keys
from tests.faulty import holding, release
from tests.test_cli import CLI, cli_env, input_keys, interruptible, one_error_line, tilerec, wait_for

pytest.importorskip("faster_coco_eval")
from faster_coco_eval import COCO, COCOeval_faster

IMAGES, WIDTH, HEIGHT = 200, 320, 240


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 small images with two ArUco markers each, and their COCO truth (truth.json beside images/)."""
    return write_scene_set(tmp_path_factory.mktemp("set"), IMAGES, WIDTH, HEIGHT, ("aruco",), per_image=2, seed=100)


def direct_stats(truth_path: Path, records: list[dict[str, Any]], iou_type: str = "bbox") -> list[float]:
    """COCO's 12 stats computed by faster-coco-eval alone, on the truth file and a plain results list."""
    ground = COCO(str(truth_path))
    evaluation = COCOeval_faster(ground, ground.loadRes(records), iou_type, print_function=lambda *_: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [float(value) for value in evaluation.stats[:12]]


def truth_results(truth: dict[str, Any], shift: float = 0.0) -> list[dict[str, Any]]:
    """A predictor that reports every true box (moved `shift` px right), scores falling in file order."""
    annotations = truth["annotations"]
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift, *a["bbox"][1:]],
            "score": 1.0 - k / (2 * len(annotations)),
        }
        for k, a in enumerate(annotations)
    ]


# ------------------------------------------------------------------------------------------------ pure functions


def test_a_scene_set_is_its_scenes_and_their_truth(tmp_path: Path) -> None:
    truth_path = write_scene_set(tmp_path, 3, WIDTH, HEIGHT, ("aruco", "qrcode"), per_image=2, seed=5)
    truth = json.loads(truth_path.read_text())
    names = {category["id"]: category["name"] for category in truth["categories"]}
    assert sorted(names.values()) == ["aruco", "qrcode"]
    for index, image in enumerate(truth["images"]):
        scene = code_scene(WIDTH, HEIGHT, kinds=("aruco", "qrcode"), count=2, seed=5 + index)
        assert np.array_equal(cv2.imread(str(tmp_path / image["file_name"])), scene.image)
        boxes = [
            (names[a["category_id"]], tuple(a["bbox"])) for a in truth["annotations"] if a["image_id"] == image["id"]
        ]
        assert sorted(boxes) == sorted((t.label, t.box) for t in scene.truths)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "is not JSON"),
        ('{"annotations": []}', "has no `images` list"),
        ('{"images": [{"file_name": "a.png"}]}', "images[0] needs an integer `id`"),
        ('{"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}]}', "two images share an id"),
        ('{"images": [], "categories": [{"id": 1}]}', "categories[0] needs an integer `id` and a `name`"),
    ],
)
def test_a_bad_dataset_says_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=f"bad.json.*{expected}".replace("[", r"\[").replace("]", r"\]")):
        read_dataset(path)
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "missing.json")


def test_evaluation_equals_faster_coco_eval_and_scores_perfect_and_shifted_predictors(scene_set: Path) -> None:
    truth = load_truth(scene_set)
    for shift, expected_ap50 in ((0.0, 1.0), (200.0, 0.0)):  # 200 px right: no box overlaps its truth
        records = truth_results(truth.document, shift)
        metrics = evaluate(truth, CocoResults(records))
        assert [metrics.stats[name] for name in STATS] == pytest.approx(direct_stats(scene_set, records))
        assert metrics.stats["AP50"] == pytest.approx(expected_ap50)
        assert metrics.per_class["aruco"].truths == 2 * IMAGES
        assert metrics.per_class["aruco"].ap50 == pytest.approx(expected_ap50)


def test_masks_are_scored_when_results_and_truth_have_them(tmp_path: Path) -> None:
    import shapely

    truth_path = write_scene_set(tmp_path, 2, WIDTH, HEIGHT, ("aruco",), per_image=2, seed=11)
    document = json.loads(truth_path.read_text())
    for annotation in document["annotations"]:  # a marker's mask is its square: a polygon of its box's corners
        x, y, w, h = annotation["bbox"]
        annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    truth_path.write_text(json.dumps(document))
    truth = load_truth(truth_path)
    lines = []
    for image in truth.images:
        boxes = [a["bbox"] for a in document["annotations"] if a["image_id"] == image.id]
        # the left 57.5 % of each marker, whole pixels: mask IoU about 0.575, between COCO's thresholds 0.55 and 0.6
        parts = [shapely.box(x, y, x + round(w * 0.575), y + h) for x, y, w, h in boxes]
        found = Found.from_xywh(boxes, [0.9, 0.8], "aruco", masks=parts)
        result = Recognition(WIDTH, HEIGHT, found, "aruco").to_json()
        lines.append(json.dumps({"image": image.file_name, "image_id": image.id, "ok": True, "result": result}))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    metrics = tmp_path / "metrics.json"
    completed = tilerec("evaluate", str(tmp_path / "results.jsonl"), "--truth", str(truth_path), "--json", str(metrics))
    assert completed.returncode == 0, completed.stderr
    run = json.loads(metrics.read_text())["runs"][0]
    assert run["bbox"]["stats"]["AP"] == pytest.approx(1.0)  # the boxes are the truth's
    segm = run["segm"]["stats"]
    assert segm["AP50"] == pytest.approx(1.0) and segm["AP75"] == pytest.approx(0.0)
    assert segm["AP"] == pytest.approx(0.2)  # matched at 2 of COCO's 10 IoU thresholds, 0.5 and 0.55


def test_plots_are_a_precision_recall_curve_per_class(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pipeline.outputs.evaluate import plot_curves

    truth_path = write_scene_set(tmp_path, 2, WIDTH, HEIGHT, ("aruco", "qrcode"), per_image=2, seed=3)
    truth = load_truth(truth_path)
    metrics = evaluate(truth, CocoResults(truth_results(truth.document)))
    assert metrics.curves["aruco"] == [1.0] * 101  # a perfect predictor: precision 1 at every recall
    written = plot_curves(metrics, tmp_path / "curves")
    assert sorted(path.name for path in written) == ["pr-aruco.png", "pr-qrcode.png"]
    assert all(cv2.imread(str(path)).shape[0] > 200 for path in written)


def test_results_are_matched_to_the_truth_by_category_name_and_file_name(tmp_path: Path) -> None:
    truth_path = write_scene_set(tmp_path, 2, WIDTH, HEIGHT, ("aruco", "qrcode"), per_image=2, seed=7)
    truth = load_truth(truth_path)
    names = {number: name for name, number in truth.categories.items()}
    recognitions, files = [], []
    for image in reversed(truth.images):  # another image order and so other image ids
        mine = [a for a in truth.document["annotations"] if a["image_id"] == image.id]
        found = Found.from_xywh([a["bbox"] for a in mine], [0.9] * len(mine), [names[a["category_id"]] for a in mine])
        recognitions.append(Recognition(WIDTH, HEIGHT, found, "aruco"))
        files.append(str(tmp_path / image.file_name))
    document = coco_document(recognitions, files, ids={"qrcode": 1, "aruco": 2})  # the truth numbers them 1, 2 by name
    (tmp_path / "coco.json").write_text(json.dumps(document))
    detections = load_detections(tmp_path / "coco.json", truth)
    assert evaluate(truth, detections).stats["AP"] == pytest.approx(1.0)
    assert not detections.unknown_labels and not detections.unknown_images


def test_unknown_labels_are_reported_and_a_half_written_line_is_skipped(tmp_path: Path) -> None:
    truth_path = write_scene_set(tmp_path, 2, WIDTH, HEIGHT, ("aruco",), per_image=2, seed=9)
    truth = load_truth(truth_path)
    lines = []
    for image in truth.images:
        boxes = [a["bbox"] for a in truth.document["annotations"] if a["image_id"] == image.id]
        found = Found.from_xywh(boxes, [0.9, 0.8], ["aruco", "marker"])  # "marker": a label the truth lacks
        result = Recognition(WIDTH, HEIGHT, found, "aruco").to_json()
        lines.append(json.dumps({"image": str(tmp_path / image.file_name), "ok": True, "result": result}))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + '\n{"image": "half-writ')
    detections = load_detections(tmp_path / "results.jsonl", truth)
    assert detections.unknown_labels == {"marker": 2}
    assert len(detections.records) == 2
    assert evaluate(truth, detections).per_class["aruco"].ar == pytest.approx(0.5)  # one of each image's two

    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(lines[0].replace('"aruco"', '"qr"') + "\n")
    completed = tilerec("evaluate", str(wrong), "--truth", str(truth_path), timeout=60)
    assert completed.returncode == 2
    assert "no detection's label is a category of the truth" in one_error_line(completed)


# ------------------------------------------------------------------------------------------- on real workers


def marker_boxes(result: dict[str, Any]) -> list[tuple[str, tuple[float, ...]]]:
    return sorted((record["text"], tuple(record["box"])) for record in result["detections"])


def assert_only_true_markers(result: dict[str, Any], scene: Any, tolerance: float = 2.0) -> None:
    """Every detection is one of the scene's markers (its id), its box within `tolerance` px: no false positives."""
    truths = {truth.text: truth.box for truth in scene.truths}
    for text, box in marker_boxes(result):
        assert text in truths, (text, truths)
        assert np.allclose(box, truths[text], atol=tolerance), (box, truths[text])


def test_submit_many_keeps_jobs_in_flight_bounded_and_yields_every_image_once(app, worker, redis_server, images_root):
    from tasks.client import submit_many

    scenes = [code_scene(WIDTH, HEIGHT, kinds=("aruco",), count=2, seed=300 + i) for i in range(7)]
    paths = []
    for index, scene in enumerate(scenes[:4]):
        paths.append(images_root / f"many-{index}.png")
        cv2.imwrite(str(paths[-1]), scene.image)
    images: list[Any] = [*map(str, paths), *(scene.image for scene in scenes[4:]), b"not an image"]
    in_flight: list[int] = []
    before = input_keys(redis_server)
    done = list(submit_many(images, "aruco", max_in_flight=2, on_poll=lambda running: in_flight.append(len(running))))
    assert in_flight and max(in_flight) <= 2
    assert sorted(map(id, (completed.image for completed in done))) == sorted(map(id, images))
    by_image = {id(completed.image): completed for completed in done}
    for image, scene in zip(images, scenes, strict=False):
        completed = by_image[id(image)]
        assert completed.ok and completed.result is not None, completed.error
        assert_only_true_markers(completed.result.to_json(), scene)
    failed = by_image[id(images[-1])]
    assert not failed.ok and failed.result is None and "not an image format tilerec reads" in str(failed.error)
    assert input_keys(redis_server) <= before  # each upload deleted when its job ended
    assert not tilerec_keys(redis_server)


class Stop(Exception):
    pass


def test_closing_submit_many_cancels_the_jobs_in_flight(app, worker, redis_server, big_scene) -> None:
    from tasks.client import submit_many

    _, path = big_scene
    started: list[str] = []

    def stop_once_tiled(running: Any) -> None:
        if all(run.job.seen[1] for run in running):  # both jobs planned: their tiles are being recognized
            started.extend(run.job.id for run in running)
            raise Stop

    jobs = submit_many([path] * 5, "qrcode", max_in_flight=2, on_poll=stop_once_tiled)
    with pytest.raises(Stop):
        next(jobs)
    assert len(started) == 2  # and the other three were never submitted
    wait_for(lambda: not tilerec_keys(redis_server), 60, "the cancelled jobs' merges to remove their keys")
    for job_id in started:
        result = app.AsyncResult(job_id)
        wait_for(result.ready, 30, "the cancelled job to end")
        assert result.state == "FAILURE" and "JobCancelled" in type(result.result).__name__


def test_a_folder_with_bad_files_gives_one_failed_entry_each(tmp_path: Path, redis_server, worker) -> None:
    folder, out = tmp_path / "frames", tmp_path / "out"
    folder.mkdir()
    scenes = [code_scene(WIDTH, HEIGHT, kinds=("aruco",), count=2, seed=400 + i) for i in range(3)]
    for index, scene in enumerate(scenes):
        cv2.imwrite(str(folder / f"frame-{index}.png"), scene.image)
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG's signature and nothing else
    run = ("run", f"{folder}/", "-r", "aruco", "--broker", redis_server.url, "--out", str(out))
    completed = tilerec(*run, timeout=60)
    assert completed.returncode == 1, completed.stderr
    entries = {Path(e["image"]).name: e for e in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(entries) == ["frame-0.png", "frame-1.png", "frame-2.png", "truncated.png"]  # notes.txt left out
    assert not entries["truncated.png"]["ok"] and entries["truncated.png"]["error"]
    for index, scene in enumerate(scenes):
        entry = entries[f"frame-{index}.png"]
        assert entry["ok"] and entry["image_id"] == index + 1  # sorted: frame-0.png first
        assert_only_true_markers(entry["result"], scene)
    assert "left out 1 file(s) not images by their extension: notes.txt" in completed.stderr
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["id"] for image in coco["images"]) == [1, 2, 3]

    again = tilerec(*run, timeout=60)  # the same --out without --resume: refused, nothing overwritten
    assert again.returncode == 2 and "add --resume" in one_error_line(again)


def test_a_folder_runs_its_images_and_leaves_out_its_other_files_saying_so_once(tmp_path: Path, redis_server, worker):
    """A dataset's folder as it comes: images beside their COCO truth and a README. Only the images are run; a
    non-image named on the command line or in a list is still an error."""
    folder = tmp_path / "set"
    folder.mkdir()
    scenes = [code_scene(WIDTH, HEIGHT, kinds=("aruco",), count=2, seed=500 + i) for i in range(2)]
    for index, scene in enumerate(scenes):
        cv2.imwrite(str(folder / f"image-{index}.jpg"), scene.image, [cv2.IMWRITE_JPEG_QUALITY, 98])
    (folder / "truth.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    (folder / "README.md").write_text("# the set\n")
    out = tmp_path / "out"
    completed = tilerec("run", str(folder), "-r", "aruco", "--broker", redis_server.url, "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("left out") == 1
    assert "left out 2 file(s) not images by their extension: README.md, truth.json" in completed.stderr
    entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(entry["image"]).name for entry in entries] == ["image-0.jpg", "image-1.jpg"]
    for entry, scene in zip(entries, scenes, strict=True):
        assert entry["ok"]
        assert_only_true_markers(entry["result"], scene)

    named = tilerec("run", str(folder / "truth.json"), "-r", "aruco", "--broker", redis_server.url)
    assert named.returncode == 2 and "not an image format tilerec reads" in one_error_line(named)
    (tmp_path / "list.txt").write_text("set/image-0.jpg\nset/README.md\n")
    listed = tilerec("run", "--list", str(tmp_path / "list.txt"), "-r", "aruco", "--broker", redis_server.url)
    assert listed.returncode == 1 and "README.md: cannot use image" in listed.stderr
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    nothing = tilerec("run", str(empty), "-r", "aruco")
    assert nothing.returncode == 2 and "has no image files (1 other file(s): notes.txt)" in one_error_line(nothing)


def test_a_dataset_naming_missing_files_or_not_json_says_which(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset.json"
    dataset.write_text(
        json.dumps({"images": [{"id": k, "file_name": f"img/{n}.png"} for k, n in enumerate("abcdefg")]})
    )
    completed = tilerec("run", "-r", "aruco", "--coco-images", str(dataset), "--out", str(tmp_path / "out"))
    assert completed.returncode == 2
    line = one_error_line(completed)
    assert "names 7 missing file(s)" in line and "img/a.png" in line and "and 2 more" in line
    dataset.write_text("{")
    completed = tilerec("run", "-r", "aruco", "--coco-images", str(dataset))
    assert completed.returncode == 2 and "is not JSON" in one_error_line(completed)


@pytest.mark.cluster
def test_a_run_interrupted_halfway_resumes_to_one_result_per_image_and_evaluates(
    scene_set: Path, tmp_path: Path
) -> None:
    images, out, gate = scene_set.parent / "images", tmp_path / "out", tmp_path / "gate"
    results = out / "results.jsonl"
    gate.mkdir()
    # ArUco markers, every image after the first half held at the gate: the interrupt lands mid-run by construction
    held = ("-r", "tests.faulty:Held", "-p", f"gate={gate}", "-p", f"after={IMAGES // 2}", "-p", "recognizer=aruco")
    run = [*CLI, "run", f"{images}/", *held, "--out", str(out), "--workers", "2"]
    env = {**cli_env(), "TILEREC_PLUGIN_MODULES": "tests.faulty"}
    cli = subprocess.Popen(
        run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible
    )
    try:
        wait_for(lambda: results.exists() and results.read_text().count("\n") >= IMAGES // 2, 120, "half the images")
        wait_for(lambda: holding(gate, IMAGES // 2), 60, "an image to be held")
        cli.send_signal(signal.SIGINT)
        _, stderr = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stderr
    text = results.read_text()
    assert text.endswith("\n")
    first = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert IMAGES // 2 <= len(first) < IMAGES
    assert not (out / "coco.json").exists()  # only a complete run has one

    with results.open("a") as handle:  # what a hard kill in the middle of a line would leave
        handle.write('{"image": "' + str(images / "scene-00000.png"))
    release(gate)
    began = time.monotonic()
    completed = tilerec(*run[len(CLI) :], "--resume", timeout=180, env=env)
    assert completed.returncode == 0, completed.stderr
    print(f"resumed {IMAGES - len(first)} images in {time.monotonic() - began:.1f} s")
    entries = [json.loads(line) for line in results.read_text().splitlines()]
    expected = sorted(str(path.resolve()) for path in images.glob("*.png"))
    assert sorted(entry["path"] for entry in entries) == expected  # exactly one line per image
    assert {e["job_id"] for e in first} <= {e["job_id"] for e in entries}  # the first run's results were kept
    truth = json.loads(scene_set.read_text())
    ids = {Path(image["file_name"]).name: image["id"] for image in truth["images"]}
    for entry in entries:
        assert entry["ok"] and entry["image_id"] == ids[Path(entry["path"]).name]  # sorted folder order
        scene = code_scene(WIDTH, HEIGHT, kinds=("aruco",), count=2, seed=100 + entry["image_id"] - 1)
        assert_only_true_markers(entry["result"], scene)
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == IMAGES
    assert len(coco["annotations"]) == sum(len(entry["result"]["detections"]) for entry in entries)

    metrics = tmp_path / "metrics.json"
    for source in (out / "coco.json", results):
        evaluated = tilerec("evaluate", str(source), "--truth", str(scene_set), "--json", str(metrics), timeout=60)
        assert evaluated.returncode == 0, evaluated.stderr
        ours = json.loads(metrics.read_text())["runs"][0]["bbox"]["stats"]
        records = [
            {"image_id": entry["image_id"], "category_id": 1, "bbox": record["box"], "score": record["score"]}
            for entry in entries
            for record in entry["result"]["detections"]
        ]
        assert [ours[name] for name in STATS] == pytest.approx(direct_stats(scene_set, records))
        assert "AP50" in evaluated.stdout
