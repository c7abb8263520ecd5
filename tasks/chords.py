"""Celery's Redis result backends with four fault windows of a chord closed (celery/celery#4207 tracks chords whose
callback is never called). Used by tilerec's workers; results and keys stay Celery's own.

1. Celery stores a header task's SUCCESS, then counts it for its chord. A process killed in between has its task
   acknowledged on redelivery (the SUCCESS is there), and the chord waits forever for a part that is never counted.
   Here the part is counted first: killed in between, the task comes back and counts once (Celery keys the count
   by task id), then stores its result.
2. The last part claims the chord's callback (a key that lapses after about 10 s), then publishes it. Killed in
   between, its task comes back and is counted again, but the claim is still held, so it does not publish, and no
   other part ever comes. Here a redelivered part waits for such a claim to be released or to lapse and then counts
   once more, which claims and publishes the callback.
3. Celery counts a part with one Lua call, not retried: a Redis restart at that moment failed the chord. Here it is
   retried with backoff, like the worker's other Redis writes (Celery counts a part once however often it runs).
4. Redis replicates asynchronously: a master killed just after counting a part can lose the count in a failover,
   and its task, acknowledged, never comes back, so the chord waits forever. Here a count waits (up to
   REPLICA_WAIT_MS) for the master's replicas to have it; a master that dies first fails the wait, and the part is
   counted again on the new one.

tests/test_reliability.py kills a process in each of the first two windows (both tests fail without this module)
and restarts Redis under running jobs.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import states
from celery.backends import redis as celery_redis
from celery.backends.base import _is_request_ignore_result

CLAIM_WAIT_S = 120.0  # at most: a claim lasts 2 × the join timeout, then the time its publish retries may take
REPLICA_WAIT_MS = 1000  # a replica slower than this: the count goes on without it (the window narrowed, not shut)
REPLICAS_CHECK_S = 10.0  # how long a process trusts its master's count of replicas


class _ChordSafe:
    """Mixed into Celery's RedisBackend and SentinelBackend."""

    def mark_as_done(
        self, task_id: str, result: Any, request: Any = None, store_result: bool = True, state: str = states.SUCCESS
    ) -> None:
        if request and request.chord:
            self.on_chord_part_return(request, state, result)
        if store_result and not _is_request_ignore_result(request):
            self.store_result(task_id, result, state, request=request)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        retried = self._count(request, state, result, **kwargs)
        if not request.group or not (retried or (request.delivery_info or {}).get("redelivered")):
            return
        claim = self.get_key_for_group(request.group, ".c")  # type: ignore[attr-defined]
        lapses = max(0, self.client.pttl(claim)) / 1000 + 1  # type: ignore[attr-defined]
        deadline = time.monotonic() + min(lapses, CLAIM_WAIT_S)
        while (held := self.client.get(claim)) not in (None, b"done") and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.2)
        if held is None:  # lapsed (or never taken: the chord is not complete, and counting again changes nothing)
            self._count(request, state, result, **kwargs)

    def _count(self, request: Any, state: str, result: Any, **kwargs: Any) -> bool:
        """Celery's count of the part, retried while Redis is unreachable (restarting, loading, failing over): it
        counts a part once, however often it runs. Returns whether it had to retry (a claim it took in an attempt
        whose reply was lost is then held by nobody)."""
        retries = int(self.app.conf.tilerec_redis_retries)  # type: ignore[attr-defined]
        for attempt in range(retries + 1):
            try:
                super().on_chord_part_return(request, state, result, **kwargs)  # type: ignore[misc]
                self._replicated()
                return attempt > 0
            except (redis.ConnectionError, redis.TimeoutError):
                if attempt == retries:
                    raise
                time.sleep(min(2.0, 0.1 * 2 ** (attempt + 1)))
        return False

    def _replicated(self) -> None:
        """Wait until the master's replicas have this connection's writes (the count), where it has replicas."""
        now = time.monotonic()
        if now >= getattr(self, "_replicas_until", 0.0):
            replication = self.client.info("replication")  # type: ignore[attr-defined]
            self._replicas, self._replicas_until = int(replication.get("connected_slaves", 0)), now + REPLICAS_CHECK_S
        if self._replicas:
            self.client.wait(self._replicas, REPLICA_WAIT_MS)  # type: ignore[attr-defined]


class RedisBackend(_ChordSafe, celery_redis.RedisBackend):
    pass


class SentinelBackend(_ChordSafe, celery_redis.SentinelBackend):
    pass
