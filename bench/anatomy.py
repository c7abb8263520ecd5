"""One job taken apart: the broker messages of each task kind and the peak memory of each kind of worker process.

The job runs with its two queues on separate workers that are started and stopped in turn, so each step's
messages can be read off the Redis lists while nobody consumes them, and each worker's peak RSS (VmHWM) is that of
one role: a jobs worker (one process: the tiling task, later the merge) and a tiles worker (W processes).

1. submit with no worker: the `tilerec.recognize` message waits on the jobs list;
2. start the jobs worker: it tiles and stores, and its chord's tile-task messages pile up on the tiles list;
   read them, read the tiling process's VmHWM, stop the worker;
3. start a tiles worker (fresh processes): it recognizes every tile, and the merge message waits on the jobs list;
   read it and the tile processes' VmHWM;
4. start a jobs worker again: it merges and cleans up; the client gets the result.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import redis

from bench.cluster import JOBS_QUEUE, TILES_QUEUE, client_app, whole_result
from bench.config import vm_hwm_mb
from tasks.local import RedisServer, Worker


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: a queue's priority level n > 0 is the list "<queue><sep><n>"


def _lists(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{level}" for level in range(1, 10)]


def _messages(client: redis.Redis, queue: str) -> list[bytes]:
    return [message for name in _lists(queue) for message in client.lrange(name, 0, -1)]


def _length(client: redis.Redis, queue: str) -> int:
    return sum(client.llen(name) for name in _lists(queue))


def _describe(raw: bytes) -> dict[str, Any]:
    """A kombu message on a Redis list: its size, its body's size once decoded, and the size of its headers."""
    envelope = json.loads(raw)
    body = envelope.get("body", "")
    decoded = base64.b64decode(body) if envelope.get("properties", {}).get("body_encoding") == "base64" else body
    return {
        "bytes": len(raw),
        "body_bytes": len(decoded),
        "headers_bytes": len(json.dumps(envelope.get("headers", {}))),
    }


def _summary(messages: list[bytes]) -> dict[str, Any]:
    described = [_describe(m) for m in messages]
    sizes = [d["bytes"] for d in described]
    return {
        "count": len(sizes),
        "max_bytes": max(sizes, default=0),
        "mean_bytes": sum(sizes) / len(sizes) if sizes else 0,
        "max_body_bytes": max((d["body_bytes"] for d in described), default=0),
        "max_headers_bytes": max((d["headers_bytes"] for d in described), default=0),
    }


def _hwm(worker: Worker) -> dict[str, Any]:
    assert worker.process is not None
    return {
        "main_mb": vm_hwm_mb(worker.process.pid),
        "children_mb": [vm_hwm_mb(pid) for pid in worker.child_pids()],
    }


def dissect(
    image: Path,
    recognizer: str,
    options: dict[str, Any],
    workers: int,
    env: dict[str, str],
    folder: Path,
    timeout: float,
) -> dict[str, Any]:
    """Messages and peak memory of one job of `image` with `workers` tile processes (see the module docstring)."""
    log = str(folder / f"anatomy-{image.stem}.log")
    with RedisServer() as server:
        client = server.client()
        worker_env = {**env, "TILEREC_RESULT_BACKEND": server.url}
        app = client_app(server.url)
        try:
            submitted = time.time()
            pending = app.send_task("tilerec.recognize", args=[str(image), recognizer], kwargs=options)
            recognize_msgs = _messages(client, JOBS_QUEUE)
            with Worker(server.url, 1, queues=[JOBS_QUEUE], env=worker_env, log_file=log) as jobs:
                _wait_for(
                    lambda: _length(client, TILES_QUEUE) > 0 and _length(client, JOBS_QUEUE) == 0, timeout, "tiling"
                )
                _wait_for(lambda: _settled(client, TILES_QUEUE), timeout, "the tile messages to settle")
                tile_msgs = _messages(client, TILES_QUEUE)
                tiling_memory = _hwm(jobs)
            with Worker(server.url, workers, queues=[TILES_QUEUE], env=worker_env, log_file=log) as tiles:
                _wait_for(
                    lambda: _length(client, TILES_QUEUE) == 0 and _length(client, JOBS_QUEUE) > 0, timeout, "the tiles"
                )
                merge_msgs = _messages(client, JOBS_QUEUE)
                tile_memory = _hwm(tiles)
                store_peak = int(client.info("memory")["used_memory_peak"])
            with Worker(server.url, 1, queues=[JOBS_QUEUE], env=worker_env, log_file=log):
                result = whole_result(client, pending.get(timeout=timeout, interval=0.02))
            leftover = len(list(client.scan_iter("tilerec:job:*")))
        finally:
            app.close()
    return {
        "image": image.name,
        "recognizer": recognizer,
        "workers": workers,
        "tiles": result["tiling"]["tiles"],
        "batches": result["tiling"]["batches"],
        "tasks": result["tiling"]["tasks"],
        "detections": len(result["detections"]),
        "messages": {
            "recognize": _summary(recognize_msgs),
            "recognize_tiles": _summary(tile_msgs),
            "merge": _summary(merge_msgs),
        },
        "memory_mb": {
            "tiling_process": max(tiling_memory["children_mb"], default=None),
            "jobs_worker_main": tiling_memory["main_mb"],
            "tile_processes": tile_memory["children_mb"],
            "tiles_worker_main": tile_memory["main_mb"],
            "redis_peak": store_peak / 2**20,
        },
        "image_bytes": image.stat().st_size,
        "job_wall_s": time.time() - submitted,
        "keys_left": leftover,
    }


def _settled(client: redis.Redis, queue: str, quiet_s: float = 0.3) -> bool:
    """The list stopped growing (the chord publishes its header messages one by one)."""
    before = _length(client, queue)
    time.sleep(quiet_s)
    return _length(client, queue) == before
