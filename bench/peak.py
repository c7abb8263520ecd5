"""Peak memory of every worker process for one job of an image: the tiling process and each tile process.

    python -m bench.peak IMAGE [--recognizer qrcode] [--workers 2]

A private Redis and one `celery worker` of W processes (the node tiles and recognizes, as a default deployment
does); the job runs once, then each pool process's VmHWM (its peak resident memory since it started) is read from
/proc, and the worker's main process's. Run with another checkout's interpreter and PYTHONPATH to measure it the
same way. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.config import vm_hwm_mb
from tasks.local import RedisServer, Worker


def measure(image: Path, recognizer: str, workers: int, timeout: float = 1800) -> dict[str, object]:
    """The job's wall time, its detections' count and every process's peak RSS (MB)."""
    from celery import Celery

    with RedisServer() as server:
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(image.parent.resolve())}
        with Worker(server.url, workers, env=env) as worker:
            caller = Celery("peak", broker=server.url, backend=server.url, set_as_current=False)
            began = time.time()
            result = caller.send_task("tilerec.recognize", args=[str(image.resolve()), recognizer], queue="tilerec")
            found = result.get(timeout=timeout)
            wall = time.time() - began
            assert worker.process is not None
            peaks = {"main": vm_hwm_mb(worker.process.pid), "pool": [vm_hwm_mb(pid) for pid in worker.child_pids()]}
            caller.close()
    return {"image": image.name, "recognizer": recognizer, "workers": workers, "wall_s": round(wall, 2),
            "detections": len(found["detections"]), "peak_rss_mb": peaks}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--recognizer", default="qrcode")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.image, args.recognizer, args.workers)))


if __name__ == "__main__":
    main()
