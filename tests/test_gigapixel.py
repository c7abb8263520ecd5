"""Large images: TIFFs read window by window (on the tile workers when they share the file), pyramid levels,
regions of interest, blank tiles skipped, limits and damage found from the header, and large results."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pipeline import ImageError, OptionsError, recognize_image
from pipeline.inference import is_blank
from pipeline.merge.detections import merge_detections
from pipeline.model import Detections
from pipeline.readers.sources import ArraySource, open_source
from pipeline.readers.tiff import TiffSource
from pipeline.scenes.codes import qr_code, qr_scene
from pipeline.tiling import Window, grid
from tasks import app, recognize
from tasks.client import Job, fetch_document, fetch_result, put_image
from tasks.local import Worker
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.scenes import assert_each_code_once
from tests.test_merge import reference_merge

TIMEOUT = 120


def write_tiff(path: Path, bgr: np.ndarray, levels: int = 1, **options) -> Path:
    """`bgr` as an RGB (or grey) TIFF; `levels` > 1 adds a pyramid of halvings as SubIFDs, as scanners do."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else bgr
    options = {"photometric": "rgb" if bgr.ndim == 3 else "minisblack", **options}
    file_options = {"bigtiff": options.pop("bigtiff", False), "byteorder": options.pop("byteorder", "<")}
    with tifffile.TiffWriter(path, **file_options) as writer:
        writer.write(rgb, subifds=levels - 1, **options)
        for level in range(1, levels):
            smaller = cv2.resize(rgb, None, fx=0.5**level, fy=0.5**level, interpolation=cv2.INTER_AREA)
            writer.write(smaller, subfiletype=1, **options)
    return path


def texts(result: dict) -> list[str]:
    return sorted(d["text"] for d in result["detections"])


@pytest.fixture(scope="module")
def scene():
    return qr_scene(3000, 2000, count=12, seam_share=0.5, seed=11)


@pytest.fixture(scope="module")
def tiled(scene) -> str:
    """Deflate-compressed 128² TIFF tiles: every code crosses a TIFF tile edge, half cross a tilerec seam too."""
    return str(write_tiff(IMAGES_ROOT / "scene-tiled.tif", scene.image, tile=(128, 128), compression="zlib"))


def crosses_tiff_tiles(box, size: int = 128) -> bool:
    x, y, w, h = box
    return x // size != (x + w - 1) // size or y // size != (y + h - 1) // size


def test_the_scene_puts_codes_across_tiff_tiles(scene):
    assert all(crosses_tiff_tiles(t.box) for t in scene.truths)


LAYOUTS = {
    "tiled deflate": {"tile": (256, 256), "compression": "zlib"},
    "tiled raw bigtiff": {"tile": (128, 192), "bigtiff": True},
    "strips deflate": {"rowsperstrip": 37, "compression": "zlib"},
    "one raw strip (read by rows)": {},
    "planes separate": {"tile": (128, 128), "planarconfig": "separate"},
    "planes separate, raw rows": {"planarconfig": "separate"},
    "big-endian": {"tile": (64, 64), "byteorder": ">"},
}


LAYOUT_WINDOWS = [Window(0, 0, 0, 700, 530), Window(1, 250, 100, 300, 333), Window(2, 699, 529, 1, 1),
                  Window(3, 127, 63, 130, 68), Window(4, 600, 400, 100, 130)]  # fmt: skip


def _in_layout(folder: Path, image: np.ndarray, options: dict) -> tuple[Path, bytes]:
    """`image` (BGR or grey) written as a TIFF of `options`' layout: the file, and its bytes."""
    if options.get("planarconfig") == "separate":
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        tifffile.imwrite(folder / "x.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", **options)
    else:
        write_tiff(folder / "x.tif", image, **options)
    return folder / "x.tif", (folder / "x.tif").read_bytes()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("grey", [False, True])
def test_windows_of_every_tiff_layout_equal_the_decoded_image(tmp_path, layout, grey):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (530, 700, 3), dtype=np.uint8)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if grey else image
    options = dict(LAYOUTS[layout])
    if options.get("planarconfig") == "separate" and grey:
        options.pop("planarconfig")
    for target in _in_layout(tmp_path, image, options):
        source = open_source(target)
        assert isinstance(source, TiffSource) and source.windowed
        assert (source.width, source.height, source.channels) == (700, 530, 1 if grey else 3)
        for w in LAYOUT_WINDOWS:
            assert np.array_equal(source.read(w), image[w.y : w.y2, w.x : w.x2]), (layout, w)
        source.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_tiff_opened_grey_gives_its_colour_windows_converted(tmp_path, layout):
    """A grey-only recognizer's windows: each TIFF tile or strip turned grey once as decoded (8-bit RGB), or the
    BGR window turned grey (other layouts), must be the pixels the store would keep of the colour window."""
    image = np.random.default_rng(5).integers(0, 256, (530, 700, 3), dtype=np.uint8)
    for target in _in_layout(tmp_path, image, dict(LAYOUTS[layout])):
        source = open_source(target, grey=True)
        assert isinstance(source, TiffSource) and source.channels == 1
        for w in [*LAYOUT_WINDOWS, LAYOUT_WINDOWS[1]]:  # a window again: from the tiles cached grey
            want = cv2.cvtColor(np.ascontiguousarray(image[w.y : w.y2, w.x : w.x2]), cv2.COLOR_BGR2GRAY)
            assert np.array_equal(source.read(w), want), (layout, w)
        source.close()


def test_sixteen_bit_alpha_and_white_is_zero_tiffs_opened_grey_read_as_their_bgr_converted(tmp_path):
    image = np.random.default_rng(6).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    rgba = np.dstack([rgb, np.full((300, 400), 255, np.uint8)])
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", tile=(64, 64), extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "w.tif", rgb.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))
    tifffile.imwrite(tmp_path / "m.tif", 255 - grey, photometric="miniswhite", tile=(64, 64))
    window = Window(0, 10, 20, 200, 100)
    for name in ("a.tif", "w.tif", "m.tif"):
        colour, grey_source = open_source(tmp_path / name), open_source(tmp_path / name, grey=True)
        read = colour.read(window)
        want = cv2.cvtColor(read, cv2.COLOR_BGR2GRAY) if read.ndim == 3 else read
        assert np.array_equal(grey_source.read(window), want), name
        assert np.array_equal(want, grey[20:120, 10:210]), name


def test_sixteen_bit_and_alpha_tiffs_read_as_eight_bit_bgr(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rgba = np.dstack([cv2.cvtColor(image, cv2.COLOR_BGR2RGB), np.full((300, 400), 255, np.uint8)])
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", tile=(64, 64), extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "w.tif", rgba[:, :, :3].astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))
    for name in ("a.tif", "w.tif"):
        source = open_source(tmp_path / name)
        assert np.array_equal(source.read(Window(0, 10, 20, 200, 100)), image[20:120, 10:210]), name


def test_a_tiff_as_one_huge_compressed_strip_is_decoded_once(tmp_path):
    image = np.zeros((4000, 6000, 3), np.uint8)
    image[100:200, 300:400] = 255
    write_tiff(tmp_path / "strip.tif", image, compression="zlib", rowsperstrip=4000)
    source = open_source(tmp_path / "strip.tif")
    assert isinstance(source, ArraySource)
    assert np.array_equal(source.read(Window(0, 250, 50, 200, 200)), image[50:250, 250:450])
    with pytest.raises(ImageError, match="refusing to decode it"):
        open_source(tmp_path / "strip.tif", max_pixels=4000 * 6000 - 1)


def test_windowed_and_whole_image_paths_give_the_same_detections(scene, tiled):
    whole = recognize_image(scene.image, "qrcode")
    windowed = recognize_image_from(tiled, "qrcode")
    assert_each_code_once(windowed.to_json()["detections"], scene.truths)
    assert windowed.to_json()["detections"] == whole.to_json()["detections"]


def recognize_image_from(path: str, recognizer: str, **options):
    from pipeline.inference import recognize_source

    source = open_source(Path(path), options.get("level", 0))
    try:
        return recognize_source(source, recognizer, **options)
    finally:
        source.close()


def redis_input_bytes(redis_server) -> int:
    return int(redis_server.client().info("stats")["total_net_input_bytes"])


def test_tile_tasks_read_their_own_windows_and_no_pixels_go_through_redis(worker, redis_server, scene, tiled):
    before = redis_input_bytes(redis_server)
    result = recognize.delay(tiled, "qrcode").get(timeout=TIMEOUT)
    through_redis = redis_input_bytes(redis_server) - before
    assert result["image"] == {"width": 3000, "height": 2000, "source": tiled}
    assert_each_code_once(result["detections"], scene.truths)
    assert result["detections"] == recognize_image(scene.image, "qrcode").to_json()["detections"]
    assert through_redis < scene.image.nbytes / 20, f"{through_redis:,} bytes went into Redis"
    assert tilerec_keys(redis_server) == []


def test_tiff_bytes_are_streamed_through_the_store_with_the_same_result(worker, redis_server, scene, tiled):
    before = redis_input_bytes(redis_server)
    data = Path(tiled).read_bytes()
    result = recognize.delay(put_image(data), "qrcode").get(timeout=TIMEOUT)
    grey_tiles = sum(window.width * window.height for window in grid(2000, 3000))  # qrcode's tiles are stored grey
    assert redis_input_bytes(redis_server) - before > len(data) + grey_tiles
    assert result["detections"] == recognize.delay(tiled, "qrcode").get(timeout=TIMEOUT)["detections"]
    assert tilerec_keys(redis_server) == []


@pytest.fixture(scope="module")
def other_node(app, redis_server, tmp_path_factory):
    """A second worker on its own queues, configured as a node without shared storage that hands back large
    results by reference (any result over 2000 bytes of JSON). Jobs are sent to it with queue=JOBS_QUEUE."""
    env = {
        "TILEREC_RESULT_BACKEND": redis_server.url,
        "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
        "TILEREC_SHARED_STORAGE": "false",
        "TILEREC_RESULT_INLINE_MAX_BYTES": "2000",
        "TILEREC_JOBS_QUEUE": OTHER_JOBS,
        "TILEREC_TILES_QUEUE": "gigapixel.tiles",
    }
    log = tmp_path_factory.mktemp("other-node") / "worker.log"
    with Worker(redis_server.url, 1, env=env, log_file=str(log)) as running:
        yield running


OTHER_JOBS = "gigapixel.jobs"


def test_without_shared_storage_the_tiles_go_through_the_store(app, other_node, redis_server, scene, tiled):
    before = redis_input_bytes(redis_server)
    outcome = app.send_task("tilerec.recognize", args=(tiled, "qrcode"), queue=OTHER_JOBS)
    result = fetch_result(outcome.get(timeout=TIMEOUT)).to_json()
    grey_tiles = sum(window.width * window.height for window in grid(2000, 3000))  # qrcode's tiles are stored grey
    assert redis_input_bytes(redis_server) - before > grey_tiles
    assert_each_code_once(result["detections"], scene.truths)
    assert tilerec_keys(redis_server) == []


def test_a_large_result_is_handed_back_by_reference(app, other_node, redis_server, scene, tiled):
    outcome = app.send_task("tilerec.recognize", args=(tiled, "qrcode"), queue=OTHER_JOBS)
    summary = outcome.get(timeout=TIMEOUT)
    assert "detections" not in summary and summary["detections_count"] == len(scene.truths)
    assert summary["result_ref"] == f"redis:tilerec:result:{outcome.id}"
    assert summary["image"]["width"] == 3000 and summary["tiling"]["tiles"] == len(grid(2000, 3000))
    whole = fetch_document(summary)
    assert summary["result_bytes"] == len(json.dumps(whole)) > 2000
    assert_each_code_once(whole["detections"], scene.truths)
    assert {k: v for k, v in whole.items() if k != "detections"} == {
        k: v for k, v in summary.items() if k not in ("result_ref", "result_bytes", "detections_count")
    }
    assert Job(outcome).get(timeout=TIMEOUT).to_json() == whole  # the client fetches it without being asked
    assert fetch_result(summary).to_json() == whole
    ttl = redis_server.client().ttl(f"tilerec:result:{outcome.id}")
    assert 0 < ttl <= app.conf.result_expires
    assert fetch_document(whole) is whole  # a whole result passes through


def test_the_merge_carries_the_jobs_own_arguments_not_its_tile_records(worker, tiled):
    """The merge reads the records from the store (claim check): its message, and its entry in the result backend,
    hold the job's own image and options, whatever the job's size."""
    outcome = recognize.delay(tiled, "qrcode", tile=512, min_score=0.1)
    result = outcome.get(timeout=TIMEOUT)
    assert result["tiling"]["batches"] > 1 and outcome.name == "tilerec.merge"
    assert (list(outcome.args), outcome.kwargs) == ([tiled, "qrcode"], {"tile": 512, "min_score": 0.1})


def inside(box, roi) -> bool:
    x, y, w, h = box
    return roi[0] <= x and roi[1] <= y and x + w <= roi[0] + roi[2] and y + h <= roi[1] + roi[3]


def apart(box, roi, margin: int = 12) -> bool:
    x, y, w, h = box
    return (
        x + w + margin <= roi[0]
        or roi[0] + roi[2] + margin <= x
        or y + h + margin <= roi[1]
        or (roi[1] + roi[3] + margin <= y)
    )


@pytest.fixture(scope="module")
def roi(scene) -> list[int]:
    """A region that holds some codes whole and cuts none."""
    for x in range(0, 1800, 50):
        for y in range(0, 900, 50):
            candidate = [x, y, 1250, 1100]
            boxes = [t.box for t in scene.truths]
            if all(inside(b, candidate) or apart(b, candidate) for b in boxes) and (
                3 <= sum(inside(b, candidate) for b in boxes) < len(boxes)
            ):
                return candidate
    raise AssertionError("no region of interest fits the scene; change the seed")


def test_roi_restricts_the_job_and_keeps_image_coordinates(worker, redis_server, scene, tiled, roi):
    expected = [t for t in scene.truths if inside(t.box, roi)]
    result = recognize.delay(tiled, "qrcode", roi=roi).get(timeout=TIMEOUT)
    assert result["image"] == {"width": 3000, "height": 2000, "source": tiled, "roi": roi}
    assert result["tiling"]["tiles"] == len(grid(roi[3], roi[2]))
    assert_each_code_once(result["detections"], expected)  # boxes compared with the full image's truths
    in_process = recognize_image(scene.image, "qrcode", roi=roi).to_json()
    assert in_process["detections"] == result["detections"] and in_process["image"]["roi"] == roi
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize(
    ("roi", "error", "message"),
    [
        ([2900, 0, 200, 100], "OptionsError", "is not inside the 3000x2000 image"),
        ([0, 0, 0, 10], "OptionsError", "roi width and height must be"),
        ([1, 2, 3], "OptionsError", "roi must be [x, y, width, height]"),
    ],
)
def test_a_bad_roi_is_refused(worker, redis_server, tiled, roi, error, message):
    with pytest.raises(Exception) as raised:
        recognize.delay(tiled, "qrcode", roi=roi).get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == error and message in str(raised.value)
    with pytest.raises(OptionsError):
        recognize_image(np.zeros((2000, 3000), np.uint8), "qrcode", roi=roi)
    assert tilerec_keys(redis_server) == []


@pytest.fixture(scope="module")
def pyramid():
    """Codes of 8 px modules on a flat background, and a 3-level pyramid: level 1 has 4 px modules.
    Each code (232 px, wider than the overlap) is placed whole inside a tile at levels 0 and 1."""
    image = np.full((2400, 3200), 200, np.uint8)
    boxes = {}
    for n, (x, y) in enumerate([(100, 100), (1210, 330), (2400, 1560), (700, 1700), (2900, 80)]):
        picture, (bx, by, bw, bh) = qr_code(f"level code {n}", 8)
        size = min(picture.shape[0], 3200 - x, 2400 - y)
        image[y : y + size, x : x + size] = picture[:size, :size]
        boxes[f"level code {n}"] = (x + bx, y + by, bw, bh)
    path = write_tiff(IMAGES_ROOT / "pyramid.tif", image, levels=3, tile=(256, 256), compression="zlib")
    return str(path), image, boxes


def test_level_reads_a_pyramid_level_and_reports_its_coordinates(worker, redis_server, pyramid):
    path, _, boxes = pyramid
    result = recognize.delay(path, "qrcode", level=1).get(timeout=TIMEOUT)
    assert result["image"] == {"width": 1600, "height": 1200, "source": path, "level": 1, "downsample": 2.0}
    assert texts(result) == sorted(boxes)
    for found in result["detections"]:
        expected = [v / 2 for v in boxes[found["text"]]]
        assert max(abs(a - b) for a, b in zip(found["box"], expected, strict=True)) <= 3
    assert recognize_image_from(path, "qrcode", level=1).to_json()["detections"] == result["detections"]
    full = recognize.delay(path, "qrcode").get(timeout=TIMEOUT)
    assert "level" not in full["image"] and texts(full) == sorted(boxes)
    assert tilerec_keys(redis_server) == []


@pytest.mark.parametrize(("image", "level"), [("pyramid.tif", 3), ("pyramid.png", 1)])
def test_a_level_the_image_does_not_have_is_refused(worker, redis_server, pyramid, image, level):
    cv2.imwrite(str(IMAGES_ROOT / "pyramid.png"), pyramid[1][:100, :100])
    with pytest.raises(Exception) as raised:
        recognize.delay(str(IMAGES_ROOT / image), "qrcode", level=level).get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError"
    assert "pyramid level" in str(raised.value) and f"level {level} asked" in str(raised.value)
    assert tilerec_keys(redis_server) == []


@pytest.fixture(scope="module")
def sparse():
    """A few codes on a flat, slightly noisy background (a slide's glass, a sea): most tiles are blank."""
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(215, 1.5, (2600, 3400)), 0, 255).astype(np.uint8)
    truths = {}
    for n, (x, y) in enumerate([(300, 260), (1900, 1000), (2700, 2150)]):
        picture, (bx, by, bw, bh) = qr_code(f"sparse {n}", 4)
        image[y : y + picture.shape[0], x : x + picture.shape[1]] = picture
        truths[f"sparse {n}"] = (x + bx, y + by, bw, bh)
    path = write_tiff(IMAGES_ROOT / "sparse.tif", image, tile=(256, 256), compression="zlib")
    return str(path), image, truths


def test_skip_blank_skips_empty_tiles_and_finds_the_same_objects(worker, redis_server, sparse):
    path, image, truths = sparse
    windows = grid(2600, 3400)
    blank = [[w.x, w.y, w.width, w.height] for w in windows if is_blank(image[w.y : w.y2, w.x : w.x2], 16)]
    blank_tiles = len(blank)
    assert 0 < blank_tiles < len(windows) - 3
    plain = recognize.delay(path, "qrcode").get(timeout=TIMEOUT)
    assert "skipped" not in plain["tiling"]
    skipping = recognize.delay(path, "qrcode", skip_blank=True).get(timeout=TIMEOUT)
    assert skipping["tiling"]["skipped"] == blank_tiles and skipping["tiling"]["skipped_tiles"] == blank
    assert skipping["detections"] == plain["detections"] and texts(plain) == sorted(truths)
    through_store = recognize.delay(put_image(Path(path).read_bytes()), "qrcode", skip_blank=True).get(timeout=TIMEOUT)
    assert through_store["tiling"]["skipped"] == blank_tiles
    assert through_store["detections"] == plain["detections"]
    in_process = recognize_image(image, "qrcode", skip_blank=True)
    assert in_process.skipped == blank_tiles
    everything = recognize.delay(path, "qrcode", skip_blank=255).get(timeout=TIMEOUT)
    assert everything["tiling"]["skipped"] == len(windows) and everything["detections"] == []
    assert tilerec_keys(redis_server) == []


def test_blank_means_flat_once_noise_is_averaged_out():
    rng = np.random.default_rng(6)
    noisy = np.clip(rng.normal(128, 5.0, (640, 640, 3)), 0, 255).astype(np.uint8)
    assert is_blank(noisy, 16) and not is_blank(noisy, 4)
    gradient = np.tile(np.linspace(120, 130, 640), (640, 1)).astype(np.uint8)  # uneven illumination
    assert is_blank(gradient, 16)
    dot = np.clip(rng.normal(215, 2.0, (640, 640)), 0, 255).astype(np.uint8)
    cv2.circle(dot, (300, 300), 5, 175, -1)  # 10 px across, 40 grey levels darker: 0.02 % of the tile
    assert not is_blank(dot, 16)
    picture, _ = qr_code("x", 1)
    code = np.full((640, 640), 230, np.uint8)
    code[300 : 300 + picture.shape[0], 300 : 300 + picture.shape[1]] = picture
    assert not is_blank(code, 16)
    coloured = np.full((640, 640, 3), 128, np.uint8)
    coloured[:, :320] = (110, 150, 128)  # about the same grey, two colours: not blank
    assert not is_blank(coloured, 16)
    assert is_blank(np.zeros((1, 1), np.uint8), 0) and is_blank(np.full((5, 3, 3), 7, np.uint8), 0)


def test_a_compression_without_its_codec_is_refused_when_opening(tmp_path, scene):
    path = write_tiff(tmp_path / "jpeg.tif", scene.image[:300, :300], tile=(64, 64))
    patch_tags(path, {259: ("SHORT", 7)})  # Compression: JPEG (the pixels are not, which only a decoder would notice)
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        with pytest.raises(ImageError, match=r"requires the 'imagecodecs' package.*tilerec\[tiff-codecs\]"):
            open_source(path)
    else:
        with pytest.raises(ImageError, match="is damaged or uses an unsupported codec"):
            open_source(path).read(Window(0, 0, 0, 64, 64))


TIFF_TYPES = {"SHORT": ("<HHIHH", 3), "LONG": ("<HHII", 4)}  # entry layout, type code


def patch_tags(path: Path, tags: dict[int, tuple[str, int]]) -> None:
    """Set tags of a classic little-endian TIFF's first page in place: {tag: ("SHORT" or "LONG", value)}."""
    data = bytearray(path.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in tags:
            kind, value = tags[tag]
            layout, code = TIFF_TYPES[kind]
            struct.pack_into(layout, data, entry, tag, code, 1, value, *([0] if kind == "SHORT" else []))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_tiffs(scene) -> dict[str, tuple[Path, dict, str, str]]:
    """name: (path, options, error type, message)."""
    small = scene.image[:600, :800]
    made = {}
    huge = write_tiff(IMAGES_ROOT / "claims-huge.tif", small, tile=(256, 256))
    patch_tags(huge, {256: ("LONG", 60_000), 257: ("LONG", 60_000)})  # ImageWidth, ImageLength: a header that lies
    made["claims 3.6 gigapixels"] = (huge, {}, "ImageError", "above the limit of 1,600,000,000")
    made["a roi larger than the limit"] = (huge, {"roi": [0, 0, 50_000, 50_000]}, "ImageError", "refusing to read it")
    made["a small roi of it is read, and found damaged"] = (
        huge,
        {"roi": [0, 0, 640, 640]},
        "ImageError",
        "is damaged: it has 12 data segments",
    )
    good = write_tiff(IMAGES_ROOT / "good.tif", small, tile=(256, 256), compression="zlib")
    cut = IMAGES_ROOT / "truncated.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    made["truncated"] = (cut, {}, "ImageError", "is truncated")
    header = IMAGES_ROOT / "garbage.tif"
    header.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    made["garbage after the magic"] = (header, {}, "ImageError", "is not a readable TIFF")
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tiff:
        offset = tiff.pages[0].dataoffsets[4]
    data[offset : offset + 64] = b"\xff" * 64
    rotten = IMAGES_ROOT / "rotten-tile.tif"
    rotten.write_bytes(bytes(data))
    made["a tile's data is damaged"] = (rotten, {}, "TileFailure", "is damaged or uses an unsupported codec")
    floats = IMAGES_ROOT / "floats.tif"
    tifffile.imwrite(floats, np.zeros((100, 100), np.float32), tile=(64, 64))
    made["float pixels"] = (floats, {}, "ImageError", "unsupported TIFF pixel type float32")
    return made


@pytest.mark.parametrize(
    "name",
    [
        "claims 3.6 gigapixels",
        "a roi larger than the limit",
        "a small roi of it is read, and found damaged",
        "truncated",
        "garbage after the magic",
        "a tile's data is damaged",
        "float pixels",
    ],
)
def test_bad_tiffs_fail_clearly_before_reading_pixels(worker, redis_server, bad_tiffs, name):
    path, options, error, message = bad_tiffs[name]
    with pytest.raises(Exception) as raised:
        recognize.delay(str(path), "qrcode", **options).get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == error
    assert message in str(raised.value)
    assert tilerec_keys(redis_server) == []


def test_a_huge_claim_is_refused_from_the_header_in_process_too(bad_tiffs):
    path = bad_tiffs["claims 3.6 gigapixels"][0]
    with pytest.raises(ImageError, match="above the limit of 1,000,000"):
        open_source(path, max_pixels=1_000_000)


def test_a_file_changed_after_planning_is_not_misread(tmp_path, scene):
    from pipeline.readers.sources import FileRef, SourceCache

    path = write_tiff(tmp_path / "moving.tif", scene.image[:300, :300], tile=(64, 64))
    ref = FileRef.of(path, 0)
    cache = SourceCache()
    assert cache.get(ref).read(Window(0, 0, 0, 10, 10)).shape == (10, 10, 3)
    assert cache.get(ref) is cache.get(ref)  # opened once per process
    write_tiff(path, scene.image[:200, :300], tile=(64, 64))
    with pytest.raises(ImageError, match="changed after the job was planned"):
        cache.get(FileRef(ref.path, 0, ref.mtime_ns + 1, ref.size))
    path.unlink()
    with pytest.raises(ImageError, match="not visible on this worker"):
        cache.get(FileRef(ref.path, 0, 1, 1))
    cache.clear()


def test_the_cache_checks_a_file_once_before_opening_it(tmp_path, scene):
    from pipeline.readers.sources import FileRef, SourceCache

    path = write_tiff(tmp_path / "checked.tif", scene.image[:300, :300], tile=(64, 64))
    ref = FileRef.of(path, 0)
    checked: list[str] = []
    cache = SourceCache()
    for _ in range(3):
        cache.get(ref, check=checked.append).read(Window(0, 0, 0, 10, 10))
    assert checked == [ref.path]  # tile tasks confine the file once per process, not once per tile

    def refuse(named: str) -> None:
        raise ImageError(f"{named!r} is outside the allowed roots")

    refusing = SourceCache()
    for _ in range(2):  # a refused file is never opened, so it is checked (and refused) again
        with pytest.raises(ImageError, match="outside the allowed roots"):
            refusing.get(ref, check=refuse)
    cache.clear()


def test_boxes_that_share_no_grid_cell_are_all_kept():
    far_apart = Detections(
        np.array([[0, 0, 10, 10], [500, 500, 510, 510], [900, 0, 930, 30]], float), [1, 1, 1], ["a"] * 3
    )
    assert len(merge_detections(far_apart)) == 3


def clusters(rng: np.random.Generator, count: int, per: int, spacing: float = 200.0) -> tuple[Detections, list]:
    """`count` clusters of about `per` overlapping boxes on a grid, `spacing` apart: no box reaches another cluster."""
    side = int(np.ceil(np.sqrt(count)))
    parts, members = [], []
    start = 0
    for k in range(count):
        n = int(rng.integers(1, 2 * per))
        cx, cy = (k % side) * spacing + 50, (k // side) * spacing + 50
        xy = rng.uniform(0, 40, (n, 2)) + np.array([cx, cy])
        xyxy = np.hstack([xy, xy + rng.uniform(10, 60, (n, 2))])
        labels = rng.choice(["a", "b"], size=n)
        payloads = [None if rng.random() < 0.8 else str(rng.integers(0, 3)) for _ in range(n)]
        parts.append(Detections(xyxy, rng.random(n), labels, payloads, cut=rng.random(n) < 0.2))
        members.append(range(start, start + n))
        start += n
    return Detections.concat(parts), members


@pytest.mark.parametrize(("method", "metric"), [("greedy_nmm", "ios"), ("nms", "iou")])
def test_tens_of_thousands_of_boxes_merge_as_the_slow_reference_says(method, metric):
    """The O(N²) reference runs cluster by cluster (clusters cannot interact), the vectorised merge on all at once."""
    boxes, members = clusters(np.random.default_rng(9), 2500, 12)
    assert len(boxes) > 25_000
    merged = merge_detections(boxes, method, metric, 0.3)
    got = sorted(
        (
            (merged.labels[k], merged.texts[k], tuple(round(v, 6) for v in merged.xyxy[k]), round(merged.scores[k], 9))
            for k in range(len(merged))
        ),
        key=str,
    )
    expected = sorted(
        (row for cluster in members for row in reference_merge(boxes[list(cluster)], method, metric, 0.3)), key=str
    )
    assert got == expected
    assert len(merged) < 0.8 * len(boxes)  # clusters really merge


def test_the_tiff_options_are_in_the_tasks_contract():
    from pipeline.options import JOB_OPTIONS

    assert {"level", "roi", "skip_blank"} <= set(JOB_OPTIONS)
    assert isinstance(app.conf.tilerec_shared_storage, bool) and app.conf.tilerec_result_inline_max_bytes == 4 * 2**20
