"""Images decoded top to bottom through libvips (`readers.vips`): the very pixels written, in every layout, tiles as
soon as their rows are in, and clear errors, checked from the header, before anything is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.inference import windows_of
from pipeline.options import parse_options
from pipeline.readers.images import ImageError
from pipeline.readers.opencv import DeferredSource
from pipeline.readers.sources import decode, open_source
from pipeline.readers.vips import BAND_ROWS, VipsSource
from pipeline.tiling import Window, grid


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


def expected(image: np.ndarray) -> np.ndarray:
    """What a reader gives for pixels written losslessly: 8-bit (16-bit keeps its high byte), alpha dropped."""
    eight = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
    return eight[:, :, :3] if eight.ndim == 3 else eight


def encoded(image: np.ndarray, suffix: str, *flags: int) -> bytes:
    ok, data = cv2.imencode(suffix, image, list(flags))
    assert ok
    return data.tobytes()


LOSSLESS = {".png": (), ".webp": (cv2.IMWRITE_WEBP_QUALITY, 101)}  # WebP above 100: lossless


WRITTEN = [(".png", name) for name in LAYOUTS] + [(".webp", "BGR 8-bit"), (".webp", "BGRA 8-bit")]  # WebP: 8-bit colour


@pytest.mark.parametrize(("suffix", "name"), WRITTEN)
def test_windows_in_row_order_are_the_very_pixels_written(suffix, name):
    """PNG decoded band by band by libvips; WebP decoded whole by OpenCV (faster, and libvips decodes it whole) at
    its first window, so a tiling task can publish the job's batches before it decodes."""
    channels, dtype = LAYOUTS[name]
    image = picture(700, 157, channels, dtype)  # more than two bands of BAND_ROWS
    data = encoded(image, suffix, *LOSSLESS[suffix])
    want = expected(image)
    if suffix == ".webp" and channels == 4:  # libwebp keeps no colour under alpha 0: as OpenCV decodes it
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[:, :, :3]
        np.testing.assert_array_equal(want[image[:, :, 3] > 0], image[:, :, :3][image[:, :, 3] > 0])
    source = open_source(data, in_row_order=True)
    assert isinstance(source, VipsSource if suffix == ".png" else DeferredSource)
    assert (source.width, source.height) == (157, 700)
    for window in grid(700, 157, tile=64, overlap=0.25):
        np.testing.assert_array_equal(source.read(window), want[window.y : window.y2, window.x : window.x2])
    np.testing.assert_array_equal(decode(data), want)


GREY_CASES = [(".png", name) for name in LAYOUTS] + [(".jpg", "BGR 8-bit")]


@pytest.mark.parametrize(("suffix", "name"), GREY_CASES)
def test_grey_windows_are_the_colour_windows_converted(suffix, name):
    """Opened `grey` (a grey-only recognizer's tiles), bands are converted once, RGB to grey: the very pixels of
    each window converted from BGR, as a tile task converts a window read in colour."""
    channels, dtype = LAYOUTS[name]
    image = picture(600, 157, channels, dtype)
    data = encoded(image, suffix, *LOSSLESS.get(suffix, ()))
    colour, grey = open_source(data, in_row_order=True), open_source(data, in_row_order=True, grey=True)
    assert grey.channels == 1
    for window in grid(600, 157, tile=96, overlap=0.25):
        want = colour.read(window)
        want = want if want.ndim == 2 else cv2.cvtColor(want, cv2.COLOR_BGR2GRAY)
        np.testing.assert_array_equal(grey.read(window), want)


@pytest.mark.parametrize("name", ["CMYK JPEG", "grey and alpha PNG", "palette PNG with transparency"])
def test_converted_layouts_read_grey_as_their_colour_converted(name):
    data = layouts_opencv_converts()[name]
    colour = decode(data)
    want = colour if colour.ndim == 2 else cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(open_source(data, in_row_order=True, grey=True).read(Window(0, 0, 0, 70, 90)), want)


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
def test_every_png_row_filter_is_undone_across_band_borders(name):
    """An encoder picks each row's filter by what compresses best; these rows take each filter in turn, and the
    image is taller than a band, so bands start with every kind of row."""
    channels, dtype = LAYOUTS[name]
    height = BAND_ROWS * 2 + 9
    image = picture(height, 33, channels, dtype)
    samples = image if channels == 1 else image[:, :, [2, 1, 0, 3][:channels]]  # BGR(A) to RGB(A)
    raw = np.ascontiguousarray(samples, ">u2" if dtype == np.uint16 else np.uint8).view(np.uint8).reshape(height, -1)
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", 33, height, 8 * np.dtype(dtype).itemsize, colour_type, 0, 0, 0)
    idat = zlib.compress(filtered_rows(raw, raw.shape[1] // 33))
    data = assemble([(b"IHDR", header), (b"IDAT", idat), (b"IEND", b"")])
    source = open_source(data, in_row_order=True)
    rows = [source.read(Window(0, 0, top, 33, min(50, height - top))) for top in range(0, height, 50)]
    np.testing.assert_array_equal(np.concatenate(rows), expected(image))


def pillow(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def layouts_opencv_converts() -> dict[str, bytes]:
    """Files whose pixels OpenCV converts on decoding: what it gives is what tilerec's readers gave before."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to show; OpenCV, reading unchanged, does not, and neither does tilerec
    return {
        "CMYK JPEG": pillow(Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8), "CMYK"), "JPEG"),
        "grey and alpha PNG": pillow(Image.fromarray(rgb[:, :, :2].copy(), "LA"), "PNG"),
        "palette PNG": pillow(Image.fromarray(rgb).convert("P"), "PNG"),
        "palette PNG with transparency": pillow(Image.fromarray(rgb).convert("P"), "PNG", transparency=3),
        "grey JPEG": pillow(Image.fromarray(rgb[:, :, 0].copy()), "JPEG"),
        "JPEG with EXIF orientation": pillow(Image.fromarray(rgb), "JPEG", exif=exif),
        "progressive JPEG": pillow(Image.fromarray(rgb), "JPEG", progressive=True),
    }


@pytest.mark.parametrize("name", list(layouts_opencv_converts()))
def test_converted_layouts_read_as_opencv_decodes_them(name):
    data = layouts_opencv_converts()[name]
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    reference = reference[:, :, :3] if reference.ndim == 3 else reference  # alpha dropped, as before
    np.testing.assert_array_equal(decode(data), reference)
    assert decode(data).shape[:2] == (90, 70)  # EXIF orientation ignored


def test_jpeg_windows_are_what_libjpeg_decodes():
    image = picture(600, 300, 3)
    data = encoded(image, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    source = open_source(data, in_row_order=True)
    for window in grid(600, 300, tile=128, overlap=0.2):
        np.testing.assert_array_equal(source.read(window), reference[window.y : window.y2, window.x : window.x2])


def test_tiles_come_as_soon_as_their_rows_are_decoded():
    image = picture(1000, 700, 3)
    source = open_source(png(image), in_row_order=True)
    for window in grid(1000, 700, tile=256, overlap=0.25):
        np.testing.assert_array_equal(source.read(window), image[window.y : window.y2, window.x : window.x2])
        assert source._reached < window.y2 + BAND_ROWS  # no band decoded before a tile needed it
        assert all(top + len(band) > window.y for top, band in source._held)  # none kept above the tile


def test_a_window_above_the_bands_held_decodes_again_from_the_top():
    image = picture(900, 200, 1)
    source = open_source(png(image), in_row_order=True)
    last, first = Window(1, 0, 800, 200, 100), Window(0, 0, 0, 200, 100)
    np.testing.assert_array_equal(source.read(last), image[800:900])
    np.testing.assert_array_equal(source.read(first), image[0:100])


def test_tiles_of_a_region_of_interest_are_cut_where_they_lie():
    image = picture(600, 500, 1)
    options = parse_options("qrcode", {"tile": 128, "overlap": 0.1, "roi": [70, 210, 300, 250]})
    source = open_source(png(image), in_row_order=True)
    for window in windows_of(600, 500, options):
        np.testing.assert_array_equal(source.read(window), image[window.y : window.y2, window.x : window.x2])


def test_a_window_outside_the_image_is_an_error():
    source = open_source(png(picture(300, 100, 1)), in_row_order=True)
    with pytest.raises(ImageError, match="not inside the 100x300 image"):
        source.read(Window(0, 0, 250, 100, 100))


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


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("checksum", "IDAT: incorrect data check"),
        ("zlib", "IDAT: unknown compression method"),
        ("rows", "bad adaptive filter value"),
        ("short", "Not enough image data"),
    ],
)
def test_damaged_pixel_data_is_a_clear_image_error(kind, message):
    source = open_source(damaged(kind), in_row_order=True)  # the header is sound: the damage shows when decoding
    with pytest.raises(ImageError, match=f"the image is damaged or cut short: {message}"):
        for window in grid(300, 200, tile=64, overlap=0.0):
            source.read(window)


def test_libpng_in_libvips_ignores_chunk_crcs_but_zlib_catches_damaged_pixel_data():
    """libvips sets libpng to ignore CRC errors: a wrong chunk CRC over sound data reads as the very pixels, while
    any byte of the pixel data changed (its chunk's CRC made to match, so only zlib can tell) fails the read, near
    the stream's start or in its Adler-32 at its very end, after every band was handed out."""
    image = picture(300, 200, 3)
    data = png(image)
    idat = data.index(b"IDAT")
    crc = idat + 4 + struct.unpack(">I", data[idat - 4 : idat])[0]  # after the chunk's type and data
    np.testing.assert_array_equal(decode(data[:crc] + bytes([data[crc] ^ 0xFF]) + data[crc + 1 :]), image)
    parts = chunks(data)
    pixels = b"".join(body for name, body in parts if name == b"IDAT")
    for position in (len(pixels) // 2, len(pixels) - 10, len(pixels) - 2):
        broken = pixels[:position] + bytes([pixels[position] ^ 0x01]) + pixels[position + 1 :]
        source = open_source(assemble([parts[0], (b"IDAT", broken), (b"IEND", b"")]), in_row_order=True)
        with pytest.raises(ImageError, match="IDAT: incorrect data check"):
            for window in grid(300, 200, tile=64, overlap=0.0):
                source.read(window)


def test_an_image_read_in_row_order_is_size_checked_and_truncation_checked_first():
    data = png(picture(300, 200, 3))
    with pytest.raises(ImageError, match="60,000 pixels"):
        open_source(data, max_pixels=200 * 300 - 1, in_row_order=True)
    with pytest.raises(ImageError, match="truncated \\(no IEND chunk"):
        open_source(data[:-40], in_row_order=True)
    jpeg = encoded(picture(300, 200, 3), ".jpg")
    with pytest.raises(ImageError, match="JPEG file is truncated"):
        open_source(jpeg[: len(jpeg) // 2], in_row_order=True)
