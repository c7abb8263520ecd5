"""Submitting jobs from Python: store bytes or arrays in Redis, submit, follow progress, get the result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery.result import AsyncResult

from pipeline.images import encode_array
from tasks import store
from tasks.celery import settings, store_client
from tasks.jobs import recognize


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
        self._total = total or self._total
        self._done = max(self._done, min(done, self._total) if self._total else done)
        return self._done, self._total

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The job's result document, fetched whole even when the result backend holds only its summary."""
        return fetch_result(self.result.get(timeout=timeout))

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
