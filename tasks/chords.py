"""Celery's Redis result backends with two crash windows of a chord closed (celery/celery#4207 tracks chords whose
callback is never called). Used by tilerec's workers; results and keys stay Celery's own.

1. Celery stores a header task's SUCCESS, then counts it for its chord. A process killed in between has its task
   acknowledged on redelivery (the SUCCESS is there), and the chord waits forever for a part that is never counted.
   Here the part is counted first: killed in between, the task comes back and counts once (Celery keys the count
   by task id), then stores its result.
2. The last part claims the chord's callback (a key that lapses after about 10 s), then publishes it. Killed in
   between, its task comes back and is counted again, but the claim is still held, so it does not publish, and no
   other part ever comes. Here a redelivered part waits for such a claim to be released or to lapse and then counts
   once more, which claims and publishes the callback.

tests/test_reliability.py kills a process in each window; both tests fail without this module.
"""

from __future__ import annotations

import time
from typing import Any

from celery import states
from celery.backends import redis as celery_redis
from celery.backends.base import _is_request_ignore_result

CLAIM_WAIT_S = 60.0  # longer than Celery's claim can be held: 2 × the join timeout, then the publish retries


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
        super().on_chord_part_return(request, state, result, **kwargs)  # type: ignore[misc]
        if not request.group or not (request.delivery_info or {}).get("redelivered"):
            return
        claim = self.get_key_for_group(request.group, ".c")  # type: ignore[attr-defined]
        deadline = time.monotonic() + CLAIM_WAIT_S
        while (held := self.client.get(claim)) not in (None, b"done") and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.2)
        if held is None:  # lapsed (or never taken: the chord is not complete, and counting again changes nothing)
            super().on_chord_part_return(request, state, result, **kwargs)  # type: ignore[misc]


class RedisBackend(_ChordSafe, celery_redis.RedisBackend):
    pass


class SentinelBackend(_ChordSafe, celery_redis.SentinelBackend):
    pass
