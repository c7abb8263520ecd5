"""Every input identified from its first bytes and sized from its header before anything is decoded
(`pipeline.readers`): the wrong kind of file refused whatever its size, over-limit images refused unread."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.readers.images import ImageError
from pipeline.readers.sources import decode, image_size
from tasks import recognize
from tasks.client import put_image
from tests.conftest import IMAGES_ROOT, tilerec_keys

TIMEOUT = 120
GIB = 1 << 30


def rss_mb(pid: int) -> float:
    """A process's resident memory now (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for process {pid}")


HEADS = {
    "an AVI video": b"RIFF\x00\x00\x00\xf0AVI LIST\x00\x10\x00\x00hdrlavih",
    "random bytes": np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "a zip archive": b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
}


@pytest.mark.parametrize("name", list(HEADS))
def test_a_huge_file_of_the_wrong_kind_is_refused_from_its_first_bytes(worker, redis_server, name):
    """4 GiB, all but its head a hole: a worker that read it whole would grow by 4 GiB (or die)."""
    path = IMAGES_ROOT / f"wrong-kind-{name.replace(' ', '-')}.png"
    with open(path, "wb") as sparse:
        sparse.write(HEADS[name])
        sparse.truncate(4 * GIB)
    before = {pid: rss_mb(pid) for pid in worker.child_pids()}
    try:
        with pytest.raises(Exception) as raised:
            recognize.delay(str(path), "qrcode").get(timeout=TIMEOUT)
    finally:
        path.unlink()
    after = {pid: rss_mb(pid) for pid in worker.child_pids() if pid in before}
    assert type(raised.value).__name__ == "ImageError"
    assert str(raised.value).startswith("not an image format tilerec reads (it starts")
    assert "\n" not in str(raised.value)
    assert after and all(abs(after[pid] - before[pid]) <= 20 for pid in after), (before, after)
    assert tilerec_keys(redis_server) == []


def test_an_upload_of_the_wrong_kind_is_refused_and_leaves_nothing(worker, redis_server):
    data = HEADS["an AVI video"] + bytes(8 << 20)
    with pytest.raises(Exception) as raised:
        recognize.delay(put_image(data), "qrcode").get(timeout=TIMEOUT)
    assert type(raised.value).__name__ == "ImageError"
    assert "not an image format tilerec reads" in str(raised.value)
    assert tilerec_keys(redis_server) == []


def claiming(kind: str, width: int, height: int) -> bytes:
    """A small file of `kind` whose header claims `width` x `height` pixels (its pixel data far too short)."""
    if kind == "PPM":
        return f"P6\n# a comment\n{width} {height}\n255\n".encode() + bytes(64)
    if kind == "PFM":
        return f"PF\n{width} {height}\n-1.0\n".encode() + bytes(64)
    if kind == "HDR":
        return f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode() + bytes(64)
    if kind == "Sun raster":
        return struct.pack(">8I", 0x59A66A95, width, height, 24, width * height * 3, 1, 0, 0) + bytes(64)
    if kind == "BMP":
        header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + header + bytes(64)
    if kind == "JPEG 2000":
        ok, data = cv2.imencode(".jp2", np.zeros((64, 64, 3), np.uint8))
        assert ok
        data = bytearray(data.tobytes())
        at = data.index(b"ihdr") + 4  # the image header box: height, then width
        data[at : at + 8] = struct.pack(">II", height, width)
        return bytes(data)
    if kind == "WebP":
        ok, data = cv2.imencode(".webp", np.zeros((8, 8, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
        assert ok
        data = bytearray(data.tobytes())
        at = data.index(b"VP8L") + 9  # after the chunk's size and signature: 14 bits width - 1, 14 bits height - 1
        bits = (width - 1) | (height - 1) << 14 | (data[at + 3] >> 4) << 28
        data[at : at + 4] = struct.pack("<I", bits)
        return bytes(data)
    raise KeyError(kind)


CLAIMS = ["PPM", "PFM", "HDR", "Sun raster", "BMP", "JPEG 2000", "WebP"]


@pytest.mark.parametrize("kind", CLAIMS)
def test_sizes_come_from_each_formats_header(kind):
    assert image_size(claiming(kind, 5000, 3000)) == (5000, 3000)


@pytest.mark.parametrize("kind", CLAIMS)
def test_an_image_over_the_limit_is_refused_from_its_header_before_decoding(kind):
    """The pixel data is a few bytes: a decoder would fail on it, or fill 15 megapixels; the header check first."""
    with pytest.raises(ImageError, match=r"5000x3000 = 15,000,000 pixels, above the limit of 1,000,000"):
        decode(claiming(kind, 5000, 3000), max_pixels=1_000_000)


def test_formats_read_by_opencv_give_the_pixels_written():
    image = np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for suffix in (".bmp", ".ppm", ".ras"):
        ok, data = cv2.imencode(suffix, image)
        assert ok
        np.testing.assert_array_equal(decode(data.tobytes()), image, err_msg=suffix)
    ok, data = cv2.imencode(".jp2", image)  # lossy by default: as OpenCV decodes it
    np.testing.assert_array_equal(decode(data.tobytes()), cv2.imdecode(data, cv2.IMREAD_UNCHANGED))
    ok, data = cv2.imencode(".pgm", image[:, :, 0])
    np.testing.assert_array_equal(decode(data.tobytes()), image[:, :, 0])


def encoded(scene_path: str, suffix: str) -> Path:
    """The big scene as a JPEG (quality 95), a WebP or a stripped deflate TIFF, written once."""
    import tifffile

    path = IMAGES_ROOT / f"big-qr{suffix}"
    if not path.is_file():
        pixels = cv2.imread(scene_path, cv2.IMREAD_COLOR)
        if suffix == ".tif":
            tifffile.imwrite(path, cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), rowsperstrip=64, compression="zlib")
        else:
            assert cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix == ".jpg" else [])
    return path


# (suffix, uploaded: bytes through the store rather than a shared file, streamed); a WebP is decoded whole, after
# the chord is published
STREAMED = {
    "JPEG": (".jpg", False, True),
    "WebP": (".webp", False, True),
    "stripped TIFF, uploaded": (".tif", True, True),
}


@pytest.mark.parametrize("name", list(STREAMED))
def test_streamed_jobs_find_what_one_process_finds_on_the_same_pixels(worker, redis_server, big_scene, name):
    """On two processes the tiling task publishes the chord and then stores each row of tiles as it is decoded:
    the very detections of the same tiles recognized in one process from the file decoded whole."""
    from pipeline.inference import recognize_image

    scene, path = big_scene
    suffix, uploaded, streamed = STREAMED[name]
    file = encoded(path, suffix)
    alone = recognize_image(decode(file.read_bytes()), "qrcode").to_json()["detections"]
    image = put_image(file.read_bytes()) if uploaded else str(file)
    result = recognize.delay(image, "qrcode").get(timeout=TIMEOUT)
    assert result["detections"] == alone
    assert ("streamed_decode_s" in result["timings"]) == streamed
    assert len(alone) == len(scene.truths)
    assert tilerec_keys(redis_server) == []
