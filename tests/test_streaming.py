"""Decoding a PNG band by band: the same pixels as a whole decode, tiles as soon as their rows are in, clear errors."""

from __future__ import annotations

import struct
import threading
import zlib

import cv2
import numpy as np
import pytest

from pipeline.images import ImageError, decode
from pipeline.inference import windows_of
from pipeline.options import parse_options
from pipeline.sources import open_source
from pipeline.streaming import HEAD_BYTES, _one_ahead, decode_png, decode_png_bands, streamable_png, tiles_from_bands
from pipeline.tiling import grid


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    found, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        found.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return found


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in parts)


def picture(height: int, width: int, channels: int, dtype: type = np.uint8) -> np.ndarray:
    """Gradients plus noise, so the encoder picks every filter type (Sub, Up, Average, Paeth) somewhere."""
    rng = np.random.default_rng(height * width + channels)
    top = np.iinfo(dtype).max
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = (xs * 7 + ys * 3) % (top + 1)
    shape = (height, width) if channels == 1 else (height, width, channels)
    noise = rng.integers(0, top // 8, size=shape)
    base = smooth if channels == 1 else smooth[..., None]
    image = ((base + noise) % (top + 1)).astype(dtype)
    image[height // 3 : height // 2] = rng.integers(0, top, size=image[height // 3 : height // 2].shape, dtype=dtype)
    return image


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


LAYOUTS = {
    "grey 8-bit": (1, np.uint8),
    "grey 16-bit": (1, np.uint16),
    "BGR 8-bit": (3, np.uint8),
    "BGR 16-bit": (3, np.uint16),
    "BGRA 8-bit": (4, np.uint8),
    "BGRA 16-bit": (4, np.uint16),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_bands_join_into_the_whole_decode(name, rows, threads):
    channels, dtype = LAYOUTS[name]
    image = picture(203, 157, channels, dtype)
    data = png(image)
    layout = streamable_png(data[:HEAD_BYTES])
    assert layout is not None and (layout.width, layout.height) == (157, 203)
    bands = list(decode_png_bands(data, layout, rows, threads))
    assert [len(band) for band in bands[:-1]] == [rows] * (len(bands) - 1)
    joined = np.concatenate(bands)
    np.testing.assert_array_equal(joined, decode(data))
    if dtype == np.uint8 and channels in (1, 3):  # lossless: the very pixels written
        np.testing.assert_array_equal(joined, image)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("threads", [1, 2])
def test_a_whole_png_decoded_band_by_band_equals_opencvs_decode(name, threads):
    channels, dtype = LAYOUTS[name]
    data = png(picture(600, 130, channels, dtype))  # more than two bands of BAND_ROWS
    whole = decode_png(data, streamable_png(data), threads)
    np.testing.assert_array_equal(whole, decode(data))
    np.testing.assert_array_equal(open_source(data, threads=threads).pixels, decode(data))


def test_the_next_band_is_inflated_in_a_helper_thread_while_this_one_is_used():
    made, asked = [], threading.Event()

    def bands():
        for top in range(3):
            made.append((top, threading.current_thread().name))
            if top == 1:
                asked.set()
            yield top, 1, [b""]

    ahead = _one_ahead(bands())
    assert next(ahead)[0] == 0
    assert asked.wait(5), "band 1 was not inflated while band 0 was in use"
    assert [top for top, _ in made] == [0, 1]
    assert all(name.startswith("tilerec-inflate") for _, name in made)
    assert [top for top, _, _ in ahead] == [1, 2]


def test_a_decoding_stopped_early_leaves_no_helper_thread():
    data = png(picture(600, 130, 3))
    bands = decode_png_bands(data, streamable_png(data), 64, threads=2)
    next(bands)
    bands.close()
    assert [t.name for t in threading.enumerate() if t.name.startswith("tilerec-inflate")] == []


def filtered_rows(raw: np.ndarray, bpp: int) -> bytes:
    """PNG rows of `raw` (rows of bytes) with filters None, Sub, Up, Average and Paeth in turn."""
    raw = raw.astype(np.int32)
    out = []
    for y, line in enumerate(raw):
        kind = y % 5
        above = raw[y - 1] if y else np.zeros_like(line)
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), above[:-bpp]])
        p = left + above - upper_left
        pa, pb, pc = abs(p - left), abs(p - above), abs(p - upper_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        predicted = [0, left, above, (left + above) // 2, paeth][kind]
        out.append(bytes([kind]) + ((line - predicted) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_row_filter_is_undone_across_band_borders(name):
    """An encoder picks each row's filter by what compresses best; these rows take each filter in turn, so bands
    start with every kind of row, and one starting with an Up, Average or Paeth row needs the row above it."""
    channels, dtype = LAYOUTS[name]
    image = picture(40, 33, channels, dtype)
    samples = image if channels == 1 else image[:, :, [2, 1, 0, 3][:channels]]  # BGR(A) to RGB(A)
    raw = np.ascontiguousarray(samples, ">u2" if dtype == np.uint16 else np.uint8).view(np.uint8).reshape(40, -1)
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", 33, 40, 8 * np.dtype(dtype).itemsize, colour_type, 0, 0, 0)
    idat = zlib.compress(filtered_rows(raw, raw.shape[1] // 33))
    data = assemble([(b"IHDR", header), (b"IDAT", idat), (b"IEND", b"")])
    whole = decode(data)
    if dtype == np.uint8 and channels in (1, 3):
        np.testing.assert_array_equal(whole, image)
    for band_rows in (1, 3, 4, 6):
        bands = decode_png_bands(data, streamable_png(data), band_rows)
        np.testing.assert_array_equal(np.concatenate(list(bands)), whole)


def variant(
    depth: int = 8, colour_type: int = 2, interlace: int = 0, extra: tuple[bytes, bytes] | None = None
) -> bytes:
    """A PNG whose header says `depth`, `colour_type` and `interlace`, with an `extra` chunk before its pixels."""
    parts = chunks(png(picture(20, 30, 3)))
    header = struct.pack(">IIBBBBB", 30, 20, depth, colour_type, 0, 0, interlace)
    return assemble([(b"IHDR", header), *([extra] if extra else []), *parts[1:]])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(variant(colour_type=3, extra=(b"PLTE", bytes(range(48)))), id="palette"),
        pytest.param(variant(colour_type=4), id="grey and alpha"),
        pytest.param(variant(depth=1, colour_type=0), id="1-bit"),
        pytest.param(variant(interlace=1), id="interlaced"),
        pytest.param(variant(extra=(b"tRNS", bytes(6))), id="transparency chunk"),
        pytest.param(variant(extra=(b"eXIf", b"MM\x00*")), id="EXIF orientation"),
        pytest.param(b"\xff\xd8\xff\xe0" + bytes(100), id="JPEG"),
    ],
)
def test_layouts_whose_conversion_cannot_be_undone_are_decoded_whole(data):
    assert streamable_png(data[:HEAD_BYTES]) is None


def test_chunks_opencv_ignores_do_not_stop_streaming():
    with_gamma = variant(extra=(b"gAMA", struct.pack(">I", 10000)))
    layout = streamable_png(with_gamma)
    assert layout is not None
    np.testing.assert_array_equal(np.concatenate(list(decode_png_bands(with_gamma, layout, 5))), picture(20, 30, 3))


def damaged(kind: str) -> bytes:
    data = png(picture(300, 200, 3))
    parts = chunks(data)
    pixels = b"".join(body for name, body in parts if name == b"IDAT")
    if kind == "checksum":
        start = data.index(b"IDAT") + 4 + len(pixels) // 2
        return data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1 :]
    if kind in ("zlib", "rows"):  # the CRCs match; the stream does not inflate, or inflates to rows of garbage
        broken = b"\x00\x00" + pixels[2:] if kind == "zlib" else pixels[:100] + bytes(255 - b for b in pixels[100:400])
        return assemble([parts[0], (b"IDAT", broken + pixels[len(broken) :]), (b"IEND", b"")])
    return assemble([parts[0], (b"IDAT", pixels[: len(pixels) // 2]), (b"IEND", b"")])  # rows missing


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("checksum", "fails its checksum"),
        ("zlib", "pixel data is damaged"),
        ("rows", "rows 0 to 64 cannot be decoded"),
        ("short", "pixel data ends at row"),
    ],
)
def test_damaged_pixel_data_is_a_clear_image_error(kind, message, threads):
    data = damaged(kind)
    with pytest.raises(ImageError, match=message):
        list(decode_png_bands(data, streamable_png(data), 64, threads))


def test_a_png_decoded_on_two_threads_is_size_checked_and_truncation_checked_first():
    data = png(picture(300, 200, 3))
    with pytest.raises(ImageError, match="60,000 pixels"):
        open_source(data, max_pixels=200 * 300 - 1, threads=2)
    with pytest.raises(ImageError, match="truncated \\(no IEND chunk"):
        open_source(data[:-40], threads=2)


def test_tiles_come_as_soon_as_their_rows_are_decoded():
    image = picture(1000, 700, 3)
    windows = grid(1000, 700, tile=256, overlap=0.25)
    pulled = []

    def bands():
        for top in range(0, 1000, 100):
            pulled.append(top)
            yield image[top : top + 100]

    for window, tile in tiles_from_bands(bands(), windows):
        np.testing.assert_array_equal(tile, image[window.y : window.y2, window.x : window.x2])
        assert len(pulled) == -(-window.y2 // 100)  # no band read before a tile needed it
    assert len(pulled) == 10


def test_tiles_of_a_region_of_interest_are_cut_where_they_lie():
    image = picture(600, 500, 1)
    options = parse_options("qrcode", {"tile": 128, "overlap": 0.1, "roi": [70, 210, 300, 250]})
    windows = windows_of(600, 500, options)
    bands = (image[top : top + 50] for top in range(0, 600, 50))
    cut = list(tiles_from_bands(bands, windows))
    assert [window for window, _ in cut] == windows
    for window, tile in cut:
        np.testing.assert_array_equal(tile, image[window.y : window.y2, window.x : window.x2])


def test_an_image_shorter_than_its_windows_is_an_error():
    windows = grid(300, 100, tile=100, overlap=0.0)
    with pytest.raises(ImageError, match="ends above row 300"):
        list(tiles_from_bands(iter([np.zeros((250, 100), np.uint8)]), windows))
