"""Where jobs run: an existing cluster (checked reachable within seconds) or a private one, always stopped on
the way out; and `tilerec worker`, which becomes `celery -A tasks worker`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import redis
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url
from rich.console import Console

from pipeline.recognizers import usable_cpus
from tasks.cli.errors import EXIT_FAILED, EXIT_UNREACHABLE, CliError, say
from tasks.cli.inputs import Target
from tasks.cli.settings import RunSettings, environment_with

PING_TIMEOUT_S = 3.0  # an unreachable broker is reported after this, instead of Celery retrying for ever
WORKER_STOP_S = 1.0  # the private cluster holds nothing worth a warm shutdown's wait


@dataclass
class Cluster:
    """What jobs need from a cluster: the store's URL, how images are referenced, and a health check."""

    store_url: str
    upload: bool
    remote: bool
    check: Callable[[], None] = lambda: None
    processes: int | None = None  # worker processes, when known without asking (the private cluster's)


def sanitize(url: str) -> str:
    """A URL with its password masked, fit for messages."""
    return str(maybe_sanitize_url(url))


def ping(url: str, what: str, timeout: float = PING_TIMEOUT_S) -> None:
    """Connect once with a short timeout: Celery itself would retry an unreachable broker for ever."""
    if url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        except ValueError as error:
            raise CliError(f"bad {what} URL {sanitize(url)!r}: {error}") from None
        try:
            client.ping()
        except redis.RedisError as error:
            from tasks.store import tls_refused

            reason = tls_refused(error) or error
            raise CliError(f"cannot reach the {what} at {sanitize(url)}: {reason}", EXIT_UNREACHABLE) from None
        finally:
            client.close()
        return
    from celeryconfig import tls_for_sentinel
    from tasks.celery import app

    try:  # sentinel:// among others: the broker's own transport options name the master
        options = app.conf.broker_transport_options
        with Connection(url, connect_timeout=timeout, transport_options=options,
                        ssl=tls_for_sentinel(url) or False) as connection:  # fmt: skip
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as error:  # kombu raises transport-specific errors
        raise CliError(f"cannot reach the {what} at {sanitize(url)}: {error}", EXIT_UNREACHABLE) from None


def configure_app(broker: str, backend: str, store_url: str) -> None:
    """Point this process's Celery app (which reads celeryconfig lazily) at the cluster before anything is sent."""
    from celeryconfig import tls_for_sentinel
    from tasks.celery import configure

    configure(
        broker_url=broker,
        result_backend=backend,
        tilerec_store_url=store_url,
        broker_use_ssl=tls_for_sentinel(broker),
        redis_backend_use_ssl=tls_for_sentinel(backend),
        broker_connection_timeout=PING_TIMEOUT_S,
        redis_socket_connect_timeout=PING_TIMEOUT_S,
    )


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C during it would orphan the processes it is stopping."""
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to block
        previous = {number: signal.signal(number, signal.SIG_IGN) for number in caught}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def remote_cluster(broker: str, settings: RunSettings, console: Console) -> Iterator[Cluster]:
    """An existing cluster: checked reachable within seconds, then used as is."""
    from celeryconfig import backend_and_store

    backend, store_url = backend_and_store(broker)
    ping(broker, "broker")
    if backend.split(":", 1)[0] in ("redis", "rediss") and backend != broker:
        ping(backend, "result backend")
    if store_url not in (broker, backend):
        ping(store_url, "tile store")
    configure_app(broker, backend, store_url)
    if not settings.quiet:
        warn_if_no_worker(console, broker)
    yield Cluster(store_url, upload=not settings.shared_path, remote=True)


def warn_if_no_worker(console: Console, broker: str) -> None:
    """Jobs sent where no worker listens wait silently; say so (but still submit: a worker may be starting)."""
    from tasks import app

    with contextlib.suppress(Exception):
        if not app.control.ping(timeout=1.0, limit=1):  # returns at the first reply
            say(console, f"tilerec: warning: no worker answered on {sanitize(broker)}; jobs wait until one starts")


@contextlib.contextmanager
def local_data(keep: bool) -> Iterator[str | None]:
    """The folder where the private Redis keeps its data (TILEREC_LOCAL_DATA), held by this process alone while it
    runs (two servers appending to one file would corrupt it); None when nothing is to be kept."""
    if not keep:
        yield None
        return
    from tasks.celery import app

    folder = Path(app.conf.tilerec_local_data)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / "lock", "w")  # noqa: SIM115  (held until the cluster stops)
    except OSError as error:
        raise CliError(f"cannot keep galleries in {str(folder)!r} (TILEREC_LOCAL_DATA): {error.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CliError(
                f"another tilerec is using the galleries in {folder} (TILEREC_LOCAL_DATA); wait for it to end, or "
                "use --broker"
            ) from None
        yield str(folder)


@contextlib.contextmanager
def local_store() -> Iterator[Cluster]:
    """The private cluster's Redis alone, with its kept data (the galleries), for what needs no worker."""
    from tasks.local import RedisServer

    with local_data(True) as folder:
        server = RedisServer(workdir=folder)
        try:
            server.start()
        except (RuntimeError, OSError) as error:
            raise CliError(f"could not start the local Redis: {error}", EXIT_UNREACHABLE) from None
        try:
            configure_app(server.url, server.url, server.url)
            yield Cluster(server.url, upload=False, remote=False)
        finally:
            with ignoring_interrupts():
                server.stop()


@contextlib.contextmanager
def local_cluster(targets: Sequence[Target], settings: RunSettings, console: Console) -> Iterator[Cluster]:
    """A private redis-server and celery worker for this run, always stopped on the way out."""
    with local_data(settings.keep_data) as folder, _local_cluster(targets, settings, console, folder) as cluster:
        yield cluster


@contextlib.contextmanager
def _local_cluster(
    targets: Sequence[Target], settings: RunSettings, console: Console, data: str | None
) -> Iterator[Cluster]:
    from tasks.local import LocalCluster

    handle, name = tempfile.mkstemp(prefix="tilerec-worker-", suffix=".log")
    os.close(handle)
    log = Path(name)
    roots = os.pathsep.join(sorted({str(target.path.parent) for target in targets if target.path is not None}))
    cluster = LocalCluster(workers=settings.workers, log_file=str(log), env={"TILEREC_ALLOWED_ROOTS": roots}, data=data)
    keep_log = False
    try:
        start_local(cluster, log, console, settings.quiet)

        def check() -> None:
            nonlocal keep_log
            process = cluster.worker.process if cluster.worker else None
            if process is None or process.poll() is not None:
                keep_log = True
                code = process.returncode if process else "?"
                raise CliError(f"the local worker stopped unexpectedly (exit code {code}); its log: {log}", EXIT_FAILED)

        yield Cluster(cluster.url, upload=False, remote=False, check=check, processes=cluster.workers)
    except CliError as error:
        keep_log = keep_log or error.code == EXIT_UNREACHABLE
        raise
    finally:
        with ignoring_interrupts():
            if cluster.worker is not None:
                cluster.worker.stop(timeout=WORKER_STOP_S)
            cluster.stop()
            if not keep_log:
                log.unlink(missing_ok=True)


def start_local(cluster: Any, log: Path, console: Console, quiet: bool) -> None:
    """Start the private cluster; its workers get the private URLs, whatever TILEREC_* this shell has set."""
    url = cluster.url
    cluster.env.update(TILEREC_BROKER_URL=url, TILEREC_RESULT_BACKEND=url, TILEREC_STORE_URL=url)
    if not quiet:
        say(console, f"tilerec: starting a local cluster ({cluster.workers} worker processes, Redis at {url})")
    try:
        cluster.start()
    except (RuntimeError, OSError) as error:  # TimeoutError is an OSError
        raise CliError(f"could not start the local cluster: {error}; worker log: {log}", EXIT_UNREACHABLE) from None
    configure_app(url, url, url)


@contextlib.contextmanager
def open_cluster(targets: Sequence[Target], settings: RunSettings, console: Console) -> Iterator[Cluster]:
    if settings.broker:
        with remote_cluster(settings.broker, settings, console) as cluster:
            yield cluster
    else:
        with local_cluster(targets, settings, console) as cluster:
            yield cluster


def worker_command(args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`celery -A tasks worker ARGS`, with two additions. `--broker URL` is set as TILEREC_BROKER_URL (for celery
    it is a global option that must come before `worker`; the result backend and store follow it unless their own
    variables are set). `--concurrency auto` (or `-c auto`) becomes the number of usable CPUs."""
    rest, broker = [], None
    items = iter(args)
    for item in items:
        name, has_value, value = item.partition("=") if item.startswith("--") else (item, "", "")
        if name not in ("--broker", "--concurrency", "-c"):
            rest.append(item)
            continue
        value = value if has_value else next(items, "")
        if not value:
            raise CliError(f"tilerec worker: {name} needs a value")
        if name == "--broker":
            broker = value
        else:
            rest += [name, str(usable_cpus()) if value == "auto" else value]
    env = environment_with({"TILEREC_BROKER_URL": broker} if broker else {})
    return [sys.executable, "-m", "celery", "-A", "tasks", "worker", *rest], env


def exec_worker(args: Sequence[str]) -> NoReturn:
    """Replace this process with the worker, so signals from a supervisor reach celery directly."""
    command, env = worker_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
