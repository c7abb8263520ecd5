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

from bench.cluster import JOBS_QUEUE, TILES_QUEUE, client_app, vm_hwm_mb, whole_result
from tasks.local import RedisServer, Worker


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def _messages(client: redis.Redis, queue: str) -> list[bytes]:
    return list(client.lrange(queue, 0, -1))


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
                _wait_for(lambda: client.llen(TILES_QUEUE) > 0 and client.llen(JOBS_QUEUE) == 0, timeout, "tiling")
                _wait_for(lambda: _settled(client, TILES_QUEUE), timeout, "the tile messages to settle")
                tile_msgs = _messages(client, TILES_QUEUE)
                tiling_memory = _hwm(jobs)
            with Worker(server.url, workers, queues=[TILES_QUEUE], env=worker_env, log_file=log) as tiles:
                _wait_for(lambda: client.llen(TILES_QUEUE) == 0 and client.llen(JOBS_QUEUE) > 0, timeout, "the tiles")
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
    before = client.llen(queue)
    time.sleep(quiet_s)
    return client.llen(queue) == before


def message_shapes(tiles_per_task: int, tasks: int = 4) -> dict[str, Any]:
    """Tile-task messages as the chord publishes them (the merge signature embedded as `chord`, a group id), sent
    here with no worker consuming: today's shape (the job description in every message and again in the callback)
    against a slim one (only the job id, the job's description kept in the tile store, argsrepr cut short) and a
    slimmer one (also the tiles as an index range; workers recompute windows with `grid`). The differences are what
    those changes would save per message."""
    import uuid

    from celery import Celery

    with RedisServer() as server:
        client = server.client()
        app = Celery("tilerec-bench-messages", set_as_current=False, backend="disabled")
        app.config_from_object("celeryconfig")
        app.conf.update(broker_url=server.url, result_backend="disabled", broker_connection_retry_on_startup=False)
        try:
            job_id = str(uuid.uuid4())
            job = {
                "id": job_id,
                "source": "/data/images/some-survey/scene-000123.png",
                "width": 8000, "height": 8000, "channels": 3,
                "options": {"recognizer": "qrcode", "params": {}, "tile": 640, "overlap": 0.2, "min_score": 0.0,
                            "merge": "greedy_nmm", "match_metric": "ios", "match_threshold": 0.5, "batch_size": None,
                            "on_tile_error": "fail"},
                "tiles": 256, "tasks": 16,
                "timings": {"started": 1795738299.3033955, "load_s": 0.0042183399, "decode_s": 0.0239434242,
                            "store_s": 0.0108807086},
            }  # fmt: skip
            batch = [[k, 512 * k, 512 * k, 640, 640] for k in range(tiles_per_task)]
            shapes = {}
            short = {"argsrepr": "", "kwargsrepr": ""}
            variants = (("today", job, batch, {}), ("slim", job_id, batch, short),
                        ("slim_index_range", job_id, [0, tiles_per_task], short))  # fmt: skip
            for name, first, tiles, extra in variants:
                body = app.signature("tilerec.merge", args=(first,), options={"task_id": job_id, **extra})
                group = str(uuid.uuid4())
                for index in range(tasks):
                    app.send_task("tilerec.recognize_tiles", args=(first, tiles), chord=body, group_id=group,
                                  group_index=index, root_id=job_id, parent_id=job_id, **extra)  # fmt: skip
                shapes[name] = _summary(_messages(client, TILES_QUEUE))
                client.delete(TILES_QUEUE)
        finally:
            app.close()
    return {"tiles_per_task": tiles_per_task, **shapes}
