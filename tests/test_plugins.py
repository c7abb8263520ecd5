"""Third-party recognizers: the example plugin package (tests/plugin_example) by entry point, in process and on a
real worker that is sent only its name, and `module:factory` names, which run only from allowed modules."""

from __future__ import annotations

import importlib.util
import os
import warnings
from importlib.metadata import EntryPoint

import cv2
import numpy as np
import pytest

from pipeline import recognize_image
from pipeline.model import Detections
from pipeline.recognizers import RecognizerError, available, get_recognizer, get_spec, plugins
from pipeline.recognizers.plugins import module_list
from pipeline.scenes.codes import iou_xywh
from tasks import recognize

TIMEOUT = 120
# bright discs on a dark noisy background, (centre x, centre y, radius); the first two cross the tile seams at
# x = 640 and y = 640 (tile 640, overlap 0.2), each whole in the next tile
SPOTS = [(630, 300, 20), (1000, 645, 25), (300, 1000, 15), (1500, 200, 30), (1800, 1100, 20)]


@pytest.fixture(scope="module")
def plugin() -> None:
    """The example plugin must be installed: a failure in CI (CI=true), a skip elsewhere."""
    if importlib.util.find_spec("tilerec_bright_spots") is None or "bright-spots" not in plugins.entry_point_names():
        message = "the example plugin is not installed: pip install -e tests/plugin_example"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(message)
        pytest.skip(message)


def spots_image() -> np.ndarray:
    rng = np.random.default_rng(5)
    image = rng.integers(20, 90, size=(1400, 2000), dtype=np.uint8)
    for x, y, r in SPOTS:
        cv2.circle(image, (x, y), r, 255, -1)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def assert_spots(found: Detections) -> None:
    records = found.to_records()
    assert len(records) == len(SPOTS) and {r["label"] for r in records} == {"spot"}
    for x, y, r in SPOTS:
        [box] = [d["box"] for d in records if iou_xywh(d["box"], (x - r, y - r, 2 * r + 1, 2 * r + 1)) > 0.9]
        assert max(abs(a - b) for a, b in zip(box, (x - r, y - r, 2 * r + 1, 2 * r + 1), strict=True)) <= 1


def test_entry_point_plugins_are_listed_with_their_parameters(plugin):
    specs = {spec.name: spec for spec in available()}
    factory, spec = specs["bright-spots"], specs["dim-spots"]
    assert dict(factory.params) == {"threshold": 200, "min_area": 30}  # the factory's keyword defaults
    assert factory.description.startswith("bright spots") and factory.cost_ms == 1.0
    assert dict(spec.params) == {"threshold": 100, "min_area": 30}  # a RecognizerSpec, used as given
    with pytest.raises(RecognizerError, match="'threshold' must be int"):
        get_recognizer("bright-spots", {"threshold": "high"})


def test_the_plugin_finds_painted_spots_across_seams(plugin):
    assert_spots(recognize_image(spots_image(), "bright-spots", min_area=100).detections)


def test_a_worker_runs_the_plugin_sent_by_name(plugin, worker, images_root):
    path = images_root / "spots.png"
    cv2.imwrite(str(path), spots_image())
    result = recognize.delay(str(path), "bright-spots", min_area=100).get(timeout=TIMEOUT)
    assert result["recognizer"] == {"name": "bright-spots", "params": {"threshold": 200, "min_area": 100}}
    assert_spots(Detections.from_records(result["detections"]))


def disc_pixels(r: int) -> int:
    """The pixels cv2.circle paints for a filled disc of radius r, counted on a blank canvas."""
    canvas = np.zeros((2 * r + 5, 2 * r + 5), dtype=np.uint8)
    return int(np.count_nonzero(cv2.circle(canvas, (r + 2, r + 2), r, 255, -1)))


def test_the_plugin_s_optional_second_stage_measures_each_whole_spot_in_process_and_on_a_worker(
    plugin, worker, images_root
):
    """Off unless asked; asked, each spot's crop is measured whole at full resolution, seam-cut spots included:
    every painted pixel of its disc, the same in process and on a worker."""
    assert "second_stage" not in recognize_image(spots_image(), "bright-spots", min_area=100).to_json()
    path = images_root / "spots-staged.png"
    cv2.imwrite(str(path), spots_image())
    local = recognize_image(spots_image(), "bright-spots", min_area=100, second_stage=True).to_json()
    remote = recognize.delay(str(path), "bright-spots", min_area=100, second_stage=True).get(timeout=TIMEOUT)
    for result in (local, remote):
        assert result["second_stage"]["name"] == "spot-measure" and result["second_stage"]["crops"] == len(SPOTS)
        measured = sorted((d["data"]["bright_pixels"], d["data"]["peak"]) for d in result["detections"])
        assert measured == sorted((disc_pixels(r), 255) for _, _, r in SPOTS)
    assert remote["detections"] == local["detections"]


def test_module_factory_names_load_only_from_allowed_modules(registry, tmp_path, monkeypatch, allow_modules):
    (tmp_path / "spotter.py").write_text(
        "import pathlib\n"
        "from pipeline.model import Detections\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).touch()  # a side effect, to see whether it was imported\n"
        "def nothing(sensitivity: float = 0.5):\n"
        "    return lambda tile: Detections.empty()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    allow_modules(module_list("json, other"))
    with pytest.raises(RecognizerError, match="module 'spotter' is not allowed; a worker imports only the modules"):
        get_spec("spotter:nothing")
    assert not (tmp_path / "imported").exists(), "a refused module is never imported"
    allow_modules(module_list("json,spotter"))
    assert len(recognize_image(spots_image(), "spotter:nothing", sensitivity=1).detections) == 0
    assert (tmp_path / "imported").exists()
    with pytest.raises(RecognizerError, match="module 'spotter' has no factory 'Nothing'"):
        get_spec("spotter:Nothing")


def test_a_worker_refuses_a_module_that_is_not_allowed(worker, app, images_root):
    path = images_root / "refused.png"
    cv2.imwrite(str(path), np.zeros((64, 64), dtype=np.uint8))
    outcome = app.send_task("tilerec.recognize", args=(str(path), "os:system"), kwargs={"command": "true"})
    with pytest.raises(Exception) as raised:
        outcome.get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "RecognizerError"
    assert "module 'os' is not allowed" in str(raised.value)


def test_factories_need_a_default_for_every_parameter(registry):
    def needs_size(size, colour="red"):
        raise AssertionError("never built")

    with pytest.raises(RecognizerError, match="parameter 'size' of the factory has no default"):
        plugins.spec_from("sized", needs_size)
    with pytest.raises(RecognizerError, match="is neither a RecognizerSpec nor a factory"):
        plugins.spec_from("number", 42)


def test_a_broken_plugin_is_named_and_left_out_of_the_list(registry, monkeypatch):
    broken = EntryPoint("broken", "no_such_module_anywhere:Factory", plugins.GROUP)
    monkeypatch.setattr(plugins, "_entry_points", lambda: {"broken": broken})
    with pytest.raises(RecognizerError, match="plugin 'no_such_module_anywhere:Factory' failed to load"):
        get_spec("broken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [spec.name for spec in available()]
    assert "broken" not in names and "faces" in names
    assert any("failed to load" in str(w.message) for w in caught)
    with pytest.raises(RecognizerError, match=r"unknown recognizer 'cats'; available: aruco, barcode, .*broken"):
        get_spec("cats")
