"""The tile store (claim check): pixels live in Redis under job-scoped keys with a TTL; messages carry references.

Keys of job J (all expire after the tile TTL and are deleted when the job ends):
    tilerec:job:J:job        the job's description (JSON): size, options, how its tiles are read
    tilerec:job:J:tile:I     raw pixels of tile I (empty: the tile is blank and skipped)
    tilerec:job:J:total      number of tiles
    tilerec:job:J:done       tiles recognized so far (progress)
    tilerec:job:J:attempts   hash: deliveries per tile task and crashes per tile (crash-loop guard)
    tilerec:job:J:claimed    batches claimed so far (tile tasks take the job's batches one by one)
    tilerec:job:J:claims     hash: batch -> the tile task that claimed it (redone if that task's process dies)
    tilerec:job:J:tasks      tile tasks the job has grown to, once it grew (processes joined the cluster mid-job)
    tilerec:job:J:cancelled  present once the job is cancelled
    tilerec:job:J:ready      batches whose tiles are all stored, while the tiling task decodes a PNG (absent: all)
    tilerec:job:J:wake       list tile tasks waiting for a batch block on; pushed to when more batches are ready
    tilerec:job:J:failed     why decoding the PNG failed (the job fails with this)
    tilerec:job:J:stream     hash: the time the tiling task spent decoding the PNG and storing its tiles
Inputs stored by clients: tilerec:input:<uuid> (expire after their TTL).
Measured tile costs: tilerec:cost:<recognizer>:<parameters hash>, ms per 640x640 tile (expire after a week unused).
Results too large for the result backend: tilerec:result:<job id>, the result's JSON text (expires with the result).
Live tile worker processes: tilerec:tile-processes:<tiles queue> (tasks/registry.py).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import redis

from pipeline.images import ImageError
from pipeline.tiling import Window

PREFIX = "tilerec"
REF_SCHEME = "redis:"


@lru_cache(maxsize=4)
def connect(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def job_key(job_id: str, part: str) -> str:
    return f"{PREFIX}:job:{job_id}:{part}"


def tile_key(job_id: str, index: int) -> str:
    return job_key(job_id, f"tile:{index}")


def put_tiles(
    client: redis.Redis,
    job_id: str,
    windows: list[Window],
    read: Callable[[Window], np.ndarray | None],
    ttl: int,
    flush_every: int = 32,
) -> int:
    """Store each window's pixels, as `read` gives them, as raw bytes (no codec: a PNG round trip costs more than
    most recognizers); None is stored empty, a blank tile the tile task skips without another look.

    `read` cuts the decoded image or reads a TIFF window by window, so memory holds the source plus at most
    `flush_every` tiles waiting in the pipeline. Returns the bytes stored."""
    stored = 0
    with client.pipeline(transaction=False) as pipe:
        pipe.set(job_key(job_id, "total"), len(windows), ex=ttl)
        for n, window in enumerate(windows, start=1):
            tile = read(window)
            pixels = _raw(tile)
            pipe.set(tile_key(job_id, window.index), pixels, ex=ttl)
            stored += len(pixels)
            if n % flush_every == 0:
                pipe.execute()
        pipe.execute()
    return stored


def _raw(tile: np.ndarray | None) -> bytes | memoryview:
    """A tile's pixels as stored: empty for a blank one; else its bytes, copied only to make them contiguous (redis-py
    sends a memoryview as it is; measured here, 19 % less time than tobytes storing 640² colour tiles)."""
    return b"" if tile is None else memoryview(np.ascontiguousarray(tile)).cast("B")


def get_tile(client: redis.Redis, job_id: str, window: Window, channels: int) -> np.ndarray | None:
    """The tile's pixels, or None for a tile stored as blank."""
    data = client.get(tile_key(job_id, window.index))
    if data is None:
        raise LookupError(f"tile {window.index} of job {job_id} is gone from the tile store (expired or cancelled)")
    if not data:
        return None
    shape = (window.height, window.width, channels) if channels > 1 else (window.height, window.width)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def put_job(client: redis.Redis, job_id: str, job: dict[str, Any], ttl: int) -> None:
    """The job's description, read by its tile tasks and merge: messages carry only the job id (≤ 2 KB each)."""
    client.set(job_key(job_id, "job"), json.dumps(job), ex=ttl)


def get_job(client: redis.Redis, job_id: str) -> dict[str, Any]:
    data = client.get(job_key(job_id, "job"))
    if data is None:
        raise LookupError(
            f"job {job_id} is gone from the tile store: it finished, failed, or outlived TILEREC_TILE_TTL"
        )
    return json.loads(data)


def find_job(client: redis.Redis, job_id: str, flag: str) -> bool:
    """The job's description is stored, with `flag` set in it."""
    data = client.get(job_key(job_id, "job"))
    return data is not None and bool(json.loads(data).get(flag))


def get_total(client: redis.Redis, job_id: str) -> int | None:
    value = client.get(job_key(job_id, "total"))
    return None if value is None else int(value)


def get_progress(client: redis.Redis, job_id: str) -> int:
    return int(client.get(job_key(job_id, "done")) or 0)


def count_delivery(client: redis.Redis, job_id: str, task_id: str, ttl: int) -> tuple[int, bool]:
    """(how many times this tile task has started, whether the job is cancelled), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(job_key(job_id, "attempts"), f"task:{task_id}", 1)
        pipe.expire(job_key(job_id, "attempts"), ttl)
        pipe.exists(job_key(job_id, "cancelled"))
        deliveries, _, cancelled = pipe.execute()
    return int(deliveries), bool(cancelled)


def count_tile_attempt(client: redis.Redis, job_id: str, index: int) -> int:
    """Count one more attempt at a tile whose task was redelivered; returns the attempts so far."""
    return int(client.hincrby(job_key(job_id, "attempts"), f"tile:{index}", 1))


def clear_tile_attempts(client: redis.Redis, job_id: str, index: int) -> None:
    """The tile went through: it must not be blamed when a batch-mate crashes the task again."""
    client.hdel(job_key(job_id, "attempts"), f"tile:{index}")


_CLAIM = """
local done = redis.call('INCRBY', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
local node_live = redis.call('HEXISTS', KEYS[5], ARGV[5])
if ARGV[6] == '1' and node_live == 0 then
    return {-2, done, node_live}
end
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('EXISTS', KEYS[7]) == 1 then
    return {-1, done, node_live}
end
local ready = tonumber(redis.call('GET', KEYS[6]) or ARGV[2])
if ready < tonumber(ARGV[2]) and tonumber(redis.call('GET', KEYS[1]) or 0) >= ready then
    return {-3, done, node_live}
end
local batch = redis.call('INCR', KEYS[1]) - 1
redis.call('EXPIRE', KEYS[1], ARGV[4])
if batch >= tonumber(ARGV[2]) then
    return {-1, done, node_live}
end
redis.call('HSET', KEYS[2], batch, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {batch, done, node_live}
"""


class Claim(NamedTuple):
    batch: int | None  # None: no batch was taken (none left or ready, the job was cancelled or failed, the node left)
    done: int  # the job's tiles done so far (a redone tile counts twice)
    node_live: bool  # the node is in the registry
    node_left: bool  # no batch was taken because the node left the registry (it is stopping)
    waiting: bool  # no batch was taken because the next one's tiles are still being decoded (see wait_ready)


def claim_batch(
    client: redis.Redis,
    job_id: str,
    task_id: str,
    batches: int,
    tiles_done: int,
    ttl: int,
    registry: str,
    node: str,
    unless_node_left: bool,
) -> Claim:
    """Count `tiles_done` more tiles done, and take the job's next batch for `task_id`, in one round trip; with
    `unless_node_left`, not once `node` has left the hash `registry` (tasks/registry.py): it is stopping."""
    keys = [job_key(job_id, part) for part in ("claimed", "claims", "done", "cancelled")] + [registry]
    keys += [job_key(job_id, "ready"), job_key(job_id, "failed")]
    batch, done, node_live = client.eval(
        _CLAIM, len(keys), *keys, task_id, batches, tiles_done, ttl, node, int(unless_node_left)
    )
    return Claim(None if batch < 0 else int(batch), int(done), bool(node_live), batch == -2, batch == -3)


def start_stream(client: redis.Redis, job_id: str, tiles: int, ttl: int) -> None:
    """The job's tiles will be stored as the tiling task decodes its PNG: until then, no batch is ready."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(job_key(job_id, "total"), tiles, ex=ttl)
        pipe.set(job_key(job_id, "ready"), 0, ex=ttl)
        pipe.execute()


def _wake(pipe: Any, job_id: str, waiters: int, ttl: int) -> None:
    key = job_key(job_id, "wake")
    pipe.delete(key)
    pipe.rpush(key, *range(waiters))
    pipe.expire(key, ttl)


def stream_tiles(
    client: redis.Redis,
    job_id: str,
    tiles: Iterator[tuple[Window, np.ndarray | None]],
    batch_stops: list[int],
    waiters: int,
    ttl: int,
    flush_every: int = 32,
) -> bool:
    """Store tiles as the decoding yields them (as put_tiles does); after each batch's last tile, count the batches
    ready and wake up to `waiters` tile tasks waiting for one. Before the last batch is ready, record the time spent
    decoding and storing (the job's `stream` hash), so the merge finds it.

    Stops once the job is cancelled or over (its description is gone: the merge ran), deleting what it stored, and
    returns False."""
    began, storing = time.perf_counter(), 0.0
    stops = {stop: number + 1 for number, stop in enumerate(batch_stops)}
    already = int(client.get(job_key(job_id, "ready")) or 0)  # by an earlier delivery, whose process died
    with client.pipeline(transaction=False) as pipe:
        for count, (window, tile) in enumerate(tiles, start=1):
            tile_began = time.perf_counter()
            pipe.set(tile_key(job_id, window.index), _raw(tile), ex=ttl)
            ready = stops.get(window.index + 1)
            if ready is not None and ready > already:
                if ready == len(batch_stops):
                    now = time.perf_counter()
                    timings = {"decode_s": now - began - storing, "store_s": storing + now - tile_began}
                    pipe.hset(job_key(job_id, "stream"), mapping=timings)
                    pipe.expire(job_key(job_id, "stream"), ttl)
                pipe.set(job_key(job_id, "ready"), ready, ex=ttl)
                _wake(pipe, job_id, waiters, ttl)
            if (ready is not None and ready > already) or count % flush_every == 0:
                pipe.exists(job_key(job_id, "cancelled"))
                pipe.exists(job_key(job_id, "job"))
                *_, cancelled, described = pipe.execute()
                if cancelled or not described:
                    _forget_tiles(client, job_id, window.index + 1)
                    return False
            storing += time.perf_counter() - tile_began
        pipe.execute()
    return True


STREAM_PARTS = ("ready", "wake", "stream")  # what stream_tiles writes besides the tiles


def _forget_tiles(client: redis.Redis, job_id: str, stored: int) -> None:
    """What stream_tiles wrote of a job that was cancelled or ended meanwhile (its merge may have cleaned up before)."""
    _unlink(client, _keys_of(job_id, stored, STREAM_PARTS))


def wait_ready(client: redis.Redis, job_id: str, seconds: float) -> None:
    """Wait until more batches are ready (or the decoding failed), or `seconds` passed."""
    client.blpop([job_key(job_id, "wake")], timeout=seconds)


def fail_stream(client: redis.Redis, job_id: str, error: str, waiters: int, ttl: int) -> None:
    """Decoding the image failed: no more batches will be ready, and the job fails with `error`."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(job_key(job_id, "failed"), error, ex=ttl)
        _wake(pipe, job_id, waiters, ttl)
        pipe.execute()


def stream_failure(client: redis.Redis, job_id: str) -> str | None:
    error = client.get(job_key(job_id, "failed"))
    return None if error is None else error.decode()


def stream_timings(client: redis.Redis, job_id: str) -> dict[str, float]:
    return {key.decode(): float(value) for key, value in client.hgetall(job_key(job_id, "stream")).items()}


_GROW = """
local tasks = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
local left = tonumber(ARGV[3]) - tonumber(redis.call('GET', KEYS[2]) or 0)
local extra = math.min(tonumber(ARGV[2]) - tasks, left)
if extra <= 0 then
    return {0, tasks}
end
redis.call('SET', KEYS[1], tasks + extra, 'EX', ARGV[4])
return {extra, tasks}
"""


def grow_tasks(client: redis.Redis, job_id: str, tasks: int, processes: int, batches: int, ttl: int) -> range:
    """The numbers of the tile tasks to add so the job has one per live process (`processes`), but no more than it
    has batches left; `tasks` is what it started with. Atomic: tasks handing over at once add each process once."""
    keys = [job_key(job_id, "tasks"), job_key(job_id, "claimed")]
    extra, before = client.eval(_GROW, len(keys), *keys, tasks, processes, batches, ttl)
    return range(int(before), int(before) + int(extra))


def job_tasks(client: redis.Redis, job_id: str, tasks: int) -> int:
    """The tile tasks the job grew to, or `tasks` (what it started with) when it did not grow."""
    value = client.get(job_key(job_id, "tasks"))
    return tasks if value is None else int(value)


def claimed_by(client: redis.Redis, job_id: str, task_id: str) -> list[int]:
    """The batches `task_id` claimed in its earlier deliveries (their records died with its process)."""
    claims = client.hgetall(job_key(job_id, "claims"))
    return sorted(int(batch) for batch, owner in claims.items() if owner.decode() == task_id)


def cancel(client: redis.Redis, job_id: str, ttl: int) -> None:
    client.set(job_key(job_id, "cancelled"), 1, ex=ttl)


def is_cancelled(client: redis.Redis, job_id: str) -> bool:
    return bool(client.exists(job_key(job_id, "cancelled")))


JOB_PARTS = (  # and its tiles
    *("job", "total", "done", "attempts", "cancelled", "claimed", "claims", "tasks"),
    *STREAM_PARTS,
    "failed",
)


def delete_job(client: redis.Redis, job_id: str, tiles: int | None = None) -> None:
    """Everything the job put in Redis. `tiles` spares a scan when the count is known."""
    if tiles is None:
        _unlink(client, list(client.scan_iter(job_key(job_id, "*"), count=1000)))
    else:
        _unlink(client, _keys_of(job_id, tiles, JOB_PARTS))


def _keys_of(job_id: str, tiles: int, parts: tuple[str, ...]) -> list[str]:
    """The keys of the job's first `tiles` tiles and of its `parts`."""
    return [tile_key(job_id, index) for index in range(tiles)] + [job_key(job_id, part) for part in parts]


def _unlink(client: redis.Redis, keys: list[Any]) -> None:
    """Delete `keys` without blocking Redis on their values (UNLINK), at most 1000 keys a command."""
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


COST_TTL = 7 * 24 * 3600
COST_WEIGHT = 0.5  # of the newest job in the running estimate: recent jobs count most, one odd job does not rule


def _cost_key(recognizer: str, params: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f"{PREFIX}:cost:{recognizer}:{digest}"


def get_tile_cost(client: redis.Redis, recognizer: str, params: dict[str, Any]) -> float | None:
    """What a 640x640 tile has cost this recognizer with these parameters in recent jobs (ms), if measured."""
    value = client.get(_cost_key(recognizer, params))
    return None if value is None else float(value)


def record_tile_cost(client: redis.Redis, recognizer: str, params: dict[str, Any], ms: float) -> None:
    """Fold a finished job's mean tile cost into the running estimate (concurrent jobs may each win: harmless)."""
    key = _cost_key(recognizer, params)
    before = client.get(key)
    estimate = ms if before is None else (1 - COST_WEIGHT) * float(before) + COST_WEIGHT * ms
    client.set(key, f"{estimate:.3f}", ex=COST_TTL)


def put_bytes(client: redis.Redis, data: bytes, ttl: int) -> str:
    """Store input bytes; returns the `redis:` reference a job takes as its image."""
    key = f"{PREFIX}:input:{uuid.uuid4().hex}"
    client.set(key, data, ex=ttl)
    return REF_SCHEME + key


def _input_key(ref: str) -> str:
    key = ref[len(REF_SCHEME) :]
    if not key.startswith(f"{PREFIX}:input:"):
        raise ImageError(f"{ref!r} is not a tilerec input reference (expected {REF_SCHEME}{PREFIX}:input:…)")
    return key


def get_bytes(client: redis.Redis, ref: str) -> bytes:
    data = client.get(_input_key(ref))
    if data is None:
        raise ImageError(f"no image is stored under {ref!r} (it expired or was never stored)")
    return data


def get_ends(client: redis.Redis, ref: str, head: int, tail: int) -> tuple[bytes, bytes]:
    """The first `head` and the last `tail` bytes of stored input (to read its header without the whole)."""
    key = _input_key(ref)
    with client.pipeline(transaction=False) as pipe:
        pipe.exists(key)
        pipe.getrange(key, 0, head - 1)
        pipe.getrange(key, -tail, -1)
        exists, first, last = pipe.execute()
    if not exists:
        raise ImageError(f"no image is stored under {ref!r} (it expired or was never stored)")
    return first, last


def delete_ref(client: redis.Redis, ref: str) -> None:
    client.unlink(ref[len(REF_SCHEME) :])


RESULT_PREFIX = f"{PREFIX}:result:"


def put_result(client: redis.Redis, job_id: str, text: str, ttl: int) -> str:
    """Store a job's result JSON under its own key; returns the `redis:` reference the result backend carries."""
    key = RESULT_PREFIX + job_id
    client.set(key, text, ex=ttl or None)
    return REF_SCHEME + key


def get_result(client: redis.Redis, ref: str) -> bytes:
    key = ref[len(REF_SCHEME) :] if ref.startswith(REF_SCHEME) else ""
    if not key.startswith(RESULT_PREFIX):
        raise ValueError(f"{ref!r} is not a tilerec result reference (expected {REF_SCHEME}{RESULT_PREFIX}…)")
    data = client.get(key)
    if data is None:
        raise LookupError(f"no result is stored under {ref!r} (it expired: results live TILEREC_RESULT_EXPIRES s)")
    return data
