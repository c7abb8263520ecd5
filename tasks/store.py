"""The tile store (claim check): pixels live in Redis under job-scoped keys with a TTL; messages carry references."""

from __future__ import annotations

import uuid
from functools import lru_cache

import numpy as np
import redis

from pipeline.images import ImageError
from pipeline.tiling import Window

PREFIX = "tilerec"
REF_SCHEME = "redis:"


@lru_cache(maxsize=4)
def connect(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def tile_key(job_id: str, index: int) -> str:
    return f"{PREFIX}:job:{job_id}:tile:{index}"


def input_key() -> str:
    return f"{PREFIX}:input:{uuid.uuid4().hex}"


def put_tiles(
    client: redis.Redis, job_id: str, image: np.ndarray, windows: list[Window], ttl: int, flush_every: int = 32
) -> int:
    """Store each window's pixels as raw bytes (no codec: a PNG round trip costs more than most recognizers).
    Sent in pipelines of `flush_every` tiles so memory holds at most that many tile copies. Returns bytes stored."""
    stored = 0
    with client.pipeline(transaction=False) as pipe:
        for n, window in enumerate(windows, start=1):
            pixels = np.ascontiguousarray(image[window.y : window.y2, window.x : window.x2]).tobytes()
            pipe.set(tile_key(job_id, window.index), pixels, ex=ttl)
            stored += len(pixels)
            if n % flush_every == 0:
                pipe.execute()
        pipe.execute()
    return stored


def get_tile(client: redis.Redis, job_id: str, window: Window, channels: int) -> np.ndarray:
    data = client.get(tile_key(job_id, window.index))
    if data is None:
        raise LookupError(f"tile {window.index} of job {job_id} is gone from the tile store (expired or cancelled)")
    shape = (window.height, window.width, channels) if channels > 1 else (window.height, window.width)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def progress_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:done"


def total_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:total"


def set_total(client: redis.Redis, job_id: str, tiles: int, ttl: int) -> None:
    client.set(total_key(job_id), tiles, ex=ttl)


def get_total(client: redis.Redis, job_id: str) -> int | None:
    value = client.get(total_key(job_id))
    return None if value is None else int(value)


def add_progress(client: redis.Redis, job_id: str, tiles: int, ttl: int) -> int:
    """Count `tiles` more tiles done; returns the job's count so far (a redelivered tile may count twice)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.incrby(progress_key(job_id), tiles)
        pipe.expire(progress_key(job_id), ttl)
        done, _ = pipe.execute()
    return int(done)


def get_progress(client: redis.Redis, job_id: str) -> int:
    return int(client.get(progress_key(job_id)) or 0)


def delete_tiles(client: redis.Redis, job_id: str, tiles: int) -> None:
    keys = [tile_key(job_id, index) for index in range(tiles)]
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


def put_bytes(client: redis.Redis, data: bytes, ttl: int) -> str:
    """Store input bytes; returns the `redis:` reference a job takes as its image."""
    key = input_key()
    client.set(key, data, ex=ttl)
    return REF_SCHEME + key


def get_bytes(client: redis.Redis, ref: str) -> bytes:
    key = ref[len(REF_SCHEME) :]
    if not key.startswith(f"{PREFIX}:input:"):
        raise ImageError(f"{ref!r} is not a tilerec input reference (expected {REF_SCHEME}{PREFIX}:input:…)")
    data = client.get(key)
    if data is None:
        raise ImageError(f"no image is stored under {ref!r} (it expired or was never stored)")
    return data


def delete_ref(client: redis.Redis, ref: str) -> None:
    client.unlink(ref[len(REF_SCHEME) :])


def delete_job(client: redis.Redis, job_id: str, tiles: int) -> None:
    """Everything the job put in Redis: its tiles and its progress counters."""
    delete_tiles(client, job_id, tiles)
    client.unlink(progress_key(job_id), total_key(job_id))
