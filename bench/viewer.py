"""`python -m bench.viewer [--size 20000] [--per-cell 6] [--screenshot docs/images/viewer-20000.png]`: the viewer on a
gigapixel result: how soon it shows, how fast it serves tiles, how long a frame of overlays takes.

A SIZE² tiled TIFF with QR codes at known places (bench.gigapixel's scene, PER_CELL² codes per 1000² cell) is
written twice, as one level and as a pyramid (levels of 2x, 4x, … down to 512 px, SubIFDs), and recognized once by
a local cluster (a private Redis, one worker of two processes). For each file, `tilerec view --no-browser` is
started, and a headless Chromium (already running) opens the page:
    server s   process start to the URL printed (Python, imports, the TIFF's header)
    page s     process start to the overlays drawn over the first tiles (the page, result.json, image.dzi)
    full s     process start to every tile of the zoomed-out view drawn
The page then redraws its overlay canvas 30 times at the zoomed-out view (every detection on screen) and zoomed onto
one detection. Last, a fresh server is started and tiles are fetched from it one at a time over HTTP, each for the
first time (a server caches the tiles it served), at the full-size level and at coarser ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from bench.gigapixel import TIFF_TILE, place_codes, texture, tiles
from bench.screenshot import CHROMIUM_FLAGS, chromium
from pipeline.outputs.pyramid import DeepZoomGrid, overview
from pipeline.readers.sources import open_source


def write_pyramid(single: Path, path: Path) -> None:
    """`single`'s pixels as a pyramidal TIFF (SubIFDs halving down to 512 px)."""
    source = open_source(single)
    levels = []
    width, height, read = source.width, source.height, source.read
    while max(width, height) > 512:
        level = overview(read, width, height, 2)
        levels.append(level)
        height, width = level.shape[:2]
        read = (lambda pixels: lambda w: pixels[w.y : w.y2, w.x : w.x2])(level)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(_rows(source), shape=(source.height, source.width, 3), dtype=np.uint8, photometric="rgb",
                  tile=(TIFF_TILE, TIFF_TILE), subifds=len(levels))  # fmt: skip
        for pixels in levels:
            tif.write(pixels[:, :, ::-1], photometric="rgb", tile=(256, 256), subfiletype=1)
    source.close()


def _rows(source: Any):
    from pipeline.tiling import Window

    for y in range(0, source.height, TIFF_TILE):
        band = source.read(Window(0, 0, y, source.width, min(TIFF_TILE, source.height - y)))[:, :, ::-1]
        for x in range(0, source.width, TIFF_TILE):
            tile = np.zeros((TIFF_TILE, TIFF_TILE, 3), np.uint8)
            part = band[:, x : x + TIFF_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def recognize(path: Path, folder: Path) -> dict[str, Any]:
    from tasks import app, recognize
    from tasks.client import fetch_document
    from tasks.local import RedisServer, Worker

    with RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url, tilerec_store_url=server.url)
        env = {"TILEREC_ALLOWED_ROOTS": str(folder), "TILEREC_RESULT_BACKEND": server.url}
        with Worker(server.url, 2, env=env, log_file=str(folder / "worker.log")):
            return fetch_document(recognize.delay(str(path), "qrcode").get(timeout=3600))


def browser() -> Any:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium()
    for flag in (*CHROMIUM_FLAGS, "--window-size=1600,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=options)


def wait_for(driver: Any, script: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {script!r}")
        time.sleep(0.02)
    return time.perf_counter()


def fetch_ms(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    return (time.perf_counter() - began) * 1000


def tile_latencies(url: str, size: int, rng: random.Random, count: int) -> dict[str, dict[str, float]]:
    grid = DeepZoomGrid(size, size)
    rows = {}
    for name, level in (("full size", grid.max_level), ("1/4", grid.max_level - 2), ("1/16", grid.max_level - 4),
                        ("1/64", grid.max_level - 6)):  # fmt: skip
        columns, rows_ = grid.tile_counts(level)
        picks = rng.sample([(c, r) for c in range(columns) for r in range(rows_)], min(count, columns * rows_))
        times = [fetch_ms(f"{url}image_files/{level}/{c}_{r}.jpeg") for c, r in picks]
        rows[name] = {"level": level, "tiles": len(times), "median_ms": round(statistics.median(times), 1),
                      "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))], 1)}  # fmt: skip
    return rows


def redraw_ms(driver: Any) -> float:
    return driver.execute_script(
        "const t = performance.now(); for (let i = 0; i < 30; i++) tilerec.redraw();return (performance.now() - t) / 30"
    )


def show_a_region(driver: Any, centre: tuple[float, float]) -> None:
    """Zoom onto a 2400 x 1400 region around `centre` (a detection's) and hover that detection: the docs' picture."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.execute_script(
        "const item = tilerec.viewer.world.getItemAt(0);"
        "tilerec.viewer.viewport.fitBounds(item.imageToViewportRectangle(arguments[0] - 1200, arguments[1] - 700,"
        " 2400, 1400), true)",
        *centre,
    )
    time.sleep(1)
    wait_for(driver, "return tilerec.fullyLoaded()")
    element = driver.find_element(By.ID, "osd")
    x, y = driver.execute_script("return tilerec.toElement(arguments[0], arguments[1])", *centre)
    ActionChains(driver).move_to_element_with_offset(
        element, x - element.size["width"] / 2, y - element.size["height"] / 2
    ).perform()
    time.sleep(0.5)


def middle_detection(result: dict[str, Any]) -> tuple[float, float]:
    """The centre of the detection nearest the image's centre."""
    half = result["image"]["width"] / 2, result["image"]["height"] / 2
    centres = [(x + w / 2, y + h / 2) for x, y, w, h in (d["box"] for d in result["detections"])]
    return min(centres, key=lambda c: abs(c[0] - half[0]) + abs(c[1] - half[1]))


def start_view(result_path: Path, image: Path) -> tuple[subprocess.Popen, str, float, float]:
    """`tilerec view` in a process of its own: it, its URL, when it started and when it printed the URL."""
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tasks.cli", "view", str(result_path), "--image", str(image),
                                "--no-browser"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    url = process.stdout.readline().split()[2]
    return process, url, began, time.perf_counter()


def measure(
    driver: Any, result_path: Path, image: Path, size: int, screenshot: Path | None, centre: tuple[float, float]
) -> dict[str, Any]:
    process, url, began, served = start_view(result_path, image)
    try:
        driver.get(url)
        painted = wait_for(driver, "return window.tilerec && tilerec.ready && tilerec.drawn > 0")
        loaded = wait_for(driver, "return tilerec.fullyLoaded()")
        row = {"image": image.name, "server_s": round(served - began, 2), "page_s": round(painted - began, 2),
               "full_s": round(loaded - began, 2), "drawn": driver.execute_script("return tilerec.drawn"),
               "redraw_all_ms": round(redraw_ms(driver), 2)}  # fmt: skip
        driver.execute_script("document.querySelector('#list li').click()")
        time.sleep(1.5)
        wait_for(driver, "return tilerec.fullyLoaded()")
        row["redraw_zoomed_ms"] = round(redraw_ms(driver), 2)
        if screenshot is not None:
            show_a_region(driver, centre)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
    finally:
        process.terminate()
        process.wait(10)
    process, url, _, _ = start_view(result_path, image)  # a fresh server: no tile served before
    try:
        row["tiles"] = tile_latencies(url, size, random.Random(7), 40)
    finally:
        process.terminate()
        process.wait(10)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--per-cell", type=int, default=6, help="codes per 1000² cell: PER_CELL²")
    parser.add_argument(
        "--screenshot",
        type=Path,
        help="save a picture of a region of the result here",
    )
    parser.add_argument("--out", type=Path, help="write the row as JSON here too")
    parser.add_argument("--keep", type=Path, help="write the files and the result here, and reuse them next time")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        folder = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tilerec-viewer-")))
        folder.mkdir(parents=True, exist_ok=True)
        single, pyramid, result_path = folder / "single.tif", folder / "pyramid.tif", folder / "result.json"
        codes = place_codes(args.size, 0, per_cell=args.per_cell)
        os.environ["TILEREC_ALLOWED_ROOTS"] = str(folder)
        recognized = None
        if not (result_path.exists() and single.exists() and pyramid.exists()):
            tifffile.imwrite(single, tiles(args.size, codes, texture(1)), shape=(args.size, args.size, 3),
                             dtype=np.uint8, photometric="rgb", tile=(TIFF_TILE, TIFF_TILE), bigtiff=True)  # fmt: skip
            write_pyramid(single, pyramid)
            began = time.perf_counter()
            result_path.write_text(json.dumps(recognize(pyramid, folder)))
            recognized = round(time.perf_counter() - began, 1)
        result = json.loads(result_path.read_text())
        levels = open_source(pyramid).levels
        driver = browser()
        try:
            centre = middle_detection(result)
            rows = [measure(driver, result_path, pyramid, args.size, args.screenshot, centre),
                    measure(driver, result_path, single, args.size, None, centre)]  # fmt: skip
        finally:
            driver.quit()
    report = {"size": args.size, "codes": len(codes), "detections": len(result["detections"]), "levels": levels,
              "recognize_s": recognized, "cores": os.cpu_count(), "rows": rows}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.screenshot is not None:
        image = cv2.imread(str(args.screenshot))
        print(f"screenshot {args.screenshot}: {image.shape[1]}x{image.shape[0]}")


if __name__ == "__main__":
    main()
