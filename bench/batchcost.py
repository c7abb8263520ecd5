"""What one batch task costs the cluster in CPU, from the slope of a job's CPU seconds over its number of batches.

    python -m bench.batchcost [--size 8000] [--reps 3] [--sizes 4,8,16,32,64] [--recognizer qrcode]
        [--workers 2] [--out bench-out/batchcost]

One cluster of this checkout (W processes, a private Redis) runs the benchmark's code scene as an uncompressed
tiled TIFF (nothing decoded serially: the batch tasks read their own windows) with fixed batch sizes (`batch_size`,
no tapered tail), interleaved, `reps` times each. Each job's CPU seconds are those of every process of the cluster
(the worker, its pool, the Redis), which a loaded machine inflates much less than its wall time. The least-squares
line of CPU seconds over batches gives the CPU of one batch task (Celery's messages, result, chord count and ack,
tilerec's round trips) and, at its intercept, the job's work without batches. Writes batchcost.json and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.cluster import Cluster, cpu_seconds
from bench.scenes import one_tile_image
from bench.versus import _scenes


def run(size: int, reps: int, sizes: tuple[int, ...], recognizer: str, workers: int, out: Path) -> dict[str, Any]:
    tif = next(path for kind, path in _scenes(out / "scenes", size, ("tif",)) if kind == "codes")
    env = {"TILEREC_ALLOWED_ROOTS": str((out / "scenes").resolve())}
    rows: dict[int, dict[str, list[float]]] = {n: {"cpu_s": [], "wall_s": [], "batches": []} for n in sizes}
    with Cluster(workers, out, env) as cluster:
        cluster.warm(str(one_tile_image(out / "scenes", seed=5)), recognizer, {}, 300)
        for rep in range(reps):
            for batch_size in sizes if rep % 2 == 0 else sizes[::-1]:
                pids = cluster.pids()
                before = cpu_seconds(pids)
                job = cluster.run(str(tif), recognizer, {"batch_size": batch_size}, 600)
                if job.error or job.result is None:
                    raise RuntimeError(f"batch size {batch_size} failed: {job.error}")
                row = rows[batch_size]
                row["cpu_s"].append(cpu_seconds(pids) - before)
                row["wall_s"].append(job.wall_s)
                row["batches"].append(job.result["tiling"]["batches"])
                print(f"rep {rep} batch size {batch_size}: {row['batches'][-1]} batches, {row['cpu_s'][-1]:.2f} CPU s, "
                      f"{row['wall_s'][-1]:.2f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr)  # fmt: skip
    points = [(statistics.median(r["batches"]), statistics.median(r["cpu_s"])) for r in rows.values()]
    mean_b, mean_c = statistics.fmean(b for b, _ in points), statistics.fmean(c for _, c in points)
    slope = sum((b - mean_b) * (c - mean_c) for b, c in points) / sum((b - mean_b) ** 2 for b, _ in points)
    summary = {"size": size, "reps": reps, "recognizer": recognizer, "workers": workers, "load": os.getloadavg()[0],
               "per_batch_cpu_ms": 1000 * slope, "intercept_cpu_s": mean_c - slope * mean_b,
               "rows": {str(n): r for n, r in rows.items()}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "batchcost.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="4,8,16,32,64", help="tiles per batch")
    parser.add_argument("--recognizer", default="qrcode")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/batchcost"))
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(","))
    summary = run(args.size, args.reps, sizes, args.recognizer, args.workers, args.out)
    print("| tiles per batch | batches | job CPU s | job s |\n|---|---|---|---|")
    for n, row in summary["rows"].items():
        print(f"| {n} | {statistics.median(row['batches']):.0f} | {statistics.median(row['cpu_s']):.2f} | "
              f"{statistics.median(row['wall_s']):.2f} |")  # fmt: skip
    print(
        f"\none batch task: {summary['per_batch_cpu_ms']:.1f} ms of CPU; the job without batches: "
        f"{summary['intercept_cpu_s']:.2f} CPU s (W={summary['workers']}, load {summary['load']:.1f})"
    )


if __name__ == "__main__":
    main()
