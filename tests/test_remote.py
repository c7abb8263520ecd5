"""Images in object storage, on a real S3-compatible server (SeaweedFS, started here on loopback ports): workers
read windows with range requests (the bytes fetched are counted, far below the object's size), only URLs on the
allow-list are read, and a missing bucket or key, bad credentials, a truncated or replaced object each fail with
one clear line, the worker still up and nothing left in Redis."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import s3fs
import tifffile

from pipeline import ImageError
from pipeline.readers import remote
from pipeline.readers.sources import FileRef, SourceCache, open_source
from pipeline.tiling import Window
from tasks.local import S3Server, Worker
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.scenes import assert_each_code_once
from tests.test_geo import write_cog

TIMEOUT = 120
JOBS = "remote.jobs"  # this module's workers' own queues
ALLOWED = "s3://scans s3://gone-bucket"


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def s3(scene_cog) -> Iterator[S3Server]:
    with S3Server() as server, environment(server.env()):
        fs = server.filesystem()
        fs.mkdir("scans")
        fs.put_file(scene_cog[1], "scans/scene-cog.tif")
        rng = np.random.default_rng(5)
        noise = rng.integers(0, 255, size=(4096, 4096), dtype=np.uint8)  # incompressible: bytes are pixels
        fs.put_file(str(write_cog(IMAGES_ROOT / "noise-cog.tif", noise[None])), "scans/noise-cog.tif")
        tifffile.imwrite(IMAGES_ROOT / "noise-tiled.tif", noise, tile=(256, 256), compression="zlib")
        fs.put_file(str(IMAGES_ROOT / "noise-tiled.tif"), "scans/noise-tiled.tif")
        data = (IMAGES_ROOT / "noise-tiled.tif").read_bytes()
        fs.pipe("scans/truncated.tif", data[: len(data) // 3])
        yield server


@pytest.fixture(scope="module")
def scene_cog():
    from pipeline.scenes.codes import qr_scene

    scene = qr_scene(2400, 1800, count=8, seam_share=0.5, seed=27)
    grey = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
    return scene, str(write_cog(IMAGES_ROOT / "remote-scene-cog.tif", grey[None]))


def worker_env(redis_url: str, s3: S3Server, queue: str = JOBS, **credentials: str) -> dict[str, str]:
    return {"TILEREC_RESULT_BACKEND": redis_url, "TILEREC_ALLOWED_ROOTS": str(IMAGES_ROOT),
            "TILEREC_ALLOWED_URLS": ALLOWED, "TILEREC_JOBS_QUEUE": queue, "TILEREC_TILES_QUEUE": f"{queue}.tiles",
            "TILEREC_DEFAULT_QUEUE": "", **s3.env(**credentials)}  # fmt: skip


@pytest.fixture(scope="module")
def s3_worker(app, redis_server, s3, tmp_path_factory) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("remote") / "worker.log"
    with Worker(redis_server.url, 2, env=worker_env(redis_server.url, s3), log_file=str(log)) as running:
        yield running


def submit(app, image: str, queue: str = JOBS, **options):
    return app.send_task("tilerec.recognize", args=(image, "qrcode"), kwargs=options, queue=queue)


@pytest.fixture
def fetched(monkeypatch) -> list[int]:
    """The bytes of every range request this process makes to the S3 server (s3fs's one fetching method, counted
    as it runs)."""
    sizes: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def counted(self, start: int, end: int) -> bytes:
        data = original(self, start, end)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    return sizes


# pure parts


def test_the_allow_list_takes_whole_prefixes():
    prefixes = remote.allowed_urls_from_env("s3://scans, s3://tiles/public/  https://data.example.org/cogs")
    assert prefixes == ["s3://scans", "s3://tiles/public/", "https://data.example.org/cogs"]
    assert remote.check_allowed("s3://scans/a/b.tif", prefixes) == "s3://scans/a/b.tif"
    assert remote.check_allowed("https://data.example.org/cogs/x.tif", prefixes)
    for refused in ("s3://scans-private/a.tif", "s3://tiles/private/a.tif", "https://data.example.org/cogsx/a.tif"):
        with pytest.raises(ImageError, match="outside the allowed URLs"):
            remote.check_allowed(refused, prefixes)
    with pytest.raises(ImageError, match=r"'\.\.' is not allowed"):
        remote.check_allowed("s3://scans/../secret/a.tif", prefixes)
    with pytest.raises(ImageError, match="TILEREC_ALLOWED_URLS"):
        remote.check_allowed("s3://scans/a.tif", [])


# in this process: what is fetched


@pytest.mark.parametrize("key", ["noise-cog.tif", "noise-tiled.tif"])
def test_windows_are_read_with_range_requests(s3, fetched, key):
    url = f"s3://scans/{key}"
    size = s3.filesystem().size(f"scans/{key}")
    source = open_source(remote.stat(url))
    assert (source.reader, source.width, source.height) == ("geo" if "cog" in key else "tiff", 4096, 4096)
    expected = tifffile.imread(IMAGES_ROOT / key, level=0) if "tiled" in key else None
    for x, y in [(0, 0), (3000, 2500)]:
        pixels = source.read(Window(0, x, y, 512, 512))
        if expected is not None:
            np.testing.assert_array_equal(pixels, expected[y : y + 512, x : x + 512])
    source.close()
    # the windows touch 4 + 9 of the 256² TIFF tiles (64 KiB each, fetched in 256 KiB blocks), and the header
    assert size > 16_000_000 and 0 < sum(fetched) < size / 5, (sum(fetched), size)


def test_a_replaced_object_is_noticed(s3):
    fs = s3.filesystem()
    fs.put_file(str(IMAGES_ROOT / "noise-tiled.tif"), "scans/replaced.tif")
    planned = open_source(found := remote.stat("s3://scans/replaced.tif"))
    ref = FileRef.of(found, 0, planned)
    planned.close()
    assert ref.etag and ref.size == found.size
    fs.pipe("scans/replaced.tif", (IMAGES_ROOT / "noise-tiled.tif").read_bytes()[::-1])
    with pytest.raises(ImageError, match="changed after the job was planned"):
        SourceCache().get(ref)


# through the workers


def test_a_worker_recognizes_an_object_in_storage(app, s3_worker, redis_server, scene_cog):
    scene, _ = scene_cog
    result = submit(app, "s3://scans/scene-cog.tif").get(timeout=TIMEOUT)
    assert_each_code_once(result["detections"], scene.truths)
    assert result["image"]["source"] == "s3://scans/scene-cog.tif" and result["image"]["crs"]["epsg"] == 32633
    assert result["tiling"]["batches"] > 1  # the tile tasks opened the object themselves
    assert tilerec_keys(redis_server) == []


BAD_URLS = {
    "s3://elsewhere/scene-cog.tif": "is outside the allowed URLs",
    "s3://gone-bucket/scene-cog.tif": "does not exist (The specified bucket does not exist)",
    "s3://scans/no-such-key.tif": "does not exist (no such object)",
    "s3://scans/truncated.tif": "is truncated",
    "https://example.org/a.tif": "is outside the allowed URLs",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
def test_a_bad_url_fails_with_one_clear_line(app, s3_worker, redis_server, url):
    with pytest.raises(Exception) as raised:
        submit(app, url).get(timeout=TIMEOUT)
    message = str(raised.value)
    assert type(raised.value).__name__ == "ImageError" and url in message and BAD_URLS[url] in message
    assert "\n" not in message
    assert s3_worker.process.poll() is None
    assert tilerec_keys(redis_server) == []


@pytest.mark.cluster
def test_bad_credentials_fail_with_one_clear_line(app, redis_server, s3, tmp_path):
    env = worker_env(redis_server.url, s3, "remote.bad-credentials", secret="not-the-secret")
    with Worker(redis_server.url, 1, env=env, log_file=str(tmp_path / "worker.log")) as running:
        with pytest.raises(Exception) as raised:
            submit(app, "s3://scans/scene-cog.tif", "remote.bad-credentials").get(timeout=TIMEOUT)
        message = str(raised.value)
        assert "s3://scans/scene-cog.tif" in message and "access denied, check the credentials" in message
        assert running.process.poll() is None
    assert tilerec_keys(redis_server) == []


def test_the_cli_recognizes_an_object_on_a_private_cluster(s3, scene_cog, tmp_path):
    from tests.test_cli import CLI, cli_env

    scene, _ = scene_cog
    out = tmp_path / "found.geojson"
    env = {**cli_env(), "TILEREC_ALLOWED_URLS": "s3://scans", **s3.env()}
    command = [*CLI, "run", "s3://scans/scene-cog.tif", "-r", "qrcode", "--workers", "2", "--quiet",
               "--format", "geojson", "--json", str(out)]  # fmt: skip
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert completed.returncode == 0, completed.stderr
    features = json.loads(out.read_text())["features"]
    assert sorted(f["properties"]["text"] for f in features) == sorted(t.text for t in scene.truths)
    refused = subprocess.run([*command[:-4], "--annotate", str(tmp_path / "a.png")], env=env, capture_output=True,
                             text=True, timeout=TIMEOUT)  # fmt: skip
    assert refused.returncode == 2 and "--annotate draws on local images only" in refused.stderr


def test_a_video_in_object_storage_is_read_by_its_segments(app, redis_server, s3, s3_worker):
    """Each segment task opens the object itself (range requests through fsspec) and seeks in it: the result is
    the one of the same clip on disk."""
    from pipeline.video.clips import recognize_video
    from tests.clips import OVERLAP, TILE, write_clip

    known = write_clip(IMAGES_ROOT / "remote-known.mp4")
    s3.filesystem().put_file(str(known.path), "scans/known.mp4")
    options = {"tile": TILE, "overlap": OVERLAP, "segment_frames": 30}
    sent = app.send_task("tilerec.recognize_video", args=("s3://scans/known.mp4", "aruco"), kwargs=options, queue=JOBS)
    result = sent.get(timeout=TIMEOUT)
    on_disk = recognize_video(known.path, "aruco", **options).to_json()
    assert result["tiling"]["segments"] == 5 and result["tracks"] == on_disk["tracks"]
    assert sorted(track["text"] for track in result["tracks"]) == ["3", "7"]
    assert tilerec_keys(redis_server) == []
