"""This checkout against another one, side by side: the speed scenes recognized by a cluster of each, interleaved.

    python -m bench.versus ../tilerec-main [--size 8000] [--workers 2] [--reps 3] [--out bench-out/versus]
        [--formats png,tif,jpg,webp] [--recognizers qrcode,aruco] [--in-process]

Each checkout runs its own private Redis and `celery worker` (the other one with its own `.venv/bin/python`), both
up for the whole run; jobs go one at a time, alternating which cluster goes first, so a drift of the machine's speed
hits both alike. Every job is timed by the client, from sending `tilerec.recognize` to holding the result, and both
must find the same detections; the image's modification time is renewed before each job, so no worker reuses what it
kept open of it from the last one (a TIFF's decoded tiles). The scenes are written as PNG and as an uncompressed
tiled TIFF, and with `--formats` as JPEG (quality 95) and WebP (quality 90) too. With `--in-process`, each job is
also run in one fresh process of this checkout on the same tiles (`bench.inprocess`: decoded whole, then tiled), at
one thread and at the libraries' default threads, interleaved with the clusters' jobs: what distribution buys, in
the same run. That process makes a cold pass, then the timed one, which reuses the cold pass's pages (as the
workers, warm, reuse theirs): on this VM a whole decoded image's fresh pages cost 0.1 to 2.5 s from one minute to
the next, which made one-pass baselines drift twofold between repetitions; the cold pass's time is reported beside
it. The load average is recorded beside every job, and its CPU seconds (every process of the cluster, the Redis
included; the one-process run's own): two cores give at most two CPU seconds a second, so 2 × one thread's CPU over
the job's bounds the ratio whatever the load. Writes `versus.json` and `versus.md` (medians, and the ratio of each
scene's median times: this checkout over the other).
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
from bench.inprocess import run_in_subprocess
from bench.runner import _as_encoded, _as_tiled_tiff
from bench.scenes import CODE_KIND, PHOTO_KINDS, one_tile_image, scene_file

RECOGNIZERS = {CODE_KIND: ("qrcode", "barcode", "aruco"), "objects": ("objects",), "faces": ("faces-dnn",)}


def _clusters(other: Path, workers: int, folder: Path, env: dict[str, str]) -> dict[str, Cluster]:
    here = Cluster(workers, folder, env)
    there = Cluster(workers, folder, env, tree=other, python=str(other / ".venv" / "bin" / "python"))
    clusters = {"this": here, "other": there}
    for cluster in clusters.values():
        cluster.start()
        # the other checkout's workers may know other priority levels: its jobs go unprioritized, as an app sends
        assert cluster.app is not None
        cluster.app.conf.update(task_routes={"tilerec.*": {"queue": "tilerec"}})
    return clusters


def _scenes(folder: Path, size: int, formats: tuple[str, ...]) -> list[tuple[str, Path]]:
    found = []
    for kind in (CODE_KIND, *PHOTO_KINDS):
        scene = scene_file(folder, kind, size, seed=5)
        if scene is None:
            continue
        # only the formats asked for are written (a WebP cannot be wider than 16383 pixels)
        encode = {"png": lambda s: s, "tif": _as_tiled_tiff, "jpg": lambda s: _as_encoded(s, ".jpg"),
                  "webp": lambda s: _as_encoded(s, ".webp")}  # fmt: skip
        encoded = [encode[name](scene) for name in formats]
        found += [(kind, file.path) for file in encoded if file is not None]
    return found


def _in_process(path: Path, recognizer: str, threads: str | int) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """A warm pass in a fresh process of this checkout, after a cold one that warmed it (`bench.inprocess` `warm`:
    the decoded image's pages kept and reused): (the warm pass, detections, the cold pass), each pass with its
    seconds from the file to the result, its serial decode's seconds, CPU seconds and page faults."""
    out = run_in_subprocess({"image": str(path), "recognizer": recognizer, "mode": "tiled", "threads": threads,
                             "reps": 1, "warm": True, "options": {}}, 1800)  # fmt: skip
    if "error" in out:
        raise RuntimeError(f"in process ({threads} threads) failed on {path.name}: {out['error']}")
    return out["passes"][0], out["detections"], out["cold"]


def run(
    other: Path,
    size: int,
    workers: int,
    reps: int,
    out: Path,
    formats: tuple[str, ...] = ("png", "tif"),
    recognizers: tuple[str, ...] | None = None,
    in_process: bool = False,
) -> dict[str, Any]:
    scenes_dir = out / "scenes"
    scenes = _scenes(scenes_dir, size, formats)
    one_tile = one_tile_image(scenes_dir, seed=5)
    env = {"TILEREC_ALLOWED_ROOTS": str(scenes_dir.resolve())}
    clusters = _clusters(other, workers, out, env)
    rows: dict[str, dict[str, Any]] = {}
    wanted = [rec for kind, path in scenes for rec in RECOGNIZERS[kind] if recognizers is None or rec in recognizers]
    try:
        jobs = [(rec, path) for kind, path in scenes for rec in RECOGNIZERS[kind] if rec in wanted]
        jobs += [("aruco", one_tile)]
        for name, cluster in clusters.items():
            for recognizer in {rec for rec, _ in jobs}:
                cluster.warm(str(one_tile), recognizer, {}, 300)
            print(f"warmed {name}", file=sys.stderr)
        for rep in range(reps):
            order = list(clusters.items()) if rep % 2 == 0 else list(clusters.items())[::-1]
            for recognizer, path in jobs:
                key = f"{recognizer} {path.suffix.lstrip('.')} {path.stem.split('-')[1]}"
                row = rows.setdefault(key, {"this": [], "other": [], "same": True, "load": []})
                found = {}
                for name, cluster in order:
                    pids = cluster.pids()
                    cpu = cpu_seconds(pids)
                    # a new modification time: the file is a new one to the tile processes, whose open files (and a
                    # TIFF's decoded tiles) from the last job are not reused, as the one-process run reopens it too
                    os.utime(path)
                    run_ = cluster.run(str(path), recognizer, {}, 600)
                    if run_.error:
                        raise RuntimeError(f"{name} failed {key}: {run_.error}")
                    row[name].append(run_.wall_s)
                    row.setdefault(f"{name}_cpu", []).append(cpu_seconds(pids) - cpu)
                    found[name] = run_.result["detections"]
                    row["load"].append(os.getloadavg()[0])
                row["same"] = row["same"] and found["this"] == found["other"]
                if in_process and path != one_tile:
                    for threads in (1, "default") if rep % 2 == 0 else ("default", 1):
                        warm, detections, cold = _in_process(path, recognizer, threads)
                        row.setdefault(f"inproc-{threads}", []).append(warm["total_s"])
                        row.setdefault(f"inproc-{threads}_cpu", []).append(warm["cpu_s"])
                        row.setdefault(f"inproc-{threads}_cold", []).append(cold["total_s"])
                        row.setdefault(f"inproc-{threads}_cold_faults", []).append(cold["minor_faults"])
                        row.setdefault("decode_s", []).append(warm["decode_s"])
                        row["same_in_process"] = row.get("same_in_process", True) and detections == found["this"]
                        row["load"].append(os.getloadavg()[0])
                print(f"rep {rep} {key}: this {row['this'][-1]:.3f} s, other {row['other'][-1]:.3f} s"
                      + (f", in process {row['inproc-1'][-1]:.3f} / {row['inproc-default'][-1]:.3f} s"
                         if "inproc-1" in row else ""), file=sys.stderr)  # fmt: skip
    finally:
        for cluster in clusters.values():
            cluster.stop()
    for row in rows.values():
        row["this_median_s"] = statistics.median(row["this"])
        row["other_median_s"] = statistics.median(row["other"])
        row["ratio"] = row["this_median_s"] / row["other_median_s"]
        row["load_median"] = statistics.median(row["load"])
        if "inproc-1" in row:
            row["speedup_1"] = statistics.median(row["inproc-1"]) / row["this_median_s"]
            row["speedup_default"] = statistics.median(row["inproc-default"]) / row["this_median_s"]
            row["speedup_1_cold"] = statistics.median(row["inproc-1_cold"]) / row["this_median_s"]
            row["decode_median_s"] = statistics.median(row["decode_s"])
            # two cores give at most 2 CPU seconds a second: the job's CPU (all its processes and the Redis)
            # against one thread's bounds the ratio whatever the load (`cpu_bound`)
            row["cpu_bound"] = 2 * statistics.median(row["inproc-1_cpu"]) / statistics.median(row["this_cpu"])
    ratios = [row["ratio"] for key, row in rows.items() if not key.startswith("aruco png one")]
    summary = {
        "size": size,
        "workers": workers,
        "reps": reps,
        "rows": rows,
        "median_ratio": statistics.median(ratios),
        "max_ratio": max(ratios),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "versus.json").write_text(json.dumps(summary, indent=1))
    (out / "versus.md").write_text(_markdown(summary, other))
    return summary


def _markdown(summary: dict[str, Any], other: Path) -> str:
    lines = [
        f"{summary['size']}² scenes at W={summary['workers']}, median of {summary['reps']} interleaved jobs each; "
        f"ratio = this checkout's median time / {other.name}'s; × 1 thread and × default threads = the same "
        "tiles' time in a warm process of this checkout (its second pass, the first's pages reused) over this "
        "checkout's W time, × 1 thread cold = its first pass's; load = the median 1-minute load "
        "average beside the jobs; this CPU = the CPU seconds of this cluster's processes (worker, pool, Redis) for the "
        "job, 1 thread CPU = the one-thread run's; CPU bound = 2 × 1 thread CPU / this CPU, the most two cores can "
        "give against one thread",
        "",
        "| scene | this s | other s | ratio | × 1 thread | × default threads | × 1 thread cold | serial decode s | "
        "this CPU s | 1 thread CPU s | CPU bound | load | same |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        same = row["same"] and row.get("same_in_process", True)
        speedups = (f"{row['speedup_1']:.2f} | {row['speedup_default']:.2f} | {row['speedup_1_cold']:.2f} | "
                    f"{row['decode_median_s']:.3f} | "
                    f"{statistics.median(row['this_cpu']):.2f} | {statistics.median(row['inproc-1_cpu']):.2f} | "
                    f"{row['cpu_bound']:.2f}"
                    if "speedup_1" in row else "– | – | – | – | – | – | –")  # fmt: skip
        lines.append(
            f"| {key} | {row['this_median_s']:.3f} | {row['other_median_s']:.3f} | {row['ratio']:.3f} | "
            f"{speedups} | {row['load_median']:.1f} | {'yes' if same else 'NO'} |"
        )
    lines += ["", f"median ratio {summary['median_ratio']:.3f}, largest {summary['max_ratio']:.3f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout, with its own .venv")
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/versus"))
    parser.add_argument("--formats", default="png,tif", help="of png, tif (uncompressed, tiled), jpg, webp")
    parser.add_argument("--recognizers", default=None, help="only these, e.g. qrcode,aruco,faces-dnn,objects")
    parser.add_argument("--in-process", action="store_true", help="also in one process: 1, default threads")
    args = parser.parse_args()
    recognizers = tuple(args.recognizers.split(",")) if args.recognizers else None
    formats = tuple(args.formats.split(","))
    summary = run(args.other.resolve(), args.size, args.workers, args.reps, args.out.resolve(), formats, recognizers,
                  args.in_process)  # fmt: skip
    print(_markdown(summary, args.other))


if __name__ == "__main__":
    main()
