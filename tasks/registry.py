"""The live tile worker processes, so a job's tiling task can cut the job into as many tasks as the cluster that will
run them needs: enough for every process to get a share, not so many that small clusters pay per-task overhead.

Each worker node that consumes the tiles queue keeps one field of the hash tilerec:tile-processes:<queue> fresh:
its hostname -> "<processes> <expiry>", rewritten every REFRESH_S and removed when the node stops. A node that dies
without stopping lapses after LAPSE_S. Expiry times are the Redis server's clock, so the nodes' clocks may differ.
The hash itself expires with its last field, so a cluster that stopped or died leaves nothing behind.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import bootsteps

from tasks import store

REFRESH_S = 10.0
LAPSE_S = 30.0

log = logging.getLogger(__name__)

_NOW_MS = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

_REGISTER = (
    _NOW_MS
    + """
local lapse = math.floor(1000 * tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + lapse))
if redis.call('PTTL', KEYS[1]) < lapse then  -- the hash lives as long as its longest-lived field
    redis.call('PEXPIRE', KEYS[1], lapse)
end
"""
)

_COUNT = (
    _NOW_MS
    + """
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
    local processes, expiry = string.match(fields[i + 1], '^(%d+) (%d+)$')
    if processes and tonumber(expiry) > now then
        total = total + tonumber(processes)
    else
        redis.call('HDEL', KEYS[1], fields[i])
    end
end
return total
"""
)


def registry_key(queue: str) -> str:
    return f"tilerec:tile-processes:{queue}"


def register(client: redis.Redis, queue: str, node: str, processes: int, lapse_s: float = LAPSE_S) -> None:
    """`node` runs `processes` processes on `queue` for the next `lapse_s` seconds (unless it registers again)."""
    client.eval(_REGISTER, 1, registry_key(queue), node, int(processes), lapse_s)


def unregister(client: redis.Redis, queue: str, node: str) -> None:
    client.hdel(registry_key(queue), node)


def live_processes(client: redis.Redis, queue: str) -> int:
    """The processes of the nodes registered on `queue` and not lapsed (lapsed ones are dropped on the way)."""
    return int(client.eval(_COUNT, 1, registry_key(queue)))


class TileProcessRegistry(bootsteps.StartStopStep):
    """A worker step: registers the node's pool while it consumes the tiles queue. Starts after the pool and before
    the consumer, so the node is counted before it takes its first task."""

    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")

    def __init__(self, worker: Any, **_: Any) -> None:
        self.refresher: Any = None

    def start(self, worker: Any) -> None:
        self.refresh(worker)
        self.refresher = worker.timer.call_repeatedly(REFRESH_S, self.refresh, (worker,))

    def stop(self, worker: Any) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
            self.refresher = None
        try:
            unregister(_client(worker), worker.app.conf.tiles_queue, worker.hostname)
        except redis.RedisError as error:  # it lapses on its own
            log.warning("could not unregister %s from the tile worker registry: %s", worker.hostname, error)

    def refresh(self, worker: Any) -> None:
        queue = worker.app.conf.tiles_queue
        try:
            if consumes(worker, queue):
                register(_client(worker), queue, worker.hostname, worker.pool.num_processes, LAPSE_S)
            else:  # e.g. the queue was cancelled with `celery control cancel_consumer`
                unregister(_client(worker), queue, worker.hostname)
        except redis.RedisError as error:  # the node lapses meanwhile: jobs size their tasks for the others
            log.warning("could not register %s in the tile worker registry: %s", worker.hostname, error)


def consumes(worker: Any, queue: str) -> bool:
    """Whether `worker`'s node takes tasks from `queue` (in a pool process: as it did when the process started)."""
    return queue in _consumed_queues(worker)


def _consumed_queues(worker: Any) -> set[str]:
    consumer = getattr(getattr(worker, "consumer", None), "task_consumer", None)
    queues = consumer.queues if consumer is not None else worker.app.amqp.queues.consume_from.values()
    return {queue.name for queue in queues}


def _client(worker: Any) -> redis.Redis:
    return store.connect(worker.app.conf.tilerec_store_url)
