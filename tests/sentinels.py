"""Redis with Sentinel, for real: a master, a replica and three `redis-sentinel` processes on free loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from tasks.local import RedisServer, _die_with_parent, _stop, _wait, find_redis_server, free_port

MASTER = "mymaster"


class SentinelGroup:
    """One master, one replica, three sentinels (quorum 2) that fail over 1 s after the master stops answering."""

    def __init__(self) -> None:
        self.master = RedisServer(appendonly=True)
        self.replica = RedisServer(appendonly=True, options=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.ports = [free_port() for _ in range(3)]
        self.folder = Path(tempfile.mkdtemp(prefix="tilerec-sentinel-"))
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The broker, backend and store URL: every sentinel, database 0."""
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.ports)

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.ports[index], socket_timeout=2)

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
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 10000\n"
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
