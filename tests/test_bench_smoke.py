"""The benchmark's code keeps working: a tiny profile (one small scene, one repetition, W=1, aruco) end to end.

Not a timed test: the figures of a smoke run mean nothing; only that every stage ran and the report and JSON
hold sane values (2 and 3 identical, no duplicates, every section present).
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from bench.__main__ import main
from tests.conftest import once_per_run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The smoke run's results and folder, once per test run (tests read the folder; one that changes it, a copy)."""

    def run(out: Path) -> tuple[dict, Path]:
        main(["--smoke", "--out", str(out)])
        return json.loads((out / "results.json").read_text()), out

    return once_per_run(tmp_path_factory, "bench-smoke", run)


def test_every_run_succeeded_and_tiled_runs_agree(smoke):
    results, _ = smoke
    summary = results["summary"]
    assert summary["errors"] == []
    [row] = summary["accuracy"]
    assert row["recognizer"] == "aruco" and row["size"] == 1000
    assert row["identical_2_3"] is True and row["all_tiled_identical"] is True
    distributed = row["modes"]["distributed"]["score"]
    assert distributed["duplicates"] == 0
    assert distributed["recall"] == 1.0 and distributed["precision"] == 1.0
    assert row["modes"]["tiled"]["score"] == distributed


def test_speed_stages_add_up_to_the_wall_time(smoke):
    results, _ = smoke
    speed = {row["input"]: row for row in results["summary"]["speed"]}
    assert set(speed) == {"PNG", "tiled TIFF"}  # the same pixels, decoded whole or read window by window
    for row in speed.values():
        entry = row["by_workers"]["1"]
        assert entry["wall_s"] > 0 and entry["speedup_vs_single"] > 0
        stages = entry["stages"]
        parts = ("queue_in", "read_decode", "store", "dispatch", "to_first_tile", "recognition", "gather", "merge")
        assert all(stages[name] >= -0.005 for name in parts), stages  # log stamps are ms-rounded
        assert math.isclose(sum(stages[name] for name in (*parts, "deliver")), entry["wall_s"], abs_tol=0.01)
        assert 0 < entry["recognize_sum_s"] <= entry["recognition_wall_s"] + 0.005  # W=1: one process, every tile
        assert entry["in_task_overhead_ms"] >= 0 and entry["between_tasks_ms"] >= 0
    # that tile tasks read the TIFF's windows themselves, storing no pixels, is a property of the job, not a timing:
    # test_gigapixel.py::test_tile_tasks_read_their_own_windows_and_no_pixels_go_through_redis counts the bytes


def test_memory_messages_latency_and_storage_are_measured(smoke):
    results, _ = smoke
    [anatomy] = results["anatomy"]
    assert anatomy["keys_left"] == 0 and anatomy["tasks"] == anatomy["messages"]["recognize_tiles"]["count"]
    assert 0 < anatomy["messages"]["recognize_tiles"]["max_bytes"] <= 2048  # ids and numbers, the job is in the store
    assert all(10 < mb < 5000 for mb in anatomy["memory_mb"]["tile_processes"])
    latency = results["summary"]["latency"]
    assert latency["reps"] == 2 and latency["overhead_ms"] > 0
    codecs = {row["codec"]: row for row in results["storage"]["codecs"]}
    assert codecs["raw (today)"]["lossless"] and codecs["raw (today)"]["ratio"] == 1.0


def test_the_report_has_every_section_and_its_plots(smoke, tmp_path):
    results, shared = smoke
    out = shutil.copytree(shared, tmp_path / "bench")
    text = (out / "report.md").read_text()
    for heading in ("## Targets", "## Accuracy", "## Speed", "## Tiles per batch", "## Memory and broker messages",
                    "## Latency of a one-tile image", "## Tile storage", "## Where the time goes"):  # fmt: skip
        assert heading in text
    assert "## Errors" not in text
    for name in results["plots"].values():
        assert (out / name).stat().st_size > 1000 and f"]({name})" in text
    (out / "report.md").unlink()
    main(["--rerender", str(out), "--no-plots"])  # the report is rebuilt from results.json alone
    assert "## Targets" in (out / "report.md").read_text()


def test_code_scenes_are_seeded_and_put_objects_on_seams_and_edges():
    import numpy as np

    from pipeline.scenes.codes import code_scene, placement_of
    from pipeline.tiling import grid

    first, again = code_scene(3000, 2500, seed=4), code_scene(3000, 2500, seed=4)
    assert np.array_equal(first.image, again.image) and first.truths == again.truths
    assert {t.label for t in first.truths} == {"qrcode", "aruco", "barcode"}
    places = [placement_of(t, 3000, 2500) for t in first.truths]
    assert {"seam", "edge", "inside"} <= set(places)
    windows = grid(2500, 3000)
    for truth in first.truths:  # whatever its placement, some tile holds it whole
        x, y, w, h = truth.box
        assert any(t.x <= x and x + w <= t.x2 and t.y <= y and y + h <= t.y2 for t in windows), truth


def test_the_hardware_ceiling_shares_every_tile_once_between_its_processes(tmp_path):
    import cv2

    from bench.inprocess import run_together
    from pipeline.scenes.codes import code_scene

    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), code_scene(1800, 1000, kinds=("aruco",), seed=1).image)
    out = run_together({"image": str(image), "recognizer": "aruco", "options": {}}, 2, timeout=120)
    # 640-pixel tiles, 20 % overlap: columns at x = 0, 512, 1024 and 1160 (flush right), rows at y = 0 and 360
    assert out["tiles"] == 8, out
    assert len(out["share_s"]) == 2 and 0 < max(out["share_s"]) <= out["recognize_s"]


def test_the_ideal_streamed_job_recognizes_the_tiles_one_process_decoded_for_both(tmp_path):
    import cv2

    from bench.inprocess import run_together
    from pipeline.scenes.codes import code_scene

    image = tmp_path / "scene.jpg"
    scene = code_scene(1800, 1000, kinds=("qrcode",), seed=2)
    cv2.imwrite(str(image), scene.image, [cv2.IMWRITE_JPEG_QUALITY, 98])
    spec = {"image": str(image), "recognizer": "qrcode", "options": {}}
    whole, streamed = run_together(spec, 2, timeout=120), run_together(spec, 2, timeout=120, decoding=True)
    assert whole["tiles"] == streamed["tiles"] == 8, (whole, streamed)
    # the same pixels, grey from shared memory or decoded whole in each process: the same codes in every tile
    assert streamed["found"] == whole["found"] >= len(scene.truths), (whole, streamed, len(scene.truths))
    assert streamed["decode_s"] > 0 and whole["decode_s"] == 0
    assert not any("psm_" in name for name in os.listdir("/dev/shm")), "the shared image was left behind"


def test_the_hardware_ceiling_reports_a_process_that_failed(tmp_path):
    from bench.inprocess import run_together

    out = run_together({"image": str(tmp_path / "missing.png"), "recognizer": "aruco", "options": {}}, 2, timeout=120)
    assert "missing.png" in out["error"] and "timed_out" not in out


def test_the_decode_floor_is_the_two_cores_work_or_the_serial_part_whichever_ends_later():
    from bench.floor import floor

    # recognition 1.0 s in 10 rows: the other process starts at the first row (0.1 s), the tiling one after its
    # serial 0.5 s; together they finish (1.0 + 0.1 + 0.5) / 2 = 0.8 s after the start, past 0.5 + 0.05
    assert floor(first_row=0.1, serial=0.5, recognize=1.0, rows=10) == pytest.approx(0.8)
    # a serial part longer than the rest: the last row (0.1 s of recognition) shared by both after it
    assert floor(first_row=0.1, serial=2.0, recognize=1.0, rows=10) == pytest.approx(2.05)
    # nothing serial (a tiled TIFF): the work halved
    assert floor(first_row=0.0, serial=0.0, recognize=1.0, rows=10) == pytest.approx(0.5)


def test_idle_time_is_split_into_before_between_and_after_each_process_tasks():
    from bench.analysis import idle_time

    spans = [("p1", 0.0, 1.0), ("p2", 2.1, 2.6), ("p1", 1.5, 3.0), ("p2", 0.2, 2.0)]  # in no particular order
    idle = idle_time(spans)
    # p1 starts first and ends last; p2 starts 0.2 late, waits 0.1 between its tasks and ends 0.4 early
    assert idle["tile_processes"] == 2
    assert math.isclose(idle["idle_lead"], 0.2) and math.isclose(idle["idle_tail"], 0.4)
    assert math.isclose(idle["idle_between"], 0.5 + 0.1)


@pytest.mark.cluster
def test_the_scale_bench_measures_a_cluster_of_several_nodes(tmp_path):
    from bench.scale import main as scale

    results = scale(["--processes", "3", "--per-node", "2", "--tiles", "8", "--jobs", "4", "--latency-jobs", "2",
                     "--tile-ms", "20", "--detections", "3000", "--out", str(tmp_path)])  # fmt: skip
    [row] = results["sizes"]
    assert row["nodes"] == [2, 1]  # 3 processes as nodes of at most 2
    big = row["big_job"]
    assert big["tiles"] == 9  # a 3 x 3 grid holds 8 tiles; each found its one box, checked by the bench itself
    assert big["efficiency"] > 0 and math.isclose(big["ideal_s"], 9 * 0.020 / 3)
    assert set(big["lost"]) == {"lead", "between", "in_batch", "tail", "unused_processes"}
    usage = big["usage"]
    assert usage["commands"]["evalsha"] >= big["batches"]  # Celery counts every batch for the chord
    assert usage["per_tile"]["commands"] > 0 and usage["cpu_s"]["redis"] >= 0
    assert row["small_jobs"]["jobs"] == 4 and row["small_jobs"]["latency_p50_s"] >= 0.020
    merge = results["merge"]
    assert merge["detections_out"] < merge["detections_in"]  # objects in the overlaps come two to four times
    assert 2000 < merge["detections_in"] < 4000 and merge["redis_mb"] > 0
    assert (tmp_path / "results.json").exists()


def test_every_module_the_bench_imports_comes_with_the_bench_extra():
    """`pip install '.[bench]'` is enough for every `python -m bench.X`: each third-party module a bench module
    imports, at its top or inside a function, is a dependency of tilerec or of its bench extra."""
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["bench"]]
    names = {Requirement(line).name.lower().replace("_", "-") for line in declared}
    own = {"bench", "pipeline", "tasks", "celeryconfig", *sys.stdlib_module_names}
    distributions = packages_distributions()
    missing = {}
    for path in sorted((root / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            for module in (name.split(".")[0] for name in modules):
                if module in own or module == "lz4":  # lz4: bench.storage measures it only where installed
                    continue
                found = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
                if not found & names:
                    missing[f"{path.name}: {module}"] = sorted(found)
    assert not missing, missing


def test_a_warm_one_process_run_times_a_pass_that_reuses_the_cold_passs_pages(tmp_path):
    import cv2

    from bench.inprocess import run_in_subprocess
    from pipeline.scenes.codes import code_scene

    scene = code_scene(2400, 2400, kinds=("aruco",), seed=2)
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), scene.image)
    spec = {"image": str(image), "recognizer": "aruco", "mode": "tiled", "threads": 1, "reps": 1, "options": {}}
    out = run_in_subprocess({**spec, "warm": True}, 120)
    [warm] = out["passes"]
    assert len(out["detections"]) == len(scene.truths) and out["reps_identical"]
    # the cold pass faulted the whole image's pages in (17 MB: at least one fault a 2 MB huge page, 4 KB otherwise)
    assert out["cold"]["minor_faults"] >= 2400 * 2400 * 3 // 2**21
    assert warm["minor_faults"] < out["cold"]["minor_faults"] / 4  # the warm one reused them
    assert run_in_subprocess(spec, 120)["cold"] is None  # a plain run has no cold pass


def test_the_video_merge_benchmark_tracks_each_code_of_its_scene_once():
    from bench.video import merge_cost

    (row,) = merge_cost(["1080p"], 200, 1)
    assert (row["frames"], row["tracks"]) == (200, 4)  # the 1080p scene's 4 codes, however the frames are cut
    assert row["segments"] > 1 and row["detections"] > 0
