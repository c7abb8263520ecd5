"""Every Celery setting of tilerec, in one place; each can be overridden from the environment.

A calling app needs only the broker, the result backend and the JSON serializer: docs/tasks.md.
"""

import math
import os


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _number(name: str, default: float, minimum: float, kind: type = int) -> float:
    """The setting as a number of at least `minimum`, or the worker (and any app loading this) stops saying why."""
    raw = _env(name, str(default)).strip()
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what} of at least {minimum}, got {raw!r}")
    return value


def _flag(name: str, default: str) -> bool:
    return _env(name, default).strip().lower() not in ("false", "0", "no", "off")


def _chord_safe(url: str) -> str:
    """A Redis or Sentinel backend URL as tasks.chords' backend: Celery's own, with the fault windows of a chord
    closed. Its keys and values are Celery's, so any app reads the results with a plain redis:// backend."""
    kind = {"redis": "RedisBackend", "rediss": "RedisBackend", "sentinel": "SentinelBackend"}.get(url.split(":", 1)[0])
    return f"tasks.chords:{kind}+{url}" if kind else url


def backend_and_store(broker: str) -> tuple[str, str]:
    """The result backend's and the tile store's URLs that go with `broker`: each its own variable's, else the one
    before it (the CLI asks again for a broker given with --broker)."""
    backend = _env("TILEREC_RESULT_BACKEND", broker)
    return backend, _env("TILEREC_STORE_URL", backend)


broker_url = _env("TILEREC_BROKER_URL", "redis://localhost:6379/0")
_backend_url, tilerec_store_url = backend_and_store(broker_url)
result_backend = _chord_safe(_backend_url)

# JSON only: a pickle message from anyone who can reach the broker is refused, never executed.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Queues: tiling and merging on one, tile recognition on the other, so recognition can have its own workers. The
# jobs queue's workers also take jobs sent to Celery's default queue, where another app's plain send_task puts them.
jobs_queue = _env("TILEREC_JOBS_QUEUE", "tilerec")
tiles_queue = _env("TILEREC_TILES_QUEUE", "tilerec.tiles")
default_queue = _env("TILEREC_DEFAULT_QUEUE", "celery")  # "": take jobs only from the jobs queue
task_default_queue = jobs_queue
task_queues = {
    queue: {"exchange": queue, "routing_key": queue} for queue in (jobs_queue, tiles_queue, default_queue) if queue
}
# Priorities: 0 is taken first. A merge (it ends a job) is 0, a job's n-th batch 1 + log2(n + 1) (at most 9,
# tasks.jobs.batch_priority), a new job 4: a small job's batches overtake a big job's later ones, and running jobs
# finish before many new ones start. The Redis transport keeps a list per queue and level.
task_routes = {
    "tilerec.recognize": {"queue": jobs_queue, "priority": 4},
    "tilerec.merge": {"queue": jobs_queue, "priority": 0},
    "tilerec.recognize_tiles": {"queue": tiles_queue},
    "tilerec.recognize_crops": {"queue": tiles_queue},  # a second stage's crop batches: recognition work
    "tilerec.finish": {"queue": jobs_queue, "priority": 0},
    # a video job's tasks go where an image job's do: its segments are its tile batches
    "tilerec.recognize_video": {"queue": jobs_queue, "priority": 4},
    "tilerec.merge_video": {"queue": jobs_queue, "priority": 0},
    "tilerec.recognize_segment": {"queue": tiles_queue},
}

# A task is acknowledged after it ran, and handed back if its worker dies, so no tile is lost to a crash.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = _number("TILEREC_PREFETCH_MULTIPLIER", 1, 0)  # 0: no limit (Celery)
# A task a node took and did not acknowledge comes back to the queue once its lease is this old: live nodes renew
# theirs (tasks/leases.py), so this bounds how long a dead or frozen node's work waits; every node looks every 2 s.
visibility_timeout = _number("TILEREC_VISIBILITY_TIMEOUT", 15, 3)
# A job that made no progress for this long, while a message of its chord is neither queued nor running anywhere
# (lost in a failover, flushed), has that message sent again (tasks/stalls.py); every node looks a sixth of it
# apart. Work merely queued behind other jobs is never sent again, however long it waits. 0: no repair.
tilerec_stall_s = _number("TILEREC_STALL_S", 60, 0, float)
# Redis Sentinel: broker, backend and store URLs of the form sentinel://host:26379;sentinel://host2:26379/0 find the
# master of this name (a password for the sentinels themselves, if they have one: TILEREC_SENTINEL_PASSWORD).
sentinel_master = _env("TILEREC_SENTINEL_MASTER", "mymaster")
# Sentinels over TLS: the CA certificate that signed the sentinels' and the Redis servers' certificates turns TLS on
# for both, with this process's own certificate and key where they ask for one (mutual TLS). (rediss:// URLs carry
# theirs in the URL: ?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.crt.)
_sentinel_files = {"ssl_ca_certs": "TILEREC_SENTINEL_TLS_CA", "ssl_certfile": "TILEREC_SENTINEL_TLS_CERT",
                   "ssl_keyfile": "TILEREC_SENTINEL_TLS_KEY"}  # fmt: skip
tilerec_sentinel_tls = {key: os.environ[name] for key, name in _sentinel_files.items() if os.environ.get(name)}
if tilerec_sentinel_tls:
    tilerec_sentinel_tls = {"ssl_cert_reqs": "required", **tilerec_sentinel_tls}
sentinel_kwargs = {
    **({"password": os.environ["TILEREC_SENTINEL_PASSWORD"]} if os.environ.get("TILEREC_SENTINEL_PASSWORD") else {}),
    **({"ssl": True, **tilerec_sentinel_tls} if tilerec_sentinel_tls else {}),
}
broker_transport_options = {
    "visibility_timeout": visibility_timeout,
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    "priority_steps": list(range(10)),
    "master_name": sentinel_master,
    "sentinel_kwargs": sentinel_kwargs,
}
result_backend_transport_options = {"master_name": sentinel_master, "sentinel_kwargs": sentinel_kwargs}


def tls_for_sentinel(url: str) -> dict[str, str] | None:
    """The TLS options of the masters a sentinel:// broker or backend URL names (they speak TLS as the sentinels
    do); None for other URLs (a rediss:// URL carries its own)."""
    return tilerec_sentinel_tls if "sentinel://" in url and tilerec_sentinel_tls else None


broker_use_ssl = tls_for_sentinel(broker_url)
redis_backend_use_ssl = tls_for_sentinel(result_backend)
broker_connection_retry_on_startup = True


def backoff_retries(seconds: float, base_s: float = 0.1, cap_s: float = 2.0) -> int:
    """How many retries, sleeping base_s·2ⁿ (at most cap_s) before the n-th, wait `seconds` in all."""
    retries, waited = 0, 0.0
    while waited < seconds:
        retries += 1
        waited += min(cap_s, base_s * 2**retries)
    return retries


# Redis restarted or failed over: for this long a worker's Redis writes are retried with backoff (store commands,
# results, chord counts), so an outage this short is a pause, not a failed job.
# Make it longer than the sentinels' failover takes (their down-after-milliseconds plus failover-timeout).
tilerec_redis_patience_s = _number("TILEREC_REDIS_PATIENCE_S", 30, 0, float)
tilerec_redis_retries = backoff_retries(tilerec_redis_patience_s)
result_backend_always_retry = True
result_backend_max_retries = backoff_retries(2 * tilerec_redis_patience_s)  # Celery sleeps a random part of each step
result_backend_base_sleep_between_retries_ms = 100
result_backend_max_sleep_between_retries_ms = 2000
# Publishing is retried for about 12 s (15 tries, a connection timeout of 2 s each): Celery holds a chord's callback
# claimed for as long as that could take, so a dead publisher's claim lapses after about 50 s.
task_publish_retry_policy = {"max_retries": 15, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
broker_connection_timeout = 2

# Results: kept a day; extended so Flower and other apps see task names and arguments.
result_expires = _number("TILEREC_RESULT_EXPIRES", 24 * 3600, 0)
result_extended = True
task_track_started = True

# Task events: off until a monitor asks for them (Celery's default). Flower does, every 5 s (its --enable_events,
# on by default), and so does `celery -A tasks control enable_events`. task-sent events are the publisher's, and
# always sent; a job's progress events too (see docs/monitoring.md).
worker_send_task_events = _flag("TILEREC_TASK_EVENTS", "false")
task_send_sent_event = True

# tilerec's own settings (not Celery's), read once per process into tasks.celery.AppSettings.
tilerec_tile_ttl = _number("TILEREC_TILE_TTL", 3600, 1)
# the largest image (or region) accepted, in pixels; 0: the readers' own limit (40,000², pipeline.readers.images)
tilerec_max_pixels = _number("TILEREC_MAX_PIXELS", 0, 0)
tilerec_allowed_roots = _env("TILEREC_ALLOWED_ROOTS", "")
# Images may be URLs (s3://bucket/key, gs://, az://, https://) only under these prefixes (comma or space separated,
# e.g. "s3://scans s3://tiles/public/"); empty: no URL is read. Credentials: the environment or fsspec's config.
tilerec_allowed_urls = _env("TILEREC_ALLOWED_URLS", "")
# Tile tasks read their own windows of a tiled TIFF straight from the file (no pixels through Redis); set "false"
# when the workers taking the tiles queue do not see the allowed roots at the same paths as the tiling worker.
tilerec_shared_storage = _flag("TILEREC_SHARED_STORAGE", "true")
# A result whose JSON is larger than this (bytes) is stored under tilerec:result:<job id> in the tile store, and the
# result backend gets a summary with `result_ref` (tasks.client.Job.get fetches it). -1: never; 0: always.
tilerec_result_inline_max_bytes = _number("TILEREC_RESULT_INLINE_MAX_BYTES", 4 * 2**20, -1)
# Admission control: the most the tile store's Redis may hold (bytes). A job whose tiles would take it past this
# (Redis's used memory, plus what running jobs reserved and have not stored, less 5% headroom) waits for room; one
# that could never fit is refused. 0: Redis's own maxmemory (no maxmemory either: no limit); Redis's maxmemory still
# applies when this is higher.
tilerec_store_max_bytes = _number("TILEREC_STORE_MAX_BYTES", 0, 0)
# A Redis that evicts keys (a maxmemory-policy other than noeviction) would drop tiles, messages and chord counts
# silently: a worker refuses to start against one, unless this is "true" (you know its data will never be evicted).
tilerec_allow_eviction = _flag("TILEREC_ALLOW_EVICTION", "false")
# where recognizers find their model files when a job names none: their own files, else this folder
tilerec_model_dir = _env("TILEREC_MODEL_DIR", "")
tilerec_model_files = {"TILEREC_YUNET_MODEL": _env("TILEREC_YUNET_MODEL", ""),
                       "TILEREC_OBJECTS_MODEL": _env("TILEREC_OBJECTS_MODEL", "")}  # fmt: skip
# files a job may name as recognizer parameters (models, label lists): only under these folders (os.pathsep list)
tilerec_model_roots = os.pathsep.join(
    root for root in (tilerec_model_dir, os.environ.get("TILEREC_MODEL_ROOTS", "")) if root
)
# the modules `package.module:factory` recognizer names may import (comma list): a message names the module, and
# importing it runs its code, so only these
tilerec_plugin_modules = _env("TILEREC_PLUGIN_MODULES", "")


def _auto_or_count(name: str) -> int | None:
    """An environment variable that is "auto" (None) or a whole number of at least 1."""
    value = _env(name, "auto").strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"{name} must be 'auto' or a whole number of at least 1, got {value!r}")
    return None if value == "auto" else int(value)


# batch_size "auto": about this much recognizer work per batch of tiles (ms), and at least this many batches per job
# ("auto": 4 per process of the node that tiles the job)
tilerec_batch_target_ms = _number("TILEREC_BATCH_TARGET_MS", 400, 1, float)
tilerec_min_batches = _auto_or_count("TILEREC_MIN_BATCHES")
tilerec_threads_per_process = _number("TILEREC_THREADS_PER_PROCESS", 0, 0)  # 0: cores / worker processes
# worker processes keep freed tile buffers in their heap (glibc mallopt; see pipeline/memory.py): fewer page faults
tilerec_keep_freed_buffers = _flag("TILEREC_KEEP_FREED_BUFFERS", "true")
# ONNX Runtime execution providers of the `objects` sessions, most preferred first (comma list, e.g.
# CUDAExecutionProvider,CPUExecutionProvider; CUDA needs onnxruntime-gpu, the `gpu` extra), and the device number
# the GPU ones use. One this onnxruntime lacks is left out with a warning, or with strict the recognizer refuses.
tilerec_onnx_providers = _env("TILEREC_ONNX_PROVIDERS", "CPUExecutionProvider")
tilerec_device = _number("TILEREC_DEVICE", 0, 0)
tilerec_onnx_providers_strict = _flag("TILEREC_ONNX_PROVIDERS_STRICT", "false")
# Where `tilerec` without a broker keeps its private Redis's data when galleries of people are involved (`tilerec
# gallery`, `run --identify`): append-only, so people enrolled in one run are there in the next (docs/faces.md).
tilerec_local_data = os.path.expanduser(_env("TILEREC_LOCAL_DATA", "~/.local/share/tilerec"))
