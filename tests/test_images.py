import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from pipeline.readers.images import ImageError, confine, encode_array
from pipeline.readers.inputs import read_file
from pipeline.readers.sources import decode, image_size


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def jpeg_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def picture() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 255, size=(120, 200, 3), dtype=np.uint8)


def test_header_sizes_are_read_without_decoding(picture):
    assert image_size(png_bytes(picture)) == (200, 120)
    assert image_size(jpeg_bytes(picture)) == (200, 120)
    _, bmp = cv2.imencode(".bmp", picture)
    assert image_size(bmp.tobytes()) == (200, 120)
    with pytest.raises(ImageError, match="GIF header is damaged"):
        image_size(b"GIF89a....")


def test_png_and_jpeg_decode_to_bgr(picture):
    assert np.array_equal(decode(png_bytes(picture)), picture)
    assert decode(jpeg_bytes(picture)).shape == (120, 200, 3)


def test_grey_stays_single_channel_and_alpha_is_dropped(picture):
    grey = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
    assert decode(png_bytes(grey)).shape == (120, 200)
    bgra = cv2.cvtColor(picture, cv2.COLOR_BGR2BGRA)
    bgra[:, :, 3] = 7
    assert np.array_equal(decode(png_bytes(bgra)), picture)


def test_sixteen_bit_is_scaled_to_eight(picture):
    wide = picture.astype(np.uint16) * 257  # 0..255 -> 0..65535
    assert np.array_equal(decode(png_bytes(wide)), picture)


def test_arrays_round_trip_as_npy(picture):
    assert np.array_equal(decode(encode_array(picture)), picture)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is a text file, not a JPEG\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n\0\0", "PNG header is damaged"),
    ],
)
def test_junk_is_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_truncated_png_and_jpeg_are_refused(picture):
    png, jpeg = png_bytes(picture), jpeg_bytes(picture)
    with pytest.raises(ImageError, match="PNG file is truncated"):
        decode(png[: len(png) // 2])
    with pytest.raises(ImageError, match="JPEG file is truncated"):
        decode(jpeg[: len(jpeg) // 2])


def test_a_bomb_is_refused_from_its_header_before_decoding():
    bomb = png_header_claiming(100_000, 100_000)
    with pytest.raises(ImageError, match=r"100000x100000 = 10,000,000,000 pixels, above the limit of 1,000,000"):
        decode(bomb, max_pixels=1_000_000)


def test_the_pixel_limit_applies_to_arrays_too(picture):
    with pytest.raises(ImageError, match="above the limit"):
        decode(encode_array(picture), max_pixels=100)


def test_paths_are_confined_to_the_allowed_roots(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"y")
    os.symlink(outside, root / "link.png")
    assert read_file(str(root / "a.png"), [root]) == b"x"
    for escaping in [str(root / ".." / "secret.png"), str(outside), str(root / "link.png"), "/etc/passwd"]:
        with pytest.raises(ImageError, match="outside the allowed roots"):
            confine(escaping, [root])
    with pytest.raises(ImageError, match="TILEREC_ALLOWED_ROOTS"):
        confine(str(root / "a.png"), [])
    with pytest.raises(ImageError, match="does not exist"):
        read_file(str(root / "missing.png"), [root])
    with pytest.raises(ImageError, match="directory"):
        read_file(str(root), [root])
