"""Whole-slide images through OpenSlide on real workers: a generated multi-level slide (a generic tiled TIFF with
resolution tags, which OpenSlide reads) recognized at the level a resolution picks, its microns per pixel in the
result; a file OpenSlide cannot read, and a slide without a resolution asked for one, fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.readers.slide import base_mpp, level_for_mpp
from pipeline.scenes.codes import Truth, qr_code
from tasks import recognize
from tests.conftest import IMAGES_ROOT, tilerec_keys

TIMEOUT = 120
MPP = 0.25  # microns per pixel at level 0 (a 40x scan)


def write_slide(path: Path, rgb: np.ndarray, levels: int = 3, mpp: float | None = MPP) -> Path:
    """A pyramid of halvings as tiled TIFF pages, each with its resolution (pixels per cm), as OpenSlide's generic
    TIFF reader expects."""
    with tifffile.TiffWriter(path) as writer:
        for level in range(levels):
            pixels = cv2.resize(rgb, None, fx=0.5**level, fy=0.5**level, interpolation=cv2.INTER_AREA)
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            writer.write(pixels, tile=(256, 256), photometric="rgb", compression="zlib",
                         subfiletype=1 if level else 0, **extra)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def slide() -> tuple[str, list[Truth]]:
    """Codes of 8 px modules on a pale stain-like background: 4 px modules at level 1 (0.5 µm per pixel)."""
    image = np.full((2400, 3200, 3), (225, 205, 230), np.uint8)
    truths = []
    for n, (x, y) in enumerate([(150, 200), (1400, 300), (2500, 1500), (600, 1600)]):
        picture, (bx, by, bw, bh) = qr_code(f"slide code {n}", 8)
        image[y : y + picture.shape[0], x : x + picture.shape[1]] = picture[:, :, None]
        truths.append(Truth("qrcode", (x + bx, y + by, bw, bh), f"slide code {n}"))
    return str(write_slide(IMAGES_ROOT / "slide.tif", image)), truths


def test_the_level_nearest_a_resolution_is_picked():
    downsamples = [1.0, 2.0, 4.0, 16.0]
    assert level_for_mpp(0.25, downsamples, 0.5) == 1
    assert level_for_mpp(0.25, downsamples, 0.3) == 0
    assert level_for_mpp(0.25, downsamples, 3.0) == 3  # 4 µm is nearer 3 (by ratio) than 1 µm
    assert base_mpp({"openslide.mpp-x": "0.2499", "openslide.mpp-y": "0.25"}) == (0.2499, 0.25)
    assert base_mpp({"openslide.mpp-x": "0"}) is None and base_mpp({}) is None


def test_a_slide_is_recognized_at_a_chosen_resolution(worker, redis_server, slide):
    path, truths = slide
    result = recognize.delay(path, "qrcode", mpp=0.5, tile=512).get(timeout=TIMEOUT)
    image = result["image"]
    assert image["level"] == 1 and image["downsample"] == 2.0 and (image["width"], image["height"]) == (1600, 1200)
    assert image["mpp"] == [MPP, MPP]
    found = {d["text"]: d for d in result["detections"]}
    assert sorted(found) == [t.text for t in truths]
    for truth in truths:  # sizes in µm: level pixels × downsample × mpp, against the code's known size
        width_um = found[truth.text]["box"][2] * image["downsample"] * image["mpp"][0]
        assert abs(width_um - truth.box[2] * MPP) <= 2 * image["downsample"] * MPP, truth
    assert tilerec_keys(redis_server) == []


def test_a_slide_read_by_openslide_at_level_0(worker, slide):
    path, truths = slide
    result = recognize.delay(path, "qrcode", reader="slide", tile=1024, overlap=0.3).get(timeout=TIMEOUT)
    assert result["image"]["mpp"] == [MPP, MPP] and "level" not in result["image"]
    assert sorted(d["text"] for d in result["detections"]) == [t.text for t in truths]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("strips.tif", {"reader": "slide"}, "is not a slide format OpenSlide reads"),
        ("no-resolution.tif", {"mpp": 0.5}, "does not record its microns per pixel: choose a level instead of mpp"),
    ],
)
def test_an_unreadable_slide_fails_with_one_clear_line(worker, redis_server, name, options, message):
    rgb = np.full((600, 800, 3), 200, np.uint8)
    path = IMAGES_ROOT / name
    if name == "strips.tif":
        tifffile.imwrite(path, rgb, photometric="rgb")  # a stripped TIFF: no vendor's slide layout
    else:
        write_slide(path, rgb, levels=2, mpp=None)
    with pytest.raises(Exception) as raised:
        recognize.delay(str(path), "qrcode", **options).get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError" and name in str(raised.value)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert worker.process.poll() is None
    assert tilerec_keys(redis_server) == []
