"""Decoding a PNG band by band (runs of rows), so tiles can be cut, stored and recognized while the rest decodes.

A PNG's pixels are one zlib stream of filtered rows, so its decoding is serial: at 8000² it takes longer than a
cheap recognizer's whole job on two cores. Read band by band, the first tiles are ready after a fraction of it.

Each band is inflated here (zlib-ng) and handed to OpenCV as a small PNG of its own, stored uncompressed, so OpenCV
undoes the row filters and converts the pixels exactly as it does for the whole file. A filter may refer to the
row above, so each band's PNG starts with the previous band's last row, raw and unfiltered; that row is rebuilt
from OpenCV's output, which is why only layouts whose conversion can be undone are streamed (8- or 16-bit grey,
RGB and RGBA, not interlaced, no tRNS or eXIf chunk). Everything else goes through `images.decode`, whole.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from zlib_ng import zlib_ng as zlib  # zlib's API, with a faster inflate and checksums (docs/performance.md)

from pipeline.images import ImageError, normalize
from pipeline.tiling import Window

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 64 * 1024  # enough for a PNG's header chunks up to its first IDAT, barring huge text chunks
BAND_ROWS = 256
_CHANNELS = {0: 1, 2: 3, 6: 4}  # colour types streamed: grey, RGB, RGBA
# ancillary chunks OpenCV would act on: tRNS adds an alpha channel, eXIf may turn the image
_REFUSED = {b"tRNS", b"eXIf"}
_INFLATE_STEP = 1 << 20  # compressed bytes inflated per call


@dataclass(frozen=True)
class PngLayout:
    width: int
    height: int
    depth: int
    colour_type: int

    @property
    def channels(self) -> int:
        """Channels once decoded and normalized (images.normalize): 1 for grey, 3 for colour."""
        return 1 if self.colour_type == 0 else 3

    @property
    def row_bytes(self) -> int:
        """A filtered row: its filter byte, then its samples."""
        return 1 + self.width * _CHANNELS[self.colour_type] * self.depth // 8


def streamable_png(head: bytes) -> PngLayout | None:
    """The layout of a PNG whose first bytes are `head`, if it can be decoded band by band; None otherwise."""
    if not head.startswith(PNG_SIGNATURE):
        return None
    layout = None
    for kind, body, _ in _chunks(head):
        if kind == b"IHDR" and len(body) == 13:
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth not in (8, 16) or colour_type not in _CHANNELS or interlace or not width or not height:
                return None
            layout = PngLayout(width, height, depth, colour_type)
        elif kind == b"IDAT":
            return layout
        elif kind in _REFUSED or layout is None:
            return None
    return None  # no pixel data within the head


def _chunks(data: bytes | memoryview, whole: bool = False) -> Iterator[tuple[bytes, memoryview, memoryview]]:
    """(type, body, stored CRC) of each chunk in `data`, from just after the signature, until IEND. A chunk cut off
    by the end of `data` ends the walk, or, with `whole` (`data` is the whole file), is an ImageError."""
    view = memoryview(data)
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(view):
        length, kind = struct.unpack(">I4s", view[position : position + 8])
        end = position + 8 + length
        if end + 4 > len(view):
            if whole:
                raise ImageError("the PNG file ends inside a chunk: it is truncated or damaged")
            return
        yield kind, view[position + 8 : end], view[end : end + 4]
        if kind == b"IEND":
            return
        position = end + 4


def _idat_bodies(data: bytes) -> Iterator[memoryview]:
    """The compressed pixel data in pieces of at most _INFLATE_STEP bytes, each chunk checked against its CRC as
    OpenCV would."""
    for kind, body, stored_crc in _chunks(data, whole=True):
        if kind != b"IDAT":
            continue
        if zlib.crc32(body, zlib.crc32(kind)) != struct.unpack(">I", stored_crc)[0]:
            raise ImageError("the PNG is damaged: a chunk of its pixel data fails its checksum (CRC)")
        for start in range(0, len(body), _INFLATE_STEP):
            yield body[start : start + _INFLATE_STEP]


def _chunk(kind: bytes, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    crc = zlib.crc32(kind)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [struct.pack(">I", sum(len(part) for part in parts)) + kind, *parts, struct.pack(">I", crc)]


def _stored_zlib(raw: bytes) -> list[bytes | memoryview]:
    """`raw` as a zlib stream of stored (uncompressed) blocks: OpenCV inflates it at the cost of a copy."""
    view, out = memoryview(raw), [b"\x78\x01"]
    for start in range(0, max(len(raw), 1), 0xFFFF):
        block = view[start : start + 0xFFFF]
        final = start + 0xFFFF >= len(raw)
        out += [struct.pack("<BHH", final, len(block), 0xFFFF ^ len(block)), block]
    out.append(struct.pack(">I", zlib.adler32(raw)))
    return out


def _band_png(layout: PngLayout, rows: int, raw: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", layout.width, rows, layout.depth, layout.colour_type, 0, 0, 0)
    parts = [PNG_SIGNATURE, *_chunk(b"IHDR", header), *_chunk(b"IDAT", *_stored_zlib(raw)), *_chunk(b"IEND")]
    return b"".join(parts)


def _raw_row(decoded: np.ndarray, layout: PngLayout) -> bytes:
    """A row as the PNG holds it before filtering, rebuilt from OpenCV's output (BGR order, native byte order)."""
    if layout.colour_type == 2:
        decoded = decoded[:, ::-1]
    elif layout.colour_type == 6:
        decoded = decoded[:, [2, 1, 0, 3]]
    return decoded.astype(">u2" if layout.depth == 16 else np.uint8).tobytes()


def _inflated_bands(data: bytes, layout: PngLayout, rows: int) -> Iterator[tuple[int, int, list[bytes]]]:
    """(top row, rows, their filtered bytes in pieces) of each band, inflated from the file's pixel data."""
    inflater = zlib.decompressobj()
    compressed = _idat_bodies(data)
    pending: bytes | memoryview = b""
    top = 0
    while top < layout.height:
        count = min(rows, layout.height - top)
        wanted, pieces, have = count * layout.row_bytes, [], 0
        while have < wanted:
            if not pending:
                pending = next(compressed, b"")
                if not pending:
                    raise ImageError(f"the PNG's pixel data ends at row {top + have // layout.row_bytes}: damaged")
            try:
                piece = inflater.decompress(pending, wanted - have)
            except zlib.error as error:
                raise ImageError(f"the PNG's pixel data is damaged near row {top}: {error}") from None
            pending = inflater.unconsumed_tail
            pieces.append(piece)
            have += len(piece)
        yield top, count, pieces
        top += count


def _one_ahead(items: Iterator[tuple[int, int, list[bytes]]]) -> Iterator[tuple[int, int, list[bytes]]]:
    """`items`, each made in a helper thread while the caller works on the one before (zlib and OpenCV release the
    GIL, so inflating and unfiltering run on two cores). Closing early waits for the one in flight, no longer."""
    with ThreadPoolExecutor(1, thread_name_prefix="tilerec-inflate") as helper:
        upcoming = helper.submit(next, items, None)
        while (item := upcoming.result()) is not None:
            upcoming = helper.submit(next, items, None)
            yield item


def decode_png_bands(data: bytes, layout: PngLayout, rows: int = BAND_ROWS, threads: int = 1) -> Iterator[np.ndarray]:
    """The image's rows, top to bottom, `rows` at a time (the last band may be shorter), normalized as
    `images.decode` normalizes the whole image: their concatenation equals `images.decode(data)`.

    With `threads` ≥ 2 the next band is inflated in a helper thread while OpenCV unfilters this one: a shorter
    decoding for one more busy core."""
    raw_bands = _inflated_bands(data, layout, rows)
    carry = b""  # the previous band's last row, unfiltered: filter type 0, then its samples
    for top, count, pieces in _one_ahead(raw_bands) if threads > 1 else raw_bands:
        band_rows = count + (1 if carry else 0)
        decoded = cv2.imdecode(np.frombuffer(_band_png(layout, band_rows, b"".join([carry, *pieces])), np.uint8), -1)
        if decoded is None or decoded.shape[0] != band_rows:
            raise ImageError(f"the PNG's rows {top} to {top + count} cannot be decoded: the file is damaged")
        if carry:
            decoded = decoded[1:]
        carry = b"\x00" + _raw_row(decoded[-1], layout)
        yield normalize(decoded)


def decode_png(data: bytes, layout: PngLayout, threads: int = 1) -> np.ndarray:
    """The whole image, as `images.decode(data)` gives it, decoded band by band (with `threads` ≥ 2, on two
    cores) into one array."""
    image, top = None, 0
    for band in decode_png_bands(data, layout, threads=threads):
        if image is None:
            image = np.empty((layout.height, *band.shape[1:]), band.dtype)
        image[top : top + len(band)] = band
        top += len(band)
    assert image is not None  # a streamable layout has at least one row
    return image


def tiles_from_bands(bands: Iterator[np.ndarray], windows: list[Window]) -> Iterator[tuple[Window, np.ndarray]]:
    """Each window's pixels, contiguous (as the tile store sends them), as soon as the bands have reached its bottom
    row, holding only the bands still needed. Each tile is copied straight from the bands it spans: joining the
    bands first would copy every row once more.

    `windows` must be in row order, as `tiling.grid` makes them: each one's top and bottom at or below the one
    before's."""
    held: list[tuple[int, np.ndarray]] = []  # (first row, band), top to bottom, contiguous rows
    reached = 0
    for position, window in enumerate(windows):
        while reached < window.y2:
            band = next(bands, None)
            if band is None:
                raise ImageError(f"the image ends above row {window.y2}, the bottom of tile {window.index}")
            held.append((reached, band))
            reached += len(band)
        yield window, _cut(held, window)
        if position + 1 < len(windows):
            following = windows[position + 1].y
            held = [(top, band) for top, band in held if top + len(band) > following]


def _cut(held: list[tuple[int, np.ndarray]], window: Window) -> np.ndarray:
    """The window's pixels from the bands that hold its rows, in one copy."""
    first = held[0][1]
    tile = np.empty((window.y2 - window.y, window.x2 - window.x, *first.shape[2:]), first.dtype)
    for top, band in held:
        y, y2 = max(window.y, top), min(window.y2, top + len(band))
        if y < y2:
            tile[y - window.y : y2 - window.y] = band[y - top : y2 - top, window.x : window.x2]
    return tile
