"""Submitting jobs from Python: store bytes or arrays in Redis, submit, follow progress, get the result."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from celery.exceptions import TimeoutError
from celery.result import AsyncResult

from pipeline.images import encode_array
from tasks import store
from tasks.celery import settings, store_client
from tasks.jobs import recognize

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)  # a Redis restarting, loading its data or failing over
LOST_AFTER_S = 10.0  # a planned job whose keys are gone this long, with no result, is lost


class JobLost(RuntimeError):
    """The job's state vanished from Redis before it finished."""


def put_image(image: bytes | np.ndarray, ttl: int | None = None) -> str:
    """Store encoded image bytes (PNG, JPEG, …) or a NumPy array for a job; returns its `redis:` reference.

    The reference lives for `ttl` seconds (default: the tile TTL) and can be used by several jobs.
    """
    data = encode_array(image) if isinstance(image, np.ndarray) else bytes(image)
    return store.put_bytes(store_client(), data, ttl or settings().tile_ttl)


@dataclass
class Job:
    """A submitted recognition: its AsyncResult, plus progress read from the tile store while it runs."""

    result: AsyncResult
    _done: int = field(default=0, init=False, repr=False)
    _total: int | None = field(default=None, init=False, repr=False)
    _gone_since: float | None = field(default=None, init=False, repr=False)

    @property
    def id(self) -> str:
        return self.result.id

    def progress(self) -> tuple[int, int | None]:
        """(tiles done, tiles in all); the total is None until the tiling task has planned the grid.

        Never goes backwards, though the merge deletes the job's counters just before the result lands."""
        if self.result.successful():
            self._total = int(self.result.info["tiling"]["tiles"])
            self._done = self._total
            return self._done, self._total
        done, total = store.progress(store_client(), self.id)
        if total is None and self._total is not None:  # planned, and its keys are gone: ending, or lost
            self._gone_since = self._gone_since or time.monotonic()
        else:
            self._gone_since = None
        self._total = total or self._total
        self._done = max(self._done, min(done, self._total) if self._total else done)
        return self._done, self._total

    def lost(self) -> bool:
        """Its keys have been gone from the store for LOST_AFTER_S with no result (see `progress`): a Redis that
        failed over and lost its latest writes, or restarted without persistence, or the job outlived its TTL."""
        return self._gone_since is not None and time.monotonic() - self._gone_since > LOST_AFTER_S

    def get(self, timeout: float | None = None, interval: float = 0.1) -> dict[str, Any]:
        """The job's result document, fetched whole even when the result backend holds only its summary; a failed
        job raises its error (ImageError, TileFailure, …).

        It looks at the job's state every `interval` s rather than waiting on Celery's pub/sub, and a Redis that
        restarts or fails over meanwhile is a pause, not an error (Celery's own `get` gives up on a connection
        after about 20 retries of 1 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        looked = 0.0
        while True:
            try:
                if self.result.ready():
                    return fetch_result(self.result.get(timeout=1))
                if time.monotonic() - looked > 1.0:
                    looked = time.monotonic()
                    self.progress()
            except TRANSIENT:
                pass
            if self.lost():
                raise JobLost(
                    f"job {self.id} lost its state in Redis before it finished (a failover that lost the latest "
                    "writes, a restart without persistence, or older than TILEREC_TILE_TTL); submit it again"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
            time.sleep(interval)

    def cancel(self) -> None:
        cancel(self.id)


def fetch_result(result: dict[str, Any]) -> dict[str, Any]:
    """The whole result of a job whose result was too large for the result backend (TILEREC_RESULT_INLINE_MAX_BYTES):
    the backend holds a summary whose `result_ref` names the Redis key with the document. Others pass through."""
    reference = result.get("result_ref") if isinstance(result, dict) else None
    if reference is None:
        return result
    return json.loads(store.get_result(store_client(), reference))


def cancel(job_id: str) -> None:
    """Stop a job: a tiling task not yet started refuses to start, batch tasks skip every tile they have not
    begun, and the merge removes the job's keys and fails the job with JobCancelled.

    A flag in the store rather than `revoke`: after `replace`, the merge task carries the job's id, so revoking
    the id would also revoke the merge that cleans up, and revoked ids live only in the workers' memory."""
    store.cancel(store_client(), job_id, settings().tile_ttl)


def submit(image: str | bytes | np.ndarray, recognizer: str = "faces", **options: Any) -> Job:
    """Submit `tilerec.recognize`. A path (or `redis:` reference) is sent as is; bytes and arrays are stored first."""
    reference = image if isinstance(image, str) else put_image(image)
    return Job(recognize.delay(reference, recognizer, **options))
