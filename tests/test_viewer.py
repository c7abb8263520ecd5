"""`tilerec view`: Deep Zoom tiles cut from the image (pure), the server and its refusals (a real process), and the
page in a real headless Chromium driven by Selenium through Debian's chromedriver.

Without Chromium these browser tests skip locally; with TILEREC_REQUIRE_BROWSER=1 (set by .ci/run) they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.inference import is_blank
from pipeline.outputs.pyramid import DeepZoomGrid, Pyramid, overview
from pipeline.readers.sources import ArraySource, open_source
from pipeline.scenes.codes import qr_scene
from pipeline.tiling import grid
from tasks.cli.commands import main
from tasks.local import _stop, free_port
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.faulty import MARKER_BGR

TIMEOUT = 120
LABEL_BGR = (75, 25, 230)  # #e6194b, the viewer's first label colour
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# Deep Zoom geometry: the DZI definitions worked by hand for a 3000 x 2000 image


def test_deep_zoom_levels_halve_down_to_one_pixel() -> None:
    dz = DeepZoomGrid(3000, 2000)
    assert dz.max_level == 12  # 2^11 < 3000 <= 2^12
    assert dz.level_size(12) == (3000, 2000) and dz.level_size(11) == (1500, 1000)
    assert dz.level_size(1) == (2, 1) and dz.level_size(0) == (1, 1)  # ceil(3000 / 2048) = 2
    assert dz.tile_counts(12) == (12, 8) and dz.tile_counts(11) == (6, 4) and dz.tile_counts(3) == (1, 1)


def test_deep_zoom_tiles_overlap_their_neighbours_by_one_pixel() -> None:
    dz = DeepZoomGrid(3000, 2000)
    assert dz.tile_bounds(12, 0, 0) == (0, 0, 255, 255)
    assert dz.tile_bounds(12, 1, 1) == (253, 253, 256, 256)
    assert dz.tile_bounds(12, 11, 7) == (2793, 1777, 207, 223)  # flush with the right and bottom edges
    assert dz.tile_bounds(2, 0, 0) == (0, 0, 3, 2)
    for bad in ((12, 12, 0), (12, 0, 8), (13, 0, 0), (-1, 0, 0)):
        with pytest.raises(IndexError):
            dz.tile_bounds(*bad)
    assert 'TileSize="254"' in dz.dzi() and '<Size Width="3000" Height="2000"/>' in dz.dzi()


def quadrants(width: int, height: int) -> np.ndarray:
    """Left half red, right half blue, a white square at (1000, 600)-(1200, 800)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (0, 0, 255)
    image[:, width // 2 :] = (255, 0, 0)
    image[600:800, 1000:1200] = 255
    return image


def test_tiles_are_the_image_at_each_scale() -> None:
    image = quadrants(3000, 2000)
    pyramid = Pyramid([ArraySource(image)])
    assert not pyramid.needs_overviews() or pyramid.wait(30)
    full = pyramid.tile_pixels(12, 4, 3)  # level-12 pixels (1015, 761)-(1271, 1017): the white square's corner
    assert np.array_equal(full, image[761:1017, 1015:1271])
    top = pyramid.tile_pixels(4, 0, 0)  # 3000 / 256 -> 12 x 8 pixels
    assert top.shape == (8, 12, 3)
    assert (
        np.abs(top[4, 1].astype(int) - (0, 0, 255)).max() <= 2
        and np.abs(top[4, 10].astype(int) - (255, 0, 0)).max() <= 2
    )
    decoded = cv2.imdecode(np.frombuffer(pyramid.tile(12, 4, 3), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (256, 256, 3) and np.abs(decoded.astype(int) - full).mean() < 4


def test_an_image_without_a_pyramid_gets_overviews_and_the_same_tiles(tmp_path: Path) -> None:
    image = quadrants(6000, 4000)
    single = tmp_path / "single.tif"
    tifffile.imwrite(single, image[:, :, ::-1], photometric="rgb", tile=(512, 512))
    pyramidal = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(pyramidal) as tif:
        tif.write(image[:, :, ::-1], photometric="rgb", tile=(512, 512), subifds=3)
        for factor in (2, 4, 8):
            small = cv2.resize(image, (6000 // factor, 4000 // factor), interpolation=cv2.INTER_AREA)
            tif.write(small[:, :, ::-1], photometric="rgb", tile=(256, 256), subfiletype=1)
    from_single = Pyramid([open_source(single)])
    levels = open_source(pyramidal).levels
    from_levels = Pyramid([open_source(pyramidal, level=n) for n in range(levels)])
    assert levels == 4 and from_single.needs_overviews() and not from_levels.needs_overviews()
    assert from_single.wait(60)
    for level, column, row in ((13, 4, 3), (11, 2, 1), (8, 0, 0), (3, 0, 0)):
        a, b = from_single.tile_pixels(level, column, row), from_levels.tile_pixels(level, column, row)
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 3, (level, column, row)
    from_single.close()
    from_levels.close()


def test_overview_averages_blocks_band_by_band() -> None:
    image = np.arange(64 * 1030, dtype=np.uint32).reshape(1030, 64).astype(np.uint8)
    reduced = overview(ArraySource(image).read, 64, 1030, 8)
    assert reduced.shape == (129, 8)
    assert (
        np.abs(reduced[:128].astype(int) - cv2.resize(image[:1024], (8, 128), interpolation=cv2.INTER_AREA)).max() <= 1
    )


# The command: refusals, and what the server serves


def tilerec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True, timeout=60)


def result_for(path: Path, width: int, height: int, detections: list | None = None) -> dict:
    return {"schema": "tilerec/recognition@2", "image": {"width": width, "height": height, "source": str(path)},
            "recognizer": {"name": "qrcode", "params": {}},
            "tiling": {"tile": 640, "overlap": 0.2, "tiles": 1, "batches": 1, "tasks": 1},
            "detections": detections or [], "failed_tiles": [], "timings": {}}  # fmt: skip


def test_bad_results_and_images_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), quadrants(800, 600))
    cases = {
        "missing.json": ("no such file", None),
        "notjson.json": ("is not JSON", "{nope"),
        "list.json": ("holds 2 results", json.dumps([1, 2])),
        "other.json": ("is not a tilerec result", json.dumps({"schema": "x"})),
        "gone.json": ("the result's image", json.dumps(result_for(tmp_path / "gone.png", 800, 600))),
        "size.json": ("is 800x600 but the result is of a 1600x1200 image", json.dumps(result_for(image, 1600, 1200))),
    }
    for name, (expected, text) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        code = main(["view", str(tmp_path / name), "--no-browser"])
        stderr = capsys.readouterr().err
        assert code == 2 and expected in stderr and len(stderr.splitlines()) == 1, (name, stderr)


def test_an_image_outside_the_allowed_folders_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    elsewhere, results = tmp_path / "elsewhere", tmp_path / "results"
    elsewhere.mkdir()
    results.mkdir()
    image = elsewhere / "secret.png"
    cv2.imwrite(str(image), quadrants(800, 600))
    (results / "r.json").write_text(json.dumps(result_for(image, 800, 600)))
    monkeypatch.setenv("TILEREC_ALLOWED_ROOTS", "")
    monkeypatch.chdir(results)
    assert main(["view", "r.json", "--no-browser"]) == 2
    assert "outside the allowed roots" in capsys.readouterr().err
    assert main(["view", "r.json", "--allow", str(elsewhere), "--export", str(tmp_path / "site"), "-q"]) == 0
    assert (tmp_path / "site" / "image.dzi").is_file()


@pytest.fixture
def small_view(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), quadrants(3000, 2000))
    (tmp_path / "r.json").write_text(json.dumps(result_for(image, 3000, 2000)))
    with serving(tmp_path / "r.json") as (url, process):
        yield url, process


class serving:
    """`tilerec view RESULT --no-browser` in its own process; yields its URL (read from stdout) and the process."""

    def __init__(self, result: Path, *args: str) -> None:
        self.command = [sys.executable, "-m", "tasks.cli", "view", str(result), "--no-browser", *args]

    def __enter__(self) -> tuple[str, subprocess.Popen]:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("tilerec view: http://127.0.0.1:"), (line, self.process.stderr.read())
        return line.split()[2], self.process

    def __exit__(self, *_: object) -> None:
        _stop(self.process, 10)


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, b"", ""


def test_the_server_serves_the_page_the_result_and_tiles_and_nothing_else(small_view) -> None:
    url, _ = small_view
    status, page, kind = get(url)
    assert status == 200 and b"openseadragon.min.js" in page and kind.startswith("text/html")
    status, body, _ = get(url + "result.json")
    assert status == 200 and json.loads(body)["image"]["width"] == 3000
    status, body, kind = get(url + "image_files/12/4_3.jpeg")
    tile = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and kind == "image/jpeg" and tile.shape == (256, 256, 3)
    assert tile[20, 100].tolist() == pytest.approx([255, 255, 255], abs=6)  # the white square, at (1115, 781)
    assert tile[100, 100].tolist() == pytest.approx([0, 0, 255], abs=6)  # red below it, at (1115, 861)
    assert get(url + "openseadragon/images/home_rest.png")[0] == 200
    for path in ("image_files/13/0_0.jpeg", "image_files/12/12_0.jpeg", "../r.json", "viewer/../../r.json",
                 "small.png", "image_files/12/0_0.png", "%2e%2e/r.json"):  # fmt: skip
        assert get(url + path)[0] == 404, path


def test_export_writes_every_tile_and_the_page(tmp_path: Path) -> None:
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), quadrants(1000, 600))
    (tmp_path / "r.json").write_text(json.dumps(result_for(image, 1000, 600)))
    run = tilerec("view", str(tmp_path / "r.json"), "--export", str(tmp_path / "site"))
    assert run.returncode == 0, run.stderr
    site = tmp_path / "site"
    dz = DeepZoomGrid(1000, 600)
    expected = {f"{level}/{c}_{r}.jpeg" for level in range(dz.max_level + 1)
                for c in range(dz.tile_counts(level)[0]) for r in range(dz.tile_counts(level)[1])}  # fmt: skip
    written = {p.relative_to(site / "image_files").as_posix() for p in (site / "image_files").rglob("*.jpeg")}
    assert written == expected and len(expected) == 4 * 3 + 2 * 2 + 9  # levels 10, 9, then one tile each for 8 to 0
    assert {"index.html", "viewer.js", "result.json", "image.dzi"} <= {p.name for p in site.iterdir()}
    assert (site / "openseadragon" / "openseadragon.min.js").is_file()


# In a real browser: a result of a real worker, with failed and skipped tiles


@pytest.fixture(scope="module")
def chromium():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "no Chromium and chromedriver here: apt-get install chromium chromium-driver"
        if os.environ.get("TILEREC_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", "--hide-scrollbars", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The module's Chromium, on a blank page after each test: a viewer page left open redraws while the other
    tests run."""
    yield chromium
    chromium.get("about:blank")


FLAT = 200  # the flat band's grey: its tiles are blank and skipped


@pytest.fixture(scope="module")
def partial_result(tmp_path_factory):
    """12 QR codes over a 3000 x 2000 textured scene, a flat band of 1200 rows below it (skipped tiles) with a red
    marker in it (its tiles fail with tests.faulty:RaisesOnMarker), recognized by the session's worker."""
    scene = qr_scene(3000, 2000, count=12, seed=3)
    image = np.full((3200, 3000, 3), FLAT, np.uint8)
    image[:2000] = scene.image
    image[2790:2810, 1490:1510] = MARKER_BGR
    path = IMAGES_ROOT / "viewer-scene.png"
    cv2.imwrite(str(path), image)
    windows = grid(3200, 3000)  # height, width
    blank = [[w.x, w.y, w.width, w.height] for w in windows if is_blank(image[w.y : w.y2, w.x : w.x2], 16)]
    marked = [
        [w.x, w.y, w.width, w.height] for w in windows if w.x <= 1490 < 1510 <= w.x2 and w.y <= 2790 < 2810 <= w.y2
    ]
    folder = tmp_path_factory.mktemp("viewer")
    return scene, path, blank, marked, folder


@pytest.fixture(scope="module")
def viewed(partial_result, worker, redis_server):
    from tasks.jobs import recognize

    scene, path, blank, marked, folder = partial_result
    result = recognize.delay(str(path), "tests.faulty:RaisesOnMarker", skip_blank=True, on_tile_error="partial").get(
        timeout=TIMEOUT
    )
    assert sorted(d["text"] for d in result["detections"]) == sorted(t.text for t in scene.truths)
    assert sorted(f["window"] for f in result["failed_tiles"]) == sorted(marked) and len(marked) >= 1
    assert sorted(result["tiling"]["skipped_tiles"]) == sorted(blank) and len(blank) >= 6
    assert tilerec_keys(redis_server) == []
    (folder / "result.json").write_text(json.dumps(result))
    return scene, result, folder


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, "return window.tilerec && tilerec.ready && tilerec.fullyLoaded()")


def wait_for(driver, script: str, timeout: float = 20) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script!r}; errors: {driver.execute_script('return tilerec.errors')}")


def settle(driver) -> list[float]:
    """Wait until the viewport stops moving; its centre in image pixels."""
    previous = None
    for _ in range(100):
        time.sleep(0.1)
        centre = driver.execute_script("return tilerec.centre()")
        if centre == previous:
            return centre
        previous = centre
    raise AssertionError("the viewport never came to rest")


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(driver.get_screenshot_as_png(), np.uint8), cv2.IMREAD_COLOR)


def near(pixels: np.ndarray, x: float, y: float, colour: tuple[int, int, int], radius: int = 3) -> bool:
    patch = pixels[int(y) - radius : int(y) + radius + 1, int(x) - radius : int(x) + radius + 1].astype(int)
    return bool((np.abs(patch - colour).max(axis=2) <= 40).any())


def test_the_page_draws_every_detection_filters_and_zooms_to_one(browser, viewed) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    scene, result, folder = viewed
    with serving(folder / "result.json") as (url, _):
        open_page(browser, url)
        assert severe(browser) == [] and browser.execute_script("return tilerec.errors") == []
        assert browser.execute_script("return tilerec.drawn") == len(scene.truths) == len(result["detections"])

        # at full zoom-out: the image is there, and the label's colour outlines every code where it is
        pixels = screenshot(browser)
        assert pixels[:, :1000].std() > 20
        for truth in scene.truths:
            x, y, w, h = truth.box
            left, top = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", x, y + h / 2)
            assert near(pixels, left, top, LABEL_BGR), truth.text
        far = next((px, py) for py in range(100, 2000, 50) for px in range(100, 3000, 50)
                   if all(abs(px - t.box[0] - t.box[2] / 2) > 150 or abs(py - t.box[1] - t.box[3] / 2) > 150
                          for t in scene.truths))  # fmt: skip
        fx, fy = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", *far)
        assert not near(pixels, fx, fy, LABEL_BGR)  # and not everywhere
        failed_x, failed_y, _, failed_h = result["failed_tiles"][0]["window"]
        fx, fy = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])",
                                        failed_x + 20, failed_y + failed_h / 2)  # fmt: skip
        b, g, r = pixels[int(fy), int(fx)].astype(int)
        assert r - g > 50 and r - b > 50  # red shading over the flat grey
        failed_area = [(w[0], w[1], w[0] + w[2], w[1] + w[3]) for w in (f["window"] for f in result["failed_tiles"])]
        skipped = next(s for s in result["tiling"]["skipped_tiles"]
                       if not any(x1 < s[0] + s[2] and s[0] < x2 for x1, _, x2, _ in failed_area))  # fmt: skip
        sx, sy = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])",
                                        skipped[0] + skipped[2] / 2, skipped[1] + skipped[3] / 2)  # fmt: skip
        shaded = pixels[int(sy), int(sx)].astype(int)
        assert abs(shaded.mean() - (0.55 * FLAT + 0.45 * 128)) < 12 and shaded.max() - shaded.min() < 10

        # filters: a payload search, a label switched off and on
        search = browser.find_element(By.ID, "search")
        target = scene.truths[5]
        search.send_keys(target.text)
        assert wait_for(browser, "return tilerec.drawn === 1 && tilerec.shown() === 1")
        search.clear()
        search.send_keys(" ")  # an input event with an empty query
        assert wait_for(browser, f"return tilerec.drawn === {len(scene.truths)}")
        browser.find_element(By.ID, "label-0").click()
        assert wait_for(browser, "return tilerec.shown() === 0") and browser.execute_script("return tilerec.drawn") == 0
        browser.find_element(By.ID, "label-0").click()
        assert wait_for(browser, f"return tilerec.drawn === {len(scene.truths)}")

        # hovering a code shows its payload
        x, y, w, h = target.box
        ex, ey = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", x + w / 2, y + h / 2)
        viewer = browser.find_element(By.ID, "osd")
        size = viewer.size
        ActionChains(browser).move_to_element_with_offset(
            viewer, ex - size["width"] / 2, ey - size["height"] / 2
        ).perform()
        assert wait_for(browser, "return !document.getElementById('tip').hidden")
        assert target.text in browser.find_element(By.ID, "tip").text

        # a list entry moves the viewport onto its detection
        entry = next(li for li in browser.find_elements(By.CSS_SELECTOR, "#list li") if target.text in li.text)
        entry.click()
        centre = settle(browser)
        assert abs(centre[0] - (x + w / 2)) < 5 and abs(centre[1] - (y + h / 2)) < 5
        left, _ = browser.execute_script("return tilerec.toElement(arguments[0], 0)", x)
        right, _ = browser.execute_script("return tilerec.toElement(arguments[0], 0)", x + w)
        assert right - left > 150  # zoomed in: the code spans a good part of the view
        assert severe(browser) == []


def test_the_exported_site_works_from_a_plain_web_server(browser, viewed, tmp_path: Path) -> None:
    scene, _, folder = viewed
    site = tmp_path / "site"
    run = tilerec("view", str(folder / "result.json"), "--export", str(site))
    assert run.returncode == 0, run.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(site)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if get(f"http://127.0.0.1:{port}/image.dzi")[0] == 200:
                    break
            except urllib.error.URLError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "http.server did not start"
            time.sleep(0.1)
        open_page(browser, f"http://127.0.0.1:{port}/")
        assert browser.execute_script("return tilerec.drawn") == len(scene.truths)
        assert severe(browser) == [] and browser.execute_script("return tilerec.errors") == []
    finally:
        _stop(server, 10)


@pytest.mark.cluster
def test_run_view_serves_the_job_result_when_it_ends(tmp_path: Path) -> None:
    scene = qr_scene(1400, 900, count=3, seed=4)
    image = IMAGES_ROOT / "run-view.png"
    cv2.imwrite(str(image), scene.image)
    command = [sys.executable, "-m", "tasks.cli", "run", str(image), "-r", "qrcode", "--workers", "1", "--view",
               "--json", str(tmp_path / "r.json"), "-q"]  # fmt: skip
    env = {**os.environ, "BROWSER": "true"}  # webbrowser runs `true`: no browser opens
    env.pop("TILEREC_BROKER_URL", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("tilerec view: http://127.0.0.1:"), (line, process.stderr.read())
        status, body, _ = get(line.split()[2] + "result.json")
        served = json.loads(body)
        assert status == 200 and served == json.loads((tmp_path / "r.json").read_text())
        assert sorted(d["text"] for d in served["detections"]) == sorted(t.text for t in scene.truths)
    finally:
        _stop(process, 10)


def test_a_result_stored_by_reference_is_fetched_from_redis(tmp_path: Path, redis_server, capsys) -> None:
    from tasks import store

    image = tmp_path / "small.png"
    cv2.imwrite(str(image), quadrants(1000, 600))
    boxes = [{"label": "qrcode", "score": 1.0, "box": [10, 20, 30, 40], "text": "stored"}]
    document = json.dumps(result_for(image, 1000, 600, boxes))
    reference = store.put_result(redis_server.client(), "viewer-ref", document, 60)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"schema": "tilerec/recognition@2", "result_ref": reference, "detections_count": 1}))
    for given in (reference, str(summary)):
        site = tmp_path / f"site-{len(given)}"
        assert (
            main(["view", given, "--broker", redis_server.url, "--allow", str(tmp_path), "--export", str(site), "-q"])
            == 0
        )
        assert json.loads((site / "result.json").read_text())["detections"] == boxes
    assert main(["view", "redis:tilerec:result:nope", "--broker", redis_server.url, "--no-browser"]) == 2
    assert "no result is stored under" in capsys.readouterr().err


def test_the_page_draws_masks_with_holes_rotated_boxes_and_keypoints(browser, tmp_path: Path) -> None:
    image = tmp_path / "grey.png"
    cv2.imwrite(str(image), np.full((800, 1000, 3), 128, np.uint8))
    angle = np.radians(30)
    u, v = np.array([np.cos(angle), np.sin(angle)]) * 75, np.array([-np.sin(angle), np.cos(angle)]) * 40
    corners = [(np.array([750, 250]) + a * u + b * v).tolist() for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    outer, hole = [[200, 200], [500, 200], [500, 500], [200, 500]], [[300, 300], [400, 300], [400, 400], [300, 400]]
    detections = [  # labels sort blob, marker, person: the palette's first three colours
        {"label": "blob", "score": 0.9, "box": [200, 200, 300, 300], "mask": [[outer, hole]]},
        {"label": "marker", "score": 0.8, "box": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
         "obb": {"center": [750, 250], "size": [150, 80], "angle": 30, "corners": corners}},
        {"label": "person", "score": 0.7, "box": [650, 550, 200, 200],
         "keypoints": [[700, 600, 0.9], [800, 600, 0.9], [750, 700, 0.9]]},
    ]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(result_for(image, 1000, 800, detections)))
    with serving(tmp_path / "r.json") as (url, _):
        open_page(browser, url)
        assert browser.execute_script("return tilerec.drawn") == 3 and severe(browser) == []
        pixels = screenshot(browser)

        def at(x: float, y: float) -> np.ndarray:
            ex, ey = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", x, y)
            return pixels[round(ey), round(ex)].astype(int)

        tinted = 0.75 * 128 + 0.25 * np.array([75, 25, 230])  # #e6194b at alpha 0x40 over grey 128 (BGR)
        assert np.abs(at(250, 250) - tinted).max() <= 12  # inside the mask
        assert np.abs(at(350, 350) - 128).max() <= 6  # its hole is left clear
        assert np.abs(at(600, 600) - 128).max() <= 6  # and so is everything else
        edge = (np.array(corners[0]) + np.array(corners[1])) / 2  # the rotated box's edge, in green #3cb44b
        assert near(pixels, *browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", *edge),
                    (75, 180, 60), radius=2)  # fmt: skip
        assert not near(pixels, *browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])",
                                                        min(xs) + 3, min(ys) + 3), (75, 180, 60), radius=2)  # fmt: skip
        for x, y, _ in detections[2]["keypoints"]:  # dots in yellow #ffe119
            assert np.abs(at(x, y) - (25, 225, 255)).max() <= 40, (x, y)


def test_a_result_of_a_pyramid_level_is_shown_on_that_level(tmp_path: Path, capsys) -> None:
    image = quadrants(2400, 1600)
    path = tmp_path / "levels.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image[:, :, ::-1], photometric="rgb", tile=(256, 256), subifds=2)
        for factor in (2, 4):
            small = cv2.resize(image, (2400 // factor, 1600 // factor), interpolation=cv2.INTER_AREA)
            tif.write(small[:, :, ::-1], photometric="rgb", tile=(256, 256), subfiletype=1)
    document = result_for(path, 1200, 800)
    document["image"].update(level=1, downsample=2.0)
    (tmp_path / "r.json").write_text(json.dumps(document))
    assert main(["view", str(tmp_path / "r.json"), "--export", str(tmp_path / "site"), "-q"]) == 0
    assert '<Size Width="1200" Height="800"/>' in (tmp_path / "site" / "image.dzi").read_text()
    tile = cv2.imread(str(tmp_path / "site" / "image_files" / "11" / "2_1.jpeg")).astype(int)  # level 1 from (507, 253)
    assert np.abs(tile[100, 50] - (255, 255, 255)).max() <= 8  # the white square: (1114, 706) at level 0
    assert np.abs(tile[100, 100] - (255, 0, 0)).max() <= 8  # the blue half: (1214, 706), where level 0 is red
    document["image"].pop("level")
    (tmp_path / "r.json").write_text(json.dumps(document))
    assert main(["view", str(tmp_path / "r.json"), "--no-browser"]) == 2
    assert "is 2400x1600 but the result is of a 1200x800 image" in capsys.readouterr().err


def test_faces_show_their_names_and_the_search_finds_a_name(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    image = tmp_path / "grey.png"
    cv2.imwrite(str(image), np.full((800, 1000, 3), 128, np.uint8))
    detections = [
        {"label": "face", "score": 0.9, "box": [100, 100, 200, 200],
         "data": {"identity": "Barack Obama", "similarity": 0.71}},
        {"label": "face", "score": 0.8, "box": [500, 100, 200, 200], "data": {"identity": "unknown-2"}},
        {"label": "face", "score": 0.7, "box": [100, 500, 200, 200]},  # too small to name: no identity
    ]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(result_for(image, 1000, 800, detections)))
    with serving(tmp_path / "r.json") as (url, _):
        open_page(browser, url)
        assert (
            browser.execute_script("return tilerec.drawn") == 3 and browser.execute_script("return tilerec.named") == 2
        )
        pixels = screenshot(browser)
        ex, ey = browser.execute_script("return tilerec.toElement(arguments[0], arguments[1])", 100, 100)
        above = pixels[max(0, round(ey) - 16) : round(ey) - 2, round(ex) : round(ex) + 60]
        assert (above.min(axis=2) > 240).sum() > 20, "white lettering above the named face"
        browser.find_element(By.ID, "search").send_keys("obama")
        assert wait_for(browser, "return tilerec.drawn === 1 && tilerec.shown() === 1 && tilerec.named === 1")
