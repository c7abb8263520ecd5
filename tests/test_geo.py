"""GeoTIFF and COG read through rasterio by real workers: detections on the map (GeoJSON in the raster's CRS, or
EPSG:4326), overviews as levels, nodata windows skipped, multispectral bands scaled to 8 bits, and a raster with no
georeferencing kept in pixels. Expected coordinates come from the scenes' known code positions and the geotransform
the test wrote."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_points

from pipeline import ImageError, OptionsError
from pipeline.model import Detections, Recognition, Spatial, map_points
from pipeline.options import parse_options
from pipeline.outputs.export import geojson_document
from pipeline.readers.geo import check_bands, default_bands, to_8bit
from pipeline.readers.sources import ReadSpec, choose_reader, open_source
from pipeline.scenes.codes import Truth, qr_code, qr_scene
from pipeline.tiling import Window, grid
from tasks import recognize
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.scenes import assert_each_code_once

TIMEOUT = 120
PIXEL_M = 0.5  # metres per pixel at level 0
ORIGIN = (500_000.0, 4_200_000.0)  # UTM zone 33N easting, northing of the top-left corner
CRS = "EPSG:32633"


def write_cog(path: Path, bands: np.ndarray, nodata: float | None = None, georeferenced: bool = True) -> Path:
    """(bands, rows, columns) as a Cloud-Optimized GeoTIFF: 256² deflate tiles, overviews halving to 512 px."""
    count, height, width = bands.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": bands.dtype.name}
    if georeferenced:
        profile.update(crs=CRS, transform=from_origin(*ORIGIN, PIXEL_M, PIXEL_M))
    if nodata is not None:
        profile["nodata"] = nodata
    staging = path.with_suffix(".staging.tif")
    with rasterio.open(staging, "w", **profile) as dataset:
        dataset.write(bands)
    rasterio.shutil.copy(staging, path, driver="COG", blocksize=256, compress="deflate", overview_resampling="average")
    staging.unlink()
    return path


def expected_map_box(truth: Truth, pixel: float = PIXEL_M) -> tuple[float, float, float, float]:
    """A code's box on the map (min x, min y, max x, max y) from its known pixel box and the written transform."""
    x, y, w, h = truth.box
    return (ORIGIN[0] + x * pixel, ORIGIN[1] - (y + h) * pixel, ORIGIN[0] + (x + w) * pixel, ORIGIN[1] - y * pixel)


def bounds(geometry: dict) -> tuple[float, float, float, float]:
    points = np.array(geometry["coordinates"][0])
    return (*points.min(axis=0), *points.max(axis=0))


@pytest.fixture(scope="module")
def scene():
    return qr_scene(2400, 1800, count=8, seam_share=0.5, seed=26)


@pytest.fixture(scope="module")
def cog(scene) -> str:
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
    return str(write_cog(IMAGES_ROOT / "scene-cog.tif", grey[None]))


# pure parts


def test_default_and_checked_bands():
    assert default_bands(1) == (1,) and default_bands(2) == (1,) and default_bands(4) == (1, 2, 3)
    assert check_bands((3, 2, 1), 4, "x") == (3, 2, 1)
    with pytest.raises(ImageError, match="has 4 band"):
        check_bands((5, 2, 1), 4, "x")
    with pytest.raises(ImageError, match=r"1 band .* or 3"):
        check_bands((1, 2), 4, "x")


def test_scaling_to_8_bits():
    values = np.array([[[0, 1000, 2000, 4000, 65535]]], dtype=np.uint16)
    assert to_8bit(values, (0.0, 4000.0)).tolist() == [[[0, 64, 128, 255, 255]]]
    assert to_8bit(values, None).tolist() == [[[0, 3, 7, 15, 255]]]  # the high byte, as for any 16-bit image
    with pytest.raises(ImageError, match="need stretch"):
        to_8bit(values.astype(np.float32), None)


def test_band_options_are_checked():
    assert parse_options("qrcode", {"bands": [3, 2, 1], "stretch": [0, 4000]}).stretch == [0.0, 4000.0]
    for bad in ({"bands": [1, 2]}, {"bands": [0]}, {"stretch": [5, 5]}, {"stretch": "auto"}, {"reader": "gdal"}):
        with pytest.raises(OptionsError):
            parse_options("qrcode", bad)


def test_the_reader_is_chosen_by_content_or_asked():
    assert choose_reader(ReadSpec(), georeferenced=True, vendor=None) == "geo"
    assert choose_reader(ReadSpec(), georeferenced=False, vendor="generic-tiff") == "tiff"
    assert choose_reader(ReadSpec(), georeferenced=False, vendor="aperio") == "slide"
    assert choose_reader(ReadSpec(bands=(3, 2, 1)), georeferenced=False, vendor=None) == "geo"
    assert choose_reader(ReadSpec(reader="tiff"), georeferenced=True, vendor=None) == "tiff"
    assert choose_reader(ReadSpec(), georeferenced=True, vendor=None, geo_installed=False) == "tiff"  # as before


def test_map_points_apply_the_affine_at_level_zero():
    rotated = (0.5, 0.1, 100.0, 0.2, -0.5, 900.0)
    points = np.array([[10.0, 20.0], [0.0, 0.0]])
    placed = map_points(rotated, 2.0, points)  # a level-1 pixel (10, 20) is level-0 pixel (20, 40)
    assert placed.tolist() == [[100.0 + 0.5 * 20 + 0.1 * 40, 900.0 + 0.2 * 20 - 0.5 * 40], [100.0, 900.0]]


# through the workers


def test_detections_land_on_the_map_within_a_pixel(worker, redis_server, scene, cog):
    result = recognize.delay(cog, "qrcode").get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)
    image = result["image"]
    assert image["georeferenced"] is True and image["crs"]["epsg"] == 32633
    assert image["transform"] == [PIXEL_M, 0.0, ORIGIN[0], 0.0, -PIXEL_M, ORIGIN[1]]
    collection = geojson_document([Recognition.from_json(result)])
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    features = {f["properties"]["text"]: f for f in collection["features"]}
    for truth in scene.truths:
        feature = features[truth.text]
        assert feature["properties"]["label"] == "qrcode" and feature["properties"]["score"] > 0
        assert np.allclose(bounds(feature["geometry"]), expected_map_box(truth), atol=PIXEL_M), truth
        assert np.allclose(feature["properties"]["map_box"], expected_map_box(truth), atol=PIXEL_M)
    assert tilerec_keys(redis_server) == []


def test_an_overview_is_a_level_and_maps_through_its_downsample(worker):
    image = np.full((1800, 2400), 200, np.uint8)
    truths = []
    for n, (x, y) in enumerate([(100, 120), (1300, 300), (700, 1100), (1900, 1400)]):
        picture, (bx, by, bw, bh) = qr_code(f"overview code {n}", 8)  # 4 px modules at level 1
        image[y : y + picture.shape[0], x : x + picture.shape[1]] = picture
        truths.append(Truth("qrcode", (x + bx, y + by, bw, bh), f"overview code {n}"))
    path = str(write_cog(IMAGES_ROOT / "overview-cog.tif", image[None]))
    result = recognize.delay(path, "qrcode", level=1, tile=1200).get(timeout=TIMEOUT)
    assert result["image"]["level"] == 1 and result["image"]["downsample"] == 2.0
    assert result["image"]["width"] == 1200 and result["image"]["height"] == 900
    features = {f["properties"]["text"]: f for f in geojson_document([Recognition.from_json(result)])["features"]}
    assert sorted(features) == [t.text for t in truths]
    for truth in truths:  # a level-1 pixel is 1 m
        assert np.allclose(bounds(features[truth.text]["geometry"]), expected_map_box(truth), atol=2 * PIXEL_M)


def test_geojson_in_wgs84_matches_the_projected_corners(worker, scene, cog):
    result = Recognition.from_json(recognize.delay(cog, "qrcode").get(timeout=TIMEOUT))
    features = {f["properties"]["text"]: f for f in geojson_document([result], to_wgs84=True)["features"]}
    truth = scene.truths[0]
    x1, y1, x2, y2 = expected_map_box(truth)
    lons, lats = warp_points(CRS, "EPSG:4326", [x1, x2], [y1, y2])
    lon1, lat1, lon2, lat2 = bounds(features[truth.text]["geometry"])
    degree_per_pixel = PIXEL_M / 111_000 * 1.5  # a pixel's size in degrees, generously at 38° N
    assert abs(lon1 - min(lons)) < degree_per_pixel and abs(lon2 - max(lons)) < degree_per_pixel
    assert abs(lat1 - min(lats)) < degree_per_pixel and abs(lat2 - max(lats)) < degree_per_pixel
    assert 14.9 < lon1 < 15.1 and 37.8 < lat1 < 38.1  # UTM 33N around (500 km, 4200 km)


def test_nodata_windows_are_skipped_like_blank_tiles(worker, redis_server, scene):
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
    grey = np.maximum(grey, 1)  # 0 is the nodata value: none inside the scene
    left = [t for t in scene.truths if t.box[0] + t.box[2] < 1200]
    grey[:, 1280:] = 0  # the right part is outside the surveyed area
    path = write_cog(IMAGES_ROOT / "nodata-cog.tif", grey[None], nodata=0)
    result = recognize.delay(str(path), "qrcode").get(timeout=TIMEOUT)
    windows = grid(1800, 2400, 640, 0.2)
    all_nodata = [w for w in windows if w.x >= 1280]
    assert all_nodata and result["tiling"]["skipped"] == len(all_nodata)
    assert {t.text for t in left} <= {d["text"] for d in result["detections"]}
    assert tilerec_keys(redis_server) == []


def test_multispectral_bands_are_picked_and_scaled(worker, scene):
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY).astype(np.uint32)
    tints = {"red": 1.0, "green": 0.8, "blue": 0.6}  # distinct bands, so their order shows
    reflectance = {name: (grey * 4000 * tint // 255).astype(np.uint16) for name, tint in tints.items()}  # 12-bit-like
    near_infrared = np.random.default_rng(1).integers(0, 4000, size=grey.shape, dtype=np.uint16)
    # stored as blue, green, red, near infrared (as many satellites order them): red, green, blue are 3, 2, 1
    bands = np.stack([reflectance["blue"], reflectance["green"], reflectance["red"], near_infrared])
    path = write_cog(IMAGES_ROOT / "multispectral-cog.tif", bands)
    window = Window(0, 300, 200, 400, 300)
    source = open_source(path, spec=ReadSpec(bands=(3, 2, 1), scale=(0.0, 4000.0)))
    expected_bgr = np.stack([reflectance[c][200:500, 300:700] for c in ("blue", "green", "red")], -1) * (255 / 4000)
    assert np.abs(source.read(window).astype(float) - expected_bgr).max() <= 1.0
    source.close()
    unscaled = open_source(path, spec=ReadSpec(bands=(3, 2, 1))).read(window)
    assert (unscaled[:, :, 2] == reflectance["red"][200:500, 300:700] >> 8).all()  # the high byte, as for any 16-bit
    result = recognize.delay(str(path), "qrcode", bands=[3, 2, 1], stretch=[0, 4000]).get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)


def test_a_tiff_without_georeferencing_stays_in_pixels_and_says_so(worker, scene):
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
    path = str(write_cog(IMAGES_ROOT / "plain-cog.tif", grey[None], georeferenced=False))
    plain = recognize.delay(path, "qrcode").get(timeout=TIMEOUT)
    assert "georeferenced" not in plain["image"] and "transform" not in plain["image"]  # an ordinary TIFF
    asked = recognize.delay(path, "qrcode", reader="geo").get(timeout=TIMEOUT)
    assert asked["image"]["georeferenced"] is False and "crs" not in asked["image"]
    assert asked["detections"] == plain["detections"]
    features = {f["properties"]["text"]: f for f in geojson_document([Recognition.from_json(asked)])["features"]}
    truth = scene.truths[0]
    x, y, w, h = truth.box
    assert np.allclose(bounds(features[truth.text]["geometry"]), (x, y, x + w, y + h), atol=1.0)
    with pytest.raises(ValueError, match="no CRS"):
        geojson_document([Recognition.from_json(asked)], to_wgs84=True)


def test_a_truncated_geotiff_is_refused_from_its_header(worker, redis_server, scene, cog):
    data = Path(cog).read_bytes()
    cut = IMAGES_ROOT / "cut-cog.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as raised:
        recognize.delay(str(cut), "qrcode").get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError"
    assert "cut-cog.tif" in str(raised.value) and "is truncated" in str(raised.value)
    assert tilerec_keys(redis_server) == []
    assert worker.process.poll() is None


def test_spatial_round_trips_through_the_result():
    spatial = Spatial(crs="WKT", epsg=32633, transform=(0.5, 0, 1, 0, -0.5, 2), georeferenced=True)
    assert Spatial.from_json(spatial.to_json()) == spatial
    assert Spatial.from_json({"width": 1}) is None


def test_geojson_outlines_masks_with_holes_and_rotated_boxes():
    from shapely.geometry import Polygon

    ring = Polygon([(10, 10), (30, 10), (30, 30), (10, 30)], [[(15, 15), (15, 25), (25, 25), (25, 15)]])
    detections = Detections(
        np.array([[10, 10, 30, 30], [100, 100, 140, 120]]), np.array([0.9, 0.8]), ["field", "car"],
        masks=[ring, None], obb=[None, [120, 110, 40, 20, 90]], data={"crop": ["wheat", None]},
    )  # fmt: skip
    spatial = Spatial(crs=CRS, epsg=32633, transform=(PIXEL_M, 0, ORIGIN[0], 0, -PIXEL_M, ORIGIN[1]))
    recognition = Recognition(width=200, height=200, detections=detections, recognizer="x", spatial=spatial)
    field, car = geojson_document([recognition])["features"]
    exterior, hole = field["geometry"]["coordinates"]
    assert field["geometry"]["type"] == "Polygon" and len(exterior) == len(hole) == 5  # closed rings
    assert exterior[0] == exterior[-1] and bounds({"coordinates": [hole]}) == (
        ORIGIN[0] + 7.5, ORIGIN[1] - 12.5, ORIGIN[0] + 12.5, ORIGIN[1] - 7.5)  # fmt: skip

    def signed_area(points):
        x, y = np.array(points).T
        return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))

    assert signed_area(exterior) > 0 > signed_area(hole)  # RFC 7946: exterior counter-clockwise, holes clockwise
    assert field["properties"]["label"] == "field" and field["properties"]["data"] == {"crop": "wheat"}
    assert "mask" not in field["properties"]
    # a 40 x 20 box turned 90°: 20 wide and 40 high around (120, 110), on the map
    assert bounds(car["geometry"]) == (ORIGIN[0] + 55, ORIGIN[1] - 65, ORIGIN[0] + 65, ORIGIN[1] - 45)


def test_the_cli_writes_geojson_in_the_rasters_crs_or_wgs84(worker, redis_server, scene, cog, tmp_path):
    from tests.test_cli import tilerec

    for extra, name in (([], "utm.geojson"), (["--wgs84"], "wgs84.geojson")):
        out = tmp_path / name
        completed = tilerec("run", cog, "-r", "qrcode", "--broker", redis_server.url, "--shared-path", "--quiet",
                            "--format", "geojson", "--json", str(out), *extra)  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        collection = json.loads(out.read_text())
        assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(scene.truths)
        first = bounds(collection["features"][0]["geometry"])
        assert (500_000 < first[0] < 502_000) if not extra else (14.9 < first[0] < 15.1)
    refused = tilerec("run", cog, "-r", "qrcode", "--wgs84", "--json", str(tmp_path / "x.json"))
    assert refused.returncode == 2 and "--wgs84 is for --format geojson" in refused.stderr
