"""The tile store (claim check): pixels and tile records live in Redis under job-scoped keys with a TTL; messages
carry references.

Keys of job J (all expire after the tile TTL and are deleted when the job ends):
    tilerec:job:J:job        the job's description (tasks.job_record.JobRecord, JSON)
    tilerec:job:J:total      its number of tiles
    tilerec:job:J:tile:I     raw pixels of tile I (empty: blank, skipped)
    tilerec:job:J:records    hash: tile I -> its outcome (pipeline.inference.TileOutcome, JSON); a redone tile
                             overwrites its own field, so it counts once
    tilerec:job:J:attempts   hash: deliveries of the tiling task and crashes per tile (crash-loop guard)
    tilerec:job:J:cancelled  present once the job is cancelled
    tilerec:job:J:ready      tiles stored so far while the tiling task decodes a PNG band by band (absent: all)
    tilerec:job:J:failed     why decoding that PNG failed (the job fails with this)
    tilerec:job:J:stream     hash: the time the tiling task spent decoding that PNG and storing its tiles
    tilerec:job:J:beat       counted up every STREAM_BEAT_S while it decodes: alive, though no row came yet
    tilerec:job:J:stage      a job with a second stage: its merged first-stage result and crop plan (JSON), stored
                             by the merge for the crop batches and the final callback (the tiles stay until then)
    tilerec:job:J:crops      its number of crops
    tilerec:job:J:crop_records  hash: crop K -> its outcome (pipeline.recognizers.stages.CropOutcome, JSON)
    tilerec:job:J:frames     a video job's hash: segment N -> its frames done so far (progress in frames; a redone
                             segment overwrites its own count); its records are by segment, its total in frames
    tilerec:job:J:need       bytes its tiles take in the store, while it waits for room (admission control)
    tilerec:job:J:chord      hash: the chord it runs now (tiles, crops or segments, then its merge): its group id,
                             and the chord as its messages were sent, to send one that was lost again (tasks/stalls.py)
    tilerec:job:J:repair     held for a stall period by the node that looks for the stalled job's lost messages
Room in the store (admission control, see `reserve`): tilerec:room:held (sorted set: job -> when its reservation
lapses), tilerec:room:unwritten (hash: job -> reserved bytes not yet stored), tilerec:room:line (sorted set: waiting
job -> when it first asked) and tilerec:room:line-needs (hash: waiting job -> its need).
The nodes that take tiles, each with its pool size: tilerec:tile-processes (a sorted set, tasks/roster.py).
Jobs whose chord is sent and whose merge has not ended them: tilerec:chords (a sorted set: job -> when its keys
lapse), which the nodes watch for stalls (tasks/stalls.py).
Inputs stored by clients: tilerec:input:<uuid>. Measured tile costs: tilerec:cost:<recognizer>:<parameters hash>
(ms per 640x640 tile, a week), and a second stage's: tilerec:cost:<recognizer>#crops:<parameters hash> (ms per
crop). Results too large for the result backend: tilerec:result:<job id>.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import ssl
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from pipeline.readers.images import ImageError
from pipeline.tiling import Window

PREFIX = "tilerec"
REF_SCHEME = "redis:"
PARTS = (
    "job",
    "total",
    "records",
    "attempts",
    "cancelled",
    "ready",
    "failed",
    "stream",
    "beat",
    "frames",
    "need",
    "chord",
    "repair",
)
# and tiles
STAGE_PARTS = ("stage", "crops", "crop_records")  # a second stage's
STREAM_BEAT_S = 1.0  # a streamed decoding says it is alive this often (a WebP decoded whole stores no row for long)
FLUSH_EVERY = 32  # tiles a pipeline holds before it is sent: bounds the memory of storing a job's tiles
READ_EVERY = 8  # tiles fetched in one round trip by a tile task


@lru_cache(maxsize=8)
def connect(
    url: str, master: str = "mymaster", sentinel_options: tuple[tuple[str, Any], ...] = (), retries: int = 18
) -> redis.Redis:
    """One client (and connection pool) per URL per process. Commands are retried `retries` times with backoff
    (0.2 s doubling to 2 s: 18 is about 30 s, celeryconfig's TILEREC_REDIS_PATIENCE_S) on connection errors (Redis
    restarting, loading its data, failing over), so a restart is a pause, not a failure. `retries=0`: each command
    tried once, with timeouts of a second or two, for a caller that must not block (a worker's event loop, which
    announces the node in the roster) and tries again later anyway.

    A `sentinel://host:26379;sentinel://host2:26379/db` URL asks those sentinels for the master named `master`
    (and follows it when they fail over); a password in the first URL is the master's. `sentinel_options`: the
    sentinels' own connection options, as items (celeryconfig's sentinel_kwargs: their password; TLS, which then
    the master speaks too)."""
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries)
    connect_s = 5 if retries else 1
    options = {"socket_connect_timeout": connect_s, "socket_timeout": 30 if retries else 2,
               "health_check_interval": 30, "retry": retry,
               "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}  # fmt: skip
    if not url.startswith("sentinel://"):
        return redis.Redis.from_url(url, **options)
    hosts = [urlsplit(part) for part in url.split(";")]
    tls = {key: value for key, value in sentinel_options if key.startswith("ssl")}
    sentinels = Sentinel(
        [(host.hostname, host.port or 26379) for host in hosts],
        sentinel_kwargs=dict(sentinel_options),
        socket_connect_timeout=connect_s,
    )
    first = hosts[0]
    db = int(first.path.strip("/") or 0)
    return sentinels.master_for(
        master, db=db, password=first.password, username=first.username or None, **tls, **options
    )


def tls_refused(error: BaseException) -> str | None:
    """What a failed connection's TLS says, when TLS is why it failed (a certificate refused either way); else
    None. redis-py keeps the ssl module's error as the context of its ConnectionError."""
    if not isinstance(error.__context__, ssl.SSLError):
        return None
    return (
        f"the TLS handshake failed ({error}): is the server's certificate signed by the CA in ssl_ca_certs, and does "
        "the server take this client's certificate (ssl_certfile, ssl_keyfile) if it asks for one?"
    )


def job_key(job_id: str, part: str) -> str:
    return f"{PREFIX}:job:{job_id}:{part}"


def tile_key(job_id: str, index: int) -> str:
    return job_key(job_id, f"tile:{index}")


def _raw(tile: np.ndarray | None) -> bytes | memoryview:
    """A tile's pixels as stored: empty for a blank one, else its bytes (redis-py sends a memoryview as it is)."""
    return b"" if tile is None else memoryview(np.ascontiguousarray(tile)).cast("B")


def put_tiles(
    client: redis.Redis,
    job_id: str,
    tiles: Iterable[tuple[Window, np.ndarray | None]],
    ttl: int,
    rows: Collection[int] = (),
) -> bool:
    """Store each tile's pixels as raw bytes (no codec: a PNG round trip costs more than most recognizers); None
    stores a blank tile that tile tasks skip. `tiles` may be cut or decoded lazily: memory holds the source plus at
    most FLUSH_EVERY tiles in the pipeline.

    `rows`, for a PNG decoded band by band while tile tasks wait for their tiles: the tile counts at which rows of
    tiles end. At each, the count goes to `ready` (at the last, with the time spent decoding and storing), and the
    storing stops, returning False, once the job is cancelled or over (its merge ran)."""
    began, storing = time.perf_counter(), 0.0
    already = int(client.get(job_key(job_id, "ready")) or 0) if rows else 0  # by a delivery whose process died
    with client.pipeline(transaction=False) as pipe:
        for count, (window, tile) in enumerate(tiles, start=1):
            tile_began = time.perf_counter()
            pipe.set(tile_key(job_id, window.index), _raw(tile), ex=ttl)
            stored = window.index + 1
            if stored in rows and stored > already:
                if stored == max(rows):
                    spent = {"decode_s": time.perf_counter() - began - storing, "store_s": storing}
                    pipe.hset(job_key(job_id, "stream"), mapping=spent)
                    pipe.expire(job_key(job_id, "stream"), ttl)
                pipe.set(job_key(job_id, "ready"), stored, ex=ttl)
                pipe.exists(job_key(job_id, "cancelled"))
                pipe.exists(job_key(job_id, "job"))
                *_, cancelled, described = pipe.execute()
                if cancelled or not described:  # what it wrote goes (the merge may have cleaned up before)
                    _unlink(client, _keys(job_id, stored, ("ready", "stream", "beat")))
                    return False
            elif count % FLUSH_EVERY == 0:
                pipe.execute()
            storing += time.perf_counter() - tile_began
        pipe.hdel(UNWRITTEN_KEY, job_id)  # its bytes are in Redis's used memory from now on
        pipe.execute()
    return True


def get_tiles(client: redis.Redis, job_id: str, windows: list[Window], channels: int) -> list[np.ndarray | None]:
    """The windows' stored pixels (None: blank), in one round trip."""
    found = client.mget([tile_key(job_id, window.index) for window in windows])
    tiles = []
    for window, data in zip(windows, found, strict=True):
        if data is None:
            raise LookupError(f"tile {window.index} of job {job_id} is gone from the tile store (expired or cancelled)")
        shape = (window.height, window.width, channels) if channels > 1 else (window.height, window.width)
        tiles.append(np.frombuffer(data, dtype=np.uint8).reshape(shape) if data else None)
    return tiles


_TILE_PART = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return false
end
if redis.call('STRLEN', KEYS[1]) == 0 then
    return ''
end
local stride, first, length, rows = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local parts = {}
for row = 0, rows - 1 do
    local start = first + row * stride
    parts[#parts + 1] = redis.call('GETRANGE', KEYS[1], start, start + length - 1)
end
return table.concat(parts)
"""


def get_tile_parts(
    client: redis.Redis, job_id: str, parts: list[tuple[Window, Window]], channels: int
) -> list[np.ndarray | None]:
    """Parts of stored tiles, in one round trip: for each (tile, part), the pixels of `part` (in image coordinates,
    inside the tile), cut by Redis (a script per part, its rows by GETRANGE), so only the part's bytes travel; None
    for a blank tile.

    Raises:
        LookupError: a tile is gone from the store (expired or cancelled).
    """
    with client.pipeline(transaction=False) as pipe:
        for tile, part in parts:
            first = ((part.y - tile.y) * tile.width + part.x - tile.x) * channels
            pipe.eval(_TILE_PART, 1, tile_key(job_id, tile.index), tile.width * channels, first,
                      part.width * channels, part.height)  # fmt: skip
        found = pipe.execute()
    pixels = []
    for (tile, part), data in zip(parts, found, strict=True):
        if data is None:
            raise LookupError(f"tile {tile.index} of job {job_id} is gone from the tile store (expired or cancelled)")
        shape = (part.height, part.width, channels) if channels > 1 else (part.height, part.width)
        pixels.append(np.frombuffer(data, dtype=np.uint8).reshape(shape) if data else None)
    return pixels


def put_job(client: redis.Redis, job_id: str, description: str, tiles: int, ttl: int, streamed: bool = False) -> None:
    """The job's description, read by its tile tasks and merge: messages carry only the job id and a tile range.
    `streamed`: its tiles are stored while the tile tasks run (none is ready yet, see put_tiles)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(job_key(job_id, "job"), description, ex=ttl)
        pipe.set(job_key(job_id, "total"), tiles, ex=ttl)
        if streamed:
            pipe.set(job_key(job_id, "ready"), 0, ex=ttl)
            pipe.set(job_key(job_id, "beat"), 0, ex=ttl)
        pipe.execute()


def get_job(client: redis.Redis, job_id: str) -> str:
    data = client.get(job_key(job_id, "job"))
    if data is None:
        raise LookupError(f"job {job_id} is gone from the tile store (it ended, or outlived TILEREC_TILE_TTL)")
    return data.decode()


_PUT_RECORDS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[2], ARGV[1])
return redis.call('HLEN', KEYS[2])
"""


def put_records(
    client: redis.Redis, job_id: str, records: dict[int, str], ttl: int, part: str = "records"
) -> int | None:
    """Store tile records (JSON by tile index; crop records with part="crop_records") while the job is described;
    returns its tiles (crops) done so far, or None when the job is over (it ended: a late duplicate must not bring
    its keys back)."""
    fields = [value for item in records.items() for value in item]
    done = client.eval(_PUT_RECORDS, 2, job_key(job_id, "job"), job_key(job_id, part), ttl, *fields)
    return None if done < 0 else int(done)


def get_records(client: redis.Redis, job_id: str, part: str = "records") -> list[dict[str, Any]]:
    return [json.loads(value) for value in client.hvals(job_key(job_id, part))]


def put_stage(client: redis.Redis, job_id: str, staged: str, crops: int, tiles: int, ttl: int) -> None:
    """A job's second stage as its merge planned it (JSON), and its number of crops; the TTL of its description
    and `tiles` tiles renewed, as the crop batches read them next."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(job_key(job_id, "stage"), staged, ex=ttl)
        pipe.set(job_key(job_id, "crops"), crops, ex=ttl)
        for key in _keys(job_id, tiles, ("job", "total", "attempts")):
            pipe.expire(key, ttl)
        pipe.execute()


def get_stage(client: redis.Redis, job_id: str) -> str:
    data = client.get(job_key(job_id, "stage"))
    if data is None:
        raise LookupError(f"the second stage of job {job_id} is gone from the store (it ended, or outlived "
                          "TILEREC_TILE_TTL)")  # fmt: skip
    return data.decode()


def crop_progress(client: redis.Redis, job_id: str) -> tuple[int, int] | None:
    """(crops done, crops in all) once the job's second stage is planned; None before (or without one)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hlen(job_key(job_id, "crop_records"))
        pipe.get(job_key(job_id, "crops"))
        done, total = pipe.execute()
    return None if total is None else (int(done), int(total))


def progress(client: redis.Redis, job_id: str) -> tuple[int, int | None]:
    """(tiles done, tiles in all), or a video job's (frames done, frames in all); the total is None until the job
    is planned."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hlen(job_key(job_id, "records"))
        pipe.get(job_key(job_id, "total"))
        pipe.hvals(job_key(job_id, "frames"))
        done, total, frames = pipe.execute()
    done = sum(int(count) for count in frames) if frames else done
    return int(done), None if total is None else int(total)


_PUT_FRAMES = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
local done = 0
for _, count in ipairs(redis.call('HVALS', KEYS[2])) do
    done = done + tonumber(count)
end
return done
"""


def put_frames_done(client: redis.Redis, job_id: str, segment: int, frames: int, ttl: int) -> int | None:
    """A video segment's frames done so far, while the job is described; returns the job's frames done in all its
    segments, or None when the job is over (as `put_records`)."""
    done = client.eval(_PUT_FRAMES, 2, job_key(job_id, "job"), job_key(job_id, "frames"), ttl, segment, frames)
    return None if done < 0 else int(done)


def count_attempt(client: redis.Redis, job_id: str, name: str, ttl: int) -> int:
    """Count one more attempt at `name` (the tiling task, or tile:I after a crash); returns the attempts so far."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(job_key(job_id, "attempts"), name, 1)
        pipe.expire(job_key(job_id, "attempts"), ttl)
        return int(pipe.execute()[0])


def clear_attempts(client: redis.Redis, job_id: str, name: str) -> None:
    """`name` went through: it must not be blamed when a batch-mate crashes the task again."""
    client.hdel(job_key(job_id, "attempts"), name)


def cancel(client: redis.Redis, job_id: str, ttl: int) -> None:
    client.set(job_key(job_id, "cancelled"), 1, ex=ttl)


def is_cancelled(client: redis.Redis, job_id: str) -> bool:
    return bool(client.exists(job_key(job_id, "cancelled")))


def stream_state(client: redis.Redis, job_id: str) -> tuple[int | None, str | None, bool]:
    """A streamed decoding, as a tile task waiting for its tiles sees it: (tiles stored so far, None once all are;
    why it failed, if it did; whether the job was cancelled)."""
    with client.pipeline(transaction=False) as pipe:
        for part in ("ready", "failed", "cancelled"):
            pipe.get(job_key(job_id, part))
        ready, failed, cancelled = pipe.execute()
    return None if ready is None else int(ready), None if failed is None else failed.decode(), cancelled is not None


def beats(client: redis.Redis, job_id: str) -> int:
    """How often a streamed job's decoding said it is alive (`decoding`)."""
    return int(client.get(job_key(job_id, "beat")) or 0)


@contextlib.contextmanager
def decoding(client: redis.Redis, job_id: str, ttl: int) -> Iterator[None]:
    """While the block decodes a streamed job's image, a helper thread counts its `beat` up every STREAM_BEAT_S, so
    the tile tasks waiting for rows tell a long decoding (a WebP decoded whole before its first row, a loaded
    machine) from a process that died. The count is only updated, never created: a job cleaned up stays clean."""
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while not stop.wait(STREAM_BEAT_S):
            count += 1
            with contextlib.suppress(redis.RedisError):  # a store outage shows in the decoding's own writes
                client.set(job_key(job_id, "beat"), count, ex=ttl, xx=True)

    helper = threading.Thread(target=beat, name="tilerec-stream-beat", daemon=True)
    helper.start()
    try:
        yield
    finally:
        stop.set()
        helper.join()


def delete_job(client: redis.Redis, job_id: str, tiles: int | None = None) -> None:
    """Everything the job put in Redis, and its room in the store; `tiles` spares a scan when its count is known."""
    if tiles is None:
        _unlink(client, [key.decode() for key in client.scan_iter(job_key(job_id, "*"), count=1000)])
    else:
        _unlink(client, _keys(job_id, tiles, PARTS + STAGE_PARTS))
    client.zrem(CHORDS_KEY, job_id)
    release(client, job_id)


CHORDS_KEY = f"{PREFIX}:chords"


def put_chord(client: redis.Redis, job_id: str, group: str, sent: str, ttl: int) -> None:
    """The chord the job runs now: its group id, and the chord as its messages are sent (JSON,
    tasks.stalls.SentChord); the job is watched for stalls from now until `delete_job` (or its keys lapse)."""
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(job_key(job_id, "chord"), mapping={"group": group, "sent": sent})
        pipe.expire(job_key(job_id, "chord"), ttl)
        pipe.zadd(CHORDS_KEY, {job_id: now + ttl})
        pipe.zremrangebyscore(CHORDS_KEY, "-inf", now)
        pipe.execute()


def chord_jobs(client: redis.Redis) -> list[str]:
    """The jobs whose chord was sent and who have not ended (nor lapsed)."""
    return [job.decode() for job in client.zrangebyscore(CHORDS_KEY, time.time(), "+inf")]


def get_chord(client: redis.Redis, job_id: str, part: str = "sent") -> str | None:
    """The job's chord as sent (`put_chord`), or its `part` "group" (a look at every job reads only that); None
    once the job ended."""
    data = client.hget(job_key(job_id, "chord"), part)
    return None if data is None else data.decode()


_CLAIM_REPAIR = """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return 0
end
local holder = redis.call('GET', KEYS[2])
if holder then
    return holder == ARGV[1] and 1 or 0
end
return redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) and 1 or 0
"""


def claim_repair(client: redis.Redis, job_id: str, node: str, seconds: int) -> bool:
    """Whether `node` is the one to look for the stalled job's lost messages and send them again: it claimed the
    job for `seconds` now or before, and the job has not ended (a key of an ended job is never made again)."""
    key = job_key(job_id, "repair")
    return bool(client.eval(_CLAIM_REPAIR, 2, job_key(job_id, "job"), key, node, seconds))


def fail_job(client: redis.Redis, job_id: str, tiles: int, reason: str, ttl: int) -> None:
    """Fail a running job with `reason` (its merge raises StoreFull with it): its tiles go first, so the reason can
    be stored even in a store that is full, and the room they took is free for other jobs at once."""
    _unlink(client, _keys(job_id, tiles, ()))
    release(client, job_id)
    client.set(job_key(job_id, "failed"), reason, ex=ttl)


def _keys(job_id: str, tiles: int, parts: tuple[str, ...]) -> list[str]:
    return [tile_key(job_id, index) for index in range(tiles)] + [job_key(job_id, part) for part in parts]


def _unlink(client: redis.Redis, keys: list[str]) -> None:
    """Delete keys without blocking Redis on their values (UNLINK), 1000 a command."""
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


class StoreFull(RuntimeError):
    """The tile store has no room for the job: it never can (refused at once), or it filled up under it."""


HELD_KEY = f"{PREFIX}:room:held"
UNWRITTEN_KEY = f"{PREFIX}:room:unwritten"
LINE_KEY = f"{PREFIX}:room:line"
LINE_NEEDS_KEY = f"{PREFIX}:room:line-needs"
HEADROOM = 0.05  # of the store's limit kept free for what jobs store besides tiles: messages, results, records
KEY_BYTES = 96  # Redis's own memory per key with a TTL (dict entry, key object, expiry entry)
RECORD_BYTES = 512  # a tile's record, about (empty or a few detections), with its hash field


def allocated(size: int) -> int:
    """The bytes jemalloc (Redis's allocator) takes for a value of `size` bytes: its size classes are 4 per
    doubling, so a 640x640 grey tile (400 KiB) takes 448 KiB; Redis's own header of a string is about 16 bytes."""
    size += 16
    step = 16 if size <= 128 else 1 << (size - 1).bit_length() - 3  # an eighth of the next power of two
    return -(-size // step) * step


def tiles_bytes(sizes: Iterable[int]) -> int:
    """The memory a job's tiles (their byte sizes) and their records take in the store."""
    return sum(allocated(size) + KEY_BYTES + RECORD_BYTES for size in sizes)


@dataclass(frozen=True)
class Room:
    """What `reserve` found: whether the job got its room, and the sizes it judged by (bytes)."""

    granted: bool
    need: int
    limit: int  # the most the store may hold (0: no limit: Redis has no maxmemory and no budget is set)
    used: int  # Redis's used memory
    unwritten: int  # reserved by running jobs and not yet stored
    ahead: int  # what the jobs ahead of it in line need
    startup: int  # an empty Redis's used memory

    @property
    def usable(self) -> int:
        """What jobs may hold at most, less the headroom and what an empty Redis uses."""
        return int(self.limit * (1 - HEADROOM)) - self.startup

    @property
    def free(self) -> int:
        return max(0, int(self.limit * (1 - HEADROOM)) - self.used - self.unwritten)

    @property
    def never(self) -> bool:
        """The job would not fit even in an empty store."""
        return bool(self.limit) and self.need > self.usable

    def waiting(self) -> str:
        """What a waiting job's state says."""
        line = f" ({mb(self.ahead)} of it for jobs ahead in line)" if self.ahead else ""
        free = f"{mb(self.free)} free of {mb(self.limit)}{line}"
        return f"waiting for room in the tile store: needs {mb(self.need)}, {free}"

    def refusal(self) -> str:
        """Why a job that can never fit is refused, with the sizes."""
        return (
            f"the job needs {mb(self.need)} in the tile store, more than it can ever hold: {mb(self.usable)} of its "
            f"{mb(self.limit)} limit (Redis's maxmemory or TILEREC_STORE_MAX_BYTES, less {HEADROOM:.0%} headroom and "
            "what an empty Redis uses); raise that limit, or send a smaller image (or a tiled TIFF the workers read "
            "themselves)"
        )


FILLED = (
    "the tile store (Redis) filled up while the job ran: its used memory reached maxmemory (another program's data "
    "in the same Redis, or a TILEREC_STORE_MAX_BYTES above what Redis can hold); the job's keys are deleted, submit "
    "it again"
)


def mb(size: int) -> str:
    """Bytes as MB (10^6), for messages."""
    return f"{size / 1e6:.1f} MB"


_RESERVE = """
local job, need, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, other in ipairs(lapsed) do
    redis.call('HDEL', KEYS[2], other)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
for _, other in ipairs(gone) do
    redis.call('HDEL', KEYS[4], other)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
local info = redis.call('INFO', 'memory')
local used = tonumber(string.match(info, 'used_memory:(%d+)'))
local startup = tonumber(string.match(info, 'used_memory_startup:(%d+)'))
local limit = tonumber(string.match(info, 'maxmemory:(%d+)'))
local budget = tonumber(ARGV[5])
if budget > 0 and (limit == 0 or budget < limit) then
    limit = budget
end
local unwritten = 0
for _, bytes in ipairs(redis.call('HVALS', KEYS[2])) do
    unwritten = unwritten + tonumber(bytes)
end
local joined = redis.call('ZSCORE', KEYS[3], job)
local before = joined and redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. joined)
    or redis.call('ZRANGE', KEYS[3], 0, -1)
local ahead = 0
for _, other in ipairs(before) do
    ahead = ahead + tonumber(redis.call('HGET', KEYS[4], other) or 0)
end
local held = redis.call('ZSCORE', KEYS[1], job)
local fits = limit == 0 or used + unwritten + ahead + need <= math.floor(limit * (1 - tonumber(ARGV[6])))
if held or fits then
    redis.call('ZADD', KEYS[1], now + ttl, job)
    if not held then
        redis.call('HSET', KEYS[2], job, need)
    end
    redis.call('ZREM', KEYS[3], job)
    redis.call('HDEL', KEYS[4], job)
    return {1, limit, used, unwritten, ahead, startup}
end
if not joined then
    redis.call('ZADD', KEYS[3], now, job)
    redis.call('HSET', KEYS[4], job, need)
end
return {0, limit, used, unwritten, ahead, startup}
"""


def reserve(client: redis.Redis, job_id: str, need: int, budget: int, ttl: int) -> Room:
    """Reserve `need` bytes of the store for the job, if they fit now: Redis's used memory, plus what running jobs
    reserved and have not stored yet, plus `need`, within the limit (Redis's maxmemory, or `budget` if lower; 0:
    none) less HEADROOM. Atomic (one script), so two jobs never take the same room; a job that holds a reservation
    (a redelivery) keeps it. A reservation lapses after `ttl` s, as the job's keys do, so a dead job's room comes
    back; `release` (by `delete_job`) gives it back when the job ends.

    Jobs that found no room wait in line, in the order they first asked: the room of those ahead counts as taken,
    so a stream of smaller jobs cannot keep a big one out for ever (a job gone from the line for `ttl` s is
    dropped). Waiting jobs also record their need (`wait`), to ask again before they read their image.

    Args:
        client: the store.
        job_id: the job.
        need: the bytes its tiles and records take (`tiles_bytes`).
        budget: TILEREC_STORE_MAX_BYTES (0: Redis's maxmemory alone).
        ttl: the tile TTL (s).

    Returns:
        Room: granted or not, with the sizes judged by.
    """
    keys = (HELD_KEY, UNWRITTEN_KEY, LINE_KEY, LINE_NEEDS_KEY)
    granted, limit, used, unwritten, ahead, startup = client.eval(
        _RESERVE, len(keys), *keys, job_id, need, time.time(), ttl, budget, HEADROOM
    )
    if granted:
        client.unlink(job_key(job_id, "need"))
    return Room(bool(granted), need, int(limit), int(used), int(unwritten), int(ahead), int(startup))


def wait(client: redis.Redis, job_id: str, need: int, ttl: int) -> None:
    """Record that the job waits for `need` bytes, so its next try asks for room before it decodes its image."""
    client.set(job_key(job_id, "need"), need, ex=ttl)


def waiting_need(client: redis.Redis, job_id: str) -> int | None:
    """The bytes a waiting job needs (see `wait`), or None: it has not waited."""
    value = client.get(job_key(job_id, "need"))
    return None if value is None else int(value)


def release(client: redis.Redis, job_id: str) -> None:
    """Give the job's room back, or its place in line (nothing if it had neither)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zrem(HELD_KEY, job_id)
        pipe.hdel(UNWRITTEN_KEY, job_id)
        pipe.zrem(LINE_KEY, job_id)
        pipe.hdel(LINE_NEEDS_KEY, job_id)
        pipe.execute()


@dataclass(frozen=True)
class Memory:
    """A Redis's memory settings, as INFO tells them."""

    used: int
    maxmemory: int  # 0: none
    policy: str  # maxmemory-policy


def memory(client: redis.Redis) -> Memory:
    info = client.info("memory")
    return Memory(int(info["used_memory"]), int(info.get("maxmemory", 0)), str(info.get("maxmemory_policy", "")))


ROSTER_KEY = f"{PREFIX}:tile-processes"


def roster_member(node: str, processes: int) -> str:
    """A node's entry in the roster: its pool size and its name."""
    return f"{processes}@{node}"


def announce_processes(client: redis.Redis, member: str, ttl: float) -> None:
    """The node of `member` takes tiles for the next `ttl` seconds; entries that lapsed go."""
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(ROSTER_KEY, {member: now + ttl})
        pipe.zremrangebyscore(ROSTER_KEY, "-inf", now)
        pipe.expire(ROSTER_KEY, int(ttl) + 1)
        pipe.execute()


def withdraw_processes(client: redis.Redis, member: str) -> None:
    client.zrem(ROSTER_KEY, member)


def tile_processes(client: redis.Redis) -> int:
    """The tile processes of the nodes whose announcement has not lapsed (0: none announced)."""
    return sum(int(member.split(b"@", 1)[0]) for member in client.zrangebyscore(ROSTER_KEY, time.time(), "+inf"))


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


RANGE_BYTES = 1 << 18  # a stored input read as a file takes this much per round trip (GETRANGE)


@dataclass(frozen=True)
class StoredInput:
    """A client's stored input (`put_bytes`) to open as a file read by ranges: a video segment task reads the part of
    an uploaded clip it decodes (and its index), not the whole clip."""

    client: redis.Redis
    key: str
    size: int

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(_Ranges(self), RANGE_BYTES)


class _Ranges(io.RawIOBase):
    """A stored input's bytes by GETRANGE, as a seekable raw file."""

    def __init__(self, stored: StoredInput) -> None:
        super().__init__()
        self.stored, self.position = stored, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.stored.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.stored.size:
            return 0
        data = self.stored.client.getrange(self.stored.key, self.position, self.position + len(buffer) - 1)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def stored_input(client: redis.Redis, ref: str) -> StoredInput:
    """The input stored under `ref`, to read by ranges (`StoredInput.open`) rather than fetch whole (`get_bytes`)."""
    key = _input_key(ref)
    size = client.strlen(key)
    if not size:
        raise ImageError(f"no image is stored under {ref!r} (it expired or was never stored)")
    return StoredInput(client, key, size)


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
