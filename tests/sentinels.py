"""Redis with Sentinel, for real: a master, a replica and three `redis-sentinel` processes on free loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tasks.local import RedisServer, Tls, _die_with_parent, _stop, _wait, find_redis_server, free_port

MASTER = "mymaster"


class SentinelGroup:
    """One master, one replica, three sentinels (quorum 2) that fail over 1 s after the master stops answering;
    `tls`: all of them speak TLS only (clients then need celeryconfig's TILEREC_SENTINEL_TLS_* variables, `env`)."""

    def __init__(self, tls: Tls | None = None) -> None:
        self.tls = tls
        self.master = RedisServer(appendonly=True, tls=tls)
        self.replica = RedisServer(
            appendonly=True, tls=tls, options=["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.ports = [free_port() for _ in range(3)]
        self.folder = Path(tempfile.mkdtemp(prefix="tilerec-sentinel-"))
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The broker, backend and store URL: every sentinel, database 0."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)

    def env(self) -> dict[str, str]:
        """The variables that give clients the sentinels' TLS (none without it)."""
        if self.tls is None:
            return {}
        files = {"TILEREC_SENTINEL_TLS_CA": self.tls.ca, "TILEREC_SENTINEL_TLS_CERT": self.tls.client_cert,
                 "TILEREC_SENTINEL_TLS_KEY": self.tls.client_key}  # fmt: skip
        return {name: path for name, path in files.items() if path}

    def sentinel(self, index: int = 0) -> redis.Redis:
        if self.tls is None:
            return redis.Redis(port=self.ports[index], socket_timeout=2)
        return redis.Redis(port=self.ports[index], socket_timeout=2, ssl=True, ssl_cert_reqs="required",
                           ssl_ca_certs=self.tls.ca, ssl_certfile=self.tls.client_cert,
                           ssl_keyfile=self.tls.client_key)  # fmt: skip

    def master_port(self) -> int:
        """The master's port, as the sentinels see it now."""
        return int(self.sentinel().sentinel_get_master_addr_by_name(MASTER)[1])

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        _wait(lambda: self.replica.client().info("replication").get("master_link_status") == "up", 20, "the replica")
        binary = shutil.which("redis-sentinel") or find_redis_server()
        for port in self.ports:
            config = self.folder / f"sentinel-{port}.conf"
            listen = f"port {port}\n"
            if self.tls is not None:  # redis-server's TLS options are sentinel's too, as directives
                options = self.tls.server_options()
                listen = f"port 0\ntls-port {port}\n" + "".join(
                    f"{name[2:]} {value}\n" for name, value in zip(options[::2], options[1::2], strict=True)
                )
            config.write_text(
                f"{listen}bind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                # a failed election is tried again after twice the failover timeout: at 10 s, one failed vote on a
                # loaded machine made the failover outlast the store clients' ~30 s of retries
                f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 4000\n"
            )
            command = [binary, str(config)] + ([] if binary.endswith("redis-sentinel") else ["--sentinel"])
            quiet = subprocess.DEVNULL
            started = subprocess.Popen(
                command, stdout=quiet, stderr=quiet, start_new_session=True, preexec_fn=_die_with_parent
            )
            self.sentinels.append(started)
        for index in range(3):
            _wait(lambda i=index: self._knows_replica(i), 20, "the sentinels")
        return self

    def _knows_replica(self, index: int) -> bool:
        """This sentinel sees the replica and the two other sentinels: it can take part in a failover."""
        try:
            sentinel = self.sentinel(index)
            return bool(sentinel.sentinel_slaves(MASTER)) and len(sentinel.sentinel_sentinels(MASTER)) == 2
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for process in self.sentinels:
            _stop(process, 5)
        self.master.stop()
        self.replica.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
