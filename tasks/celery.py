"""tilerec's Celery app, configured from celeryconfig; its own settings, read once per process; its worker processes'
set-up."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals
from celery.worker.control import inspect_command
from kombu.transport import redis as redis_transport
from kombu.utils.url import maybe_sanitize_url

from pipeline.memory import keep_freed_buffers
from pipeline.readers import images, remote
from pipeline.readers.geo import GDAL_DEFAULTS
from pipeline.recognizers import limit_threads, restrict_file_params, usable_cpus
from pipeline.recognizers.dnn import configure_execution, configure_models, current_execution
from pipeline.recognizers.plugins import allow_modules, module_list
from tasks import store
from tasks.leases import Leases
from tasks.roster import roster_step

STARTUP_WAIT_S = 30.0  # a worker waits this long for its Redis to answer before it starts without checking it
log = logging.getLogger(__name__)


class _QoS(redis_transport.QoS):
    """kombu's Redis QoS, whose restoring of unacknowledged messages when a channel closes survives a connection
    already let go. When the broker drops mid-task, kombu 5.7 can close the channel after its transport's client is
    gone, and the restore then raises AttributeError ('NoneType' ... 'hostname'): an "Unrecoverable error" that
    ends the worker. The messages stay in the unacked hash, which the visibility timeout restores."""

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        try:
            return super().restore_unacked_once(stderr)
        except AttributeError:
            if getattr(self.channel.connection, "client", None) is not None:
                raise
            log.warning("tilerec: the broker connection was gone before its unacknowledged messages could be put "
                        "back; the visibility timeout (%s s) puts them back", app.conf.broker_transport_options.get(
                            "visibility_timeout"))  # fmt: skip
            return None


redis_transport.Channel.QoS = _QoS  # the Sentinel channel too: it inherits Channel's
app = Celery("tilerec")
app.config_from_object("celeryconfig")
app.steps["consumer"].add(Leases)
app.steps["consumer"].add(roster_step(lambda: store_client(patient=False)))  # defined below, called later
app.steps["consumer"].add("tasks.stalls:StallWatch")  # by name: it imports this module


@dataclass(frozen=True)
class AppSettings:
    """celeryconfig's tilerec_* settings, typed (their meanings are documented there and in docs/configuration.md)."""

    store_url: str
    tile_ttl: int
    max_pixels: int
    allowed_roots: tuple[Path, ...]
    allowed_urls: tuple[str, ...]
    model_roots: tuple[Path, ...]
    model_dir: str
    model_files: dict[str, str]  # by the variable a recognizer names
    plugin_modules: tuple[str, ...]
    shared_storage: bool
    result_inline_max_bytes: int
    result_expires: int
    batch_target_ms: float
    min_batches: int | None  # None: auto
    threads_per_process: int
    keep_freed_buffers: bool
    onnx_providers: tuple[str, ...]
    device: int
    onnx_providers_strict: bool
    store_max_bytes: int  # 0: Redis's maxmemory alone
    allow_eviction: bool
    redis_retries: int  # a store command's, while Redis restarts or fails over

    @classmethod
    def of(cls, conf: Any) -> AppSettings:
        return cls(
            store_url=conf.tilerec_store_url,
            tile_ttl=int(conf.tilerec_tile_ttl),
            max_pixels=int(conf.tilerec_max_pixels) or images.DEFAULT_MAX_PIXELS,
            allowed_roots=tuple(images.roots_from(conf.tilerec_allowed_roots)),
            allowed_urls=tuple(remote.allowed_urls_from_env(conf.tilerec_allowed_urls)),
            model_roots=tuple(images.roots_from(conf.tilerec_model_roots)),
            model_dir=conf.tilerec_model_dir,
            model_files=dict(conf.tilerec_model_files),
            plugin_modules=module_list(conf.tilerec_plugin_modules),
            shared_storage=bool(conf.tilerec_shared_storage),
            result_inline_max_bytes=int(conf.tilerec_result_inline_max_bytes),
            result_expires=int(conf.result_expires or 0),
            batch_target_ms=float(conf.tilerec_batch_target_ms),
            min_batches=conf.tilerec_min_batches,
            threads_per_process=int(conf.tilerec_threads_per_process),
            keep_freed_buffers=bool(conf.tilerec_keep_freed_buffers),
            onnx_providers=tuple(name.strip() for name in conf.tilerec_onnx_providers.split(",") if name.strip()),
            device=int(conf.tilerec_device),
            onnx_providers_strict=bool(conf.tilerec_onnx_providers_strict),
            store_max_bytes=int(conf.tilerec_store_max_bytes),
            allow_eviction=bool(conf.tilerec_allow_eviction),
            redis_retries=int(conf.tilerec_redis_retries),
        )


_settings: AppSettings | None = None


def settings() -> AppSettings:
    """This process's settings, read from the app's configuration on first use."""
    global _settings
    if _settings is None:
        _settings = AppSettings.of(app.conf)
    return _settings


def configure(**changes: Any) -> None:
    """Change this process's configuration (Celery's settings and tilerec_* ones): a CLI pointing at its cluster, a
    test at its Redis. The one way to do so once anything was read."""
    global _settings
    app.conf.update(**changes)
    _settings = None


def store_client(patient: bool = True) -> redis.Redis:
    """The tile store's client (`store.connect`), patient for TILEREC_REDIS_PATIENCE_S; `patient=False` for a
    caller that must not block."""
    retries = settings().redis_retries if patient else 0
    return store.connect(settings().store_url, app.conf.sentinel_master, sentinel_options(), retries)


def sentinel_options() -> tuple[tuple[str, Any], ...]:
    """celeryconfig's sentinel_kwargs as store.connect takes them."""
    return tuple(sorted(app.conf.sentinel_kwargs.items()))


_worker: Any = None


@signals.worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    global _worker
    _worker = sender


def pool_size() -> int:
    """The worker processes of this node (1 outside a worker)."""
    return int(getattr(_worker, "concurrency", None) or 1)


def others_recognize() -> bool:
    """Other processes than this one recognize tiles: this node has more, or takes no tiles itself (`-Q`)."""
    return pool_size() > 1 or (_worker is not None and app.conf.tiles_queue not in app.amqp.queues.consume_from)


@signals.worker_process_init.connect
def _set_up_process(**_: Any) -> None:
    """No task-sent events; processes × threads = cores (OpenCV would give every worker process all the cores);
    files named in messages confined to the model folders; freed tile buffers kept (pipeline/memory.py)."""
    # a worker's own messages (batches, merges, retries) are received at once: their task-sent events would cost
    # a publish each and tell a monitor little (a client's jobs still send theirs)
    app.conf.task_send_sent_event = False
    limit_threads(settings().threads_per_process or max(1, usable_cpus() // pool_size()))
    restrict_file_params(settings().model_roots)
    if settings().keep_freed_buffers:
        keep_freed_buffers()


@signals.celeryd_after_setup.connect
def _set_up_execution(**_: Any) -> None:
    """ONNX Runtime's providers settled in the worker's main process, after its logging is set up and before its
    pool forks: a provider this node lacks is warned about once in its log, not once per process, and every process
    inherits the result (no session is built here, so no GPU context crosses the fork)."""
    configure_execution(settings().onnx_providers, settings().device, settings().onnx_providers_strict)


@signals.celeryd_after_setup.connect
def _set_up_pipeline(**_: Any) -> None:
    """The pipeline's process-wide settings, from this worker's, in its main process before its pool forks (every
    process inherits them, whatever the pool): the modules `module:factory` names may import, where models are
    found, and GDAL's defaults where the operator set none (GDAL reads its own variables when it first reads)."""
    allow_modules(settings().plugin_modules)
    configure_models(settings().model_dir, settings().model_files)
    for name, value in GDAL_DEFAULTS.items():
        os.environ.setdefault(name, value)


def redis_urls() -> list[str]:
    """The Redis servers this process uses (broker, result backend, tile store), each once."""
    backend = str(app.conf.result_backend or "")
    backend = backend.split("+", 1)[1] if backend.startswith("tasks.chords:") else backend
    urls = [str(app.conf.broker_url), backend, settings().store_url]
    return list(dict.fromkeys(url for url in urls if url.split(":", 1)[0] in ("redis", "rediss", "sentinel")))


def _memory_of(url: str) -> store.Memory | None:
    """The Redis's memory settings, waiting up to STARTUP_WAIT_S for it to answer (None: it did not, or may not
    tell). Raises SystemExit, one line, when it refuses this worker: a wrong password or certificate."""
    named = maybe_sanitize_url(url)
    deadline = time.monotonic() + STARTUP_WAIT_S
    while True:
        try:
            if url.startswith("sentinel:"):
                client = store.connect(url, app.conf.sentinel_master, sentinel_options(), settings().redis_retries)
            else:  # no retries: a wrong password is said at once
                client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
            return store.memory(client)
        except redis.AuthenticationError as error:
            raise SystemExit(f"tilerec: the Redis at {named} refused this worker: {error}") from None
        except redis.ConnectionError as error:
            if refused := store.tls_refused(error):
                raise SystemExit(f"tilerec: no TLS connection to the Redis at {named}: {refused}") from None
            if time.monotonic() > deadline:
                log.warning("tilerec: the Redis at %s did not answer (%s): its eviction policy is unchecked", named,
                            error)  # fmt: skip
                return None
            time.sleep(1)
        except redis.ResponseError as error:  # INFO not allowed to this user (ACL)
            log.warning("tilerec: cannot read the memory settings of the Redis at %s: %s", named, error)
            return None


@signals.celeryd_after_setup.connect
def _check_redis(**_: Any) -> None:
    """A worker refuses to start against a Redis that evicts keys (tiles, messages and chord counts would vanish
    silently) unless TILEREC_ALLOW_EVICTION says the operator knows, or one that refuses it (password, TLS)."""
    for url in redis_urls():
        found = _memory_of(url)
        if found is None or found.policy in ("noeviction", ""):
            continue
        reason = (
            f"the Redis at {maybe_sanitize_url(url)} evicts keys when full (maxmemory-policy {found.policy}): tilerec "
            "keeps tiles, messages and chord counts there, which would vanish silently"
        )
        if not settings().allow_eviction:
            raise SystemExit(
                f"tilerec: {reason}; set `maxmemory-policy noeviction` (tilerec then waits for room instead), or "
                "TILEREC_ALLOW_EVICTION=true if you know nothing of tilerec's is ever evicted"
            )
        log.warning("tilerec: %s (allowed by TILEREC_ALLOW_EVICTION)", reason)


@inspect_command()
def tilerec_execution(state: Any, **_: Any) -> dict[str, Any]:
    """Where this node's ONNX Runtime sessions run: the providers its onnxruntime has, the configured ones, those
    used; `tilerec recognizers --json` asks every worker (`app.control.broadcast("tilerec_execution", reply=True)`)."""
    return current_execution().to_json()
