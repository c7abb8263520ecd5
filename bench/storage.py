"""What storing a tile costs: encode + SET and GET + decode through a real redis-server, per codec; and how fast
the input image itself decodes in other formats (the serial part of every job).

tilerec stores raw pixels today (tasks/store.py). The alternatives measured are the lossless ones a worker could
use without new dependencies (PNG at two levels, BMP/PPM, zlib at level 1) plus lz4 when it is installed; JPEG is
listed for scale only: it is lossy, so it would change detections.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes, tuple[int, ...]], np.ndarray]]


def _cv2_codec(extension: str, params: list[int] | None = None) -> Codec:
    def encode(tile: np.ndarray) -> bytes:
        ok, buffer = cv2.imencode(extension, tile, params or [])
        if not ok:
            raise ValueError(f"cv2 cannot encode {extension}")
        return buffer.tobytes()

    def decode(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

    return encode, decode


def _raw() -> Codec:
    return (
        lambda tile: np.ascontiguousarray(tile).tobytes(),
        lambda data, shape: np.frombuffer(data, np.uint8).reshape(shape),
    )


def _zlib(level: int) -> Codec:
    return (
        lambda tile: zlib.compress(np.ascontiguousarray(tile).tobytes(), level),
        lambda data, shape: np.frombuffer(zlib.decompress(data), np.uint8).reshape(shape),
    )


def codecs() -> dict[str, tuple[Codec, bool]]:
    """name → (codec, lossless)."""
    found: dict[str, tuple[Codec, bool]] = {
        "raw (today)": (_raw(), True),
        "zlib level 1": (_zlib(1), True),
        "PNG level 1": (_cv2_codec(".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]), True),
        "PNG level 3 (OpenCV default)": (_cv2_codec(".png"), True),
        "BMP": (_cv2_codec(".bmp"), True),
        "PPM/PGM": (_cv2_codec(".ppm"), True),
        "JPEG q95 (lossy)": (_cv2_codec(".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), False),
    }
    if importlib.util.find_spec("lz4") is not None:
        import lz4.frame  # type: ignore[import-not-found]

        found["lz4"] = (
            (
                lambda tile: lz4.frame.compress(np.ascontiguousarray(tile).tobytes()),
                lambda data, shape: np.frombuffer(lz4.frame.decompress(data), np.uint8).reshape(shape),
            ),
            True,
        )
    return found


def _median_ms(action: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def tile_codecs(client: redis.Redis, tiles: list[np.ndarray], repeat: int = 5) -> list[dict[str, Any]]:
    """Per codec: bytes per tile, encode+SET and GET+decode in ms per tile (median over `repeat` rounds)."""
    rows = []
    for name, ((encode, decode), lossless) in codecs().items():
        shape = tiles[0].shape
        payloads = [encode(tile) for tile in tiles]
        keys = [f"bench:codec:{k}" for k in range(len(tiles))]

        def put(payloads: list[bytes] = payloads, keys: list[str] = keys, encode: Any = encode) -> None:
            with client.pipeline(transaction=False) as pipe:
                for key, tile in zip(keys, tiles, strict=True):
                    pipe.set(key, encode(tile))
                pipe.execute()

        def get(keys: list[str] = keys, decode: Any = decode, shape: tuple[int, ...] = shape) -> None:
            for key in keys:
                decode(client.get(key), shape)

        def decode_all(decode: Any = decode, shape: tuple[int, ...] = shape, payloads: list[bytes] = payloads) -> None:
            for payload in payloads:
                decode(payload, shape)

        encode_ms = _median_ms(lambda encode=encode: [encode(t) for t in tiles], repeat) / len(tiles)
        decode_ms = _median_ms(decode_all, repeat) / len(tiles)
        put_ms = _median_ms(put, repeat) / len(tiles)
        get_ms = _median_ms(get, repeat) / len(tiles)
        exact = all(np.array_equal(decode(p, shape).reshape(shape), t) for p, t in zip(payloads, tiles, strict=True))
        client.delete(*keys)
        rows.append(
            {
                "codec": name,
                "lossless": lossless and exact,
                "bytes": statistics.mean(len(p) for p in payloads),
                "ratio": statistics.mean(len(p) for p in payloads) / tiles[0].nbytes,
                "encode_ms": encode_ms,
                "decode_ms": decode_ms,
                "put_ms": put_ms,
                "get_ms": get_ms,
            }
        )
    return rows


def _put_get_ms(client: redis.Redis, tiles: list[np.ndarray], repeat: int) -> tuple[float, float]:
    """Raw bytes: SET (pipelined, as put_tiles does) and GET (one by one, as get_tile does), ms per tile."""
    keys = [f"bench:transport:{k}" for k in range(len(tiles))]

    def put() -> None:
        with client.pipeline(transaction=False) as pipe:
            for key, tile in zip(keys, tiles, strict=True):
                pipe.set(key, np.ascontiguousarray(tile).tobytes())
            pipe.execute()

    def get() -> None:
        for key, tile in zip(keys, tiles, strict=True):
            np.frombuffer(client.get(key), np.uint8).reshape(tile.shape)

    put_ms, get_ms = _median_ms(put, repeat) / len(tiles), _median_ms(get, repeat) / len(tiles)
    client.delete(*keys)
    return put_ms, get_ms


@contextmanager
def unix_socket_redis(folder: Path) -> Iterator[redis.Redis]:
    """A throw-away redis-server listening on a unix socket only (no TCP), stopped on exit."""
    from tasks.local import find_redis_server

    socket_path = folder / "bench-redis.sock"
    process = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        client = redis.Redis(unix_socket_path=str(socket_path))
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        socket_path.unlink(missing_ok=True)


def transports(tcp: redis.Redis, tiles: list[np.ndarray], folder: Path, repeat: int = 5) -> list[dict[str, Any]]:
    """Raw tiles over TCP loopback (today) and a unix socket, in BGR (today) and grey (what QR, ArUco and barcode
    recognizers convert every tile to first): the per-tile floor of moving pixels through Redis."""
    grey = [cv2.cvtColor(t, cv2.COLOR_BGR2GRAY) if t.ndim == 3 else t for t in tiles]
    rows = []
    with tempfile.TemporaryDirectory(dir=folder) as scratch, unix_socket_redis(Path(scratch)) as unix:
        for transport, client in (("TCP loopback", tcp), ("unix socket", unix)):
            for pixels, sample in (("BGR", tiles), ("grey", grey)):
                put_ms, get_ms = _put_get_ms(client, sample, repeat)
                rows.append({"transport": transport, "pixels": pixels, "bytes": sample[0].nbytes,
                             "put_ms": put_ms, "get_ms": get_ms})  # fmt: skip
    return rows


def input_formats(image: np.ndarray, repeat: int = 1) -> list[dict[str, Any]]:
    """How long decoding the whole input takes per file format: the serial part of a job besides storing tiles."""
    from pipeline.readers.images import encode_array
    from pipeline.readers.sources import decode

    formats: dict[str, bytes] = {
        "PNG (as written by cv2.imwrite)": cv2.imencode(".png", image)[1].tobytes(),
        "PNG level 1": cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes(),
        "JPEG q95 (lossy)": cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "BMP": cv2.imencode(".bmp", image)[1].tobytes(),
        ".npy (tasks.client.put_image of an array)": encode_array(image),
    }
    rows = []
    for name, data in formats.items():
        seconds = _median_ms(lambda data=data: decode(data), repeat) / 1000
        rows.append({"format": name, "bytes": len(data), "decode_s": seconds})
    return rows


def store_and_cleanup(client: redis.Redis, image: np.ndarray, tile: int, overlap: float) -> dict[str, Any]:
    """tasks.store.put_tiles and delete_job on a whole image, as the tiling and merge tasks call them."""
    from pipeline.inference import crop
    from pipeline.tiling import grid
    from tasks import store

    windows = grid(image.shape[0], image.shape[1], tile, overlap)
    began = time.perf_counter()
    store.put_tiles(client, "bench-store", ((window, crop(image, window)) for window in windows), 600)
    put_s = time.perf_counter() - began
    stored = sum(window.width * window.height for window in windows) * (1 if image.ndim == 2 else image.shape[2])
    window = windows[len(windows) // 2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    get_ms = _median_ms(lambda: store.get_tiles(client, "bench-store", [window], channels), 20)
    began = time.perf_counter()
    store.delete_job(client, "bench-store", len(windows))
    delete_s = time.perf_counter() - began
    return {
        "tiles": len(windows),
        "bytes_stored": stored,
        "image_bytes": image.nbytes,
        "put_tiles_s": put_s,
        "get_tile_ms": get_ms,
        "delete_job_s": delete_s,
        "store_mb_per_s": stored / 2**20 / put_s if put_s else None,
    }
