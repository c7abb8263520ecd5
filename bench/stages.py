"""What the second stage's mechanism costs: the same job with its second stage and without it, interleaved, on one
cluster of W processes, and the same pair in one process.

  python -m bench.stages [--workers 2] [--size 4000x3000] [--spots 200] [--repeats 5]

The recognizer is the example plugin `bright-spots` (pip install -e tests/plugin_example), whose optional second
stage measures each spot on its full-resolution crop: work of a few microseconds a crop, so the difference between
the two jobs is the mechanism itself (planning and storing the crops, the crop batches' chord and tasks, crops
assembled from the stored tiles, the finish). Each repeat runs both jobs, alternating which goes first; the figures
are medians, printed as JSON with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.cluster import Cluster
from pipeline import recognize_image

RECOGNIZER = "bright-spots"
TIMEOUT = 600.0


def spots_scene(width: int, height: int, spots: int, seed: int = 0) -> np.ndarray:
    """Bright discs (radius 8-20) on dark noise, at random places: `bright-spots` finds each once."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(20, 90, (height, width), dtype=np.uint8)
    for x, y, r in zip(rng.integers(30, width - 30, spots), rng.integers(30, height - 30, spots),
                       rng.integers(8, 21, spots), strict=True):  # fmt: skip
        cv2.circle(grey, (int(x), int(y)), int(r), 255, -1)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def _in_process(image: np.ndarray, second_stage: bool) -> float:
    began = time.perf_counter()
    recognize_image(image, RECOGNIZER, second_stage=second_stage)
    return time.perf_counter() - began


def measure(workers: int, width: int, height: int, spots: int, repeats: int) -> dict[str, Any]:
    """Medians of the two jobs' wall times (client's clock) on a cluster and in one process, and their ratios."""
    image = spots_scene(width, height, spots)
    with tempfile.TemporaryDirectory(prefix="tilerec-bench-stages-") as folder:
        path = Path(folder) / "spots.png"
        cv2.imwrite(str(path), image)
        env = {"TILEREC_ALLOWED_ROOTS": folder}
        walls: dict[bool, list[float]] = {False: [], True: []}
        crops = batches = 0
        with Cluster(workers, Path(folder), env) as cluster:
            cluster.warm(str(path), RECOGNIZER, {"second_stage": True}, TIMEOUT)
            for repeat in range(repeats):
                for on in (False, True) if repeat % 2 == 0 else (True, False):
                    run = cluster.run(str(path), RECOGNIZER, {"second_stage": on}, TIMEOUT)
                    if run.error is not None or run.result is None:
                        raise RuntimeError(f"the job failed: {run.error}")
                    walls[on].append(run.wall_s)
                    if on:
                        crops = run.result["second_stage"]["crops"]
                        batches = run.result["second_stage"]["batches"]
        local: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats):
            for on in (False, True) if repeat % 2 == 0 else (True, False):
                local[on].append(_in_process(image, on))
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    local_off, local_on = statistics.median(local[False]), statistics.median(local[True])
    cluster = {"without": off, "with": on, "ratio": on / off, "per_crop_ms": 1000 * (on - off) / max(crops, 1)}
    in_process = {"without": local_off, "with": local_on, "ratio": local_on / local_off}
    return {
        "image": f"{width}x{height}",
        "spots": spots,
        "crops": crops,
        "crop_batches": batches,
        "workers": workers,
        "repeats": repeats,
        "cluster_s": {key: round(value, 3) for key, value in cluster.items()},
        "in_process_s": {key: round(value, 3) for key, value in in_process.items()},
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--size", default="4000x3000", help="image WIDTHxHEIGHT (default 4000x3000)")
    parser.add_argument("--spots", type=int, default=200, help="bright spots, one crop each (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each job (default 5)")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    print(json.dumps(measure(args.workers, width, height, args.spots, args.repeats), indent=2))


if __name__ == "__main__":
    main()
