"""This checkout against another one, side by side: the speed scenes recognized by a cluster of each, interleaved.

    python -m bench.versus ../tilerec-main [--size 8000] [--workers 2] [--reps 5] [--out bench-out/versus]

Each checkout runs its own private Redis and `celery worker` (the other one with its own `.venv/bin/python`), both
up for the whole run; jobs go one at a time, alternating which cluster goes first, so a drift of the machine's
speed hits both alike. Every job is timed by the client, from sending `tilerec.recognize` to holding the result,
and both must find the same detections. Writes `versus.json` and `versus.md` (medians, and the ratio of each
scene's median times: this checkout over the other).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.cluster import Cluster
from bench.runner import _as_tiled_tiff
from bench.scenes import CODE_KIND, PHOTO_KINDS, one_tile_image, scene_file

RECOGNIZERS = {CODE_KIND: ("qrcode", "barcode", "aruco"), "objects": ("objects",), "faces": ("faces-dnn",)}


def _clusters(other: Path, workers: int, folder: Path, env: dict[str, str]) -> dict[str, Cluster]:
    here = Cluster(workers, folder, env)
    there = Cluster(workers, folder, env)
    there.python, there.cwd = str(other / ".venv" / "bin" / "python"), str(other)
    clusters = {"this": here, "other": there}
    for cluster in clusters.values():
        cluster.start()
        # the other checkout's workers may know other priority levels: its jobs go unprioritized, as an app sends
        assert cluster.app is not None
        cluster.app.conf.update(task_routes={"tilerec.*": {"queue": "tilerec"}})
    return clusters


def _scenes(folder: Path, size: int) -> list[tuple[str, Path]]:
    found = []
    for kind in (CODE_KIND, *PHOTO_KINDS):
        scene = scene_file(folder, kind, size, seed=5)
        if scene is None:
            continue
        tiff = _as_tiled_tiff(scene)
        found += [(kind, scene.path)] + ([(kind, tiff.path)] if tiff is not None else [])
    return found


def run(other: Path, size: int, workers: int, reps: int, out: Path) -> dict[str, Any]:
    scenes_dir = out / "scenes"
    scenes = _scenes(scenes_dir, size)
    one_tile = one_tile_image(scenes_dir, seed=5)
    env = {"TILEREC_ALLOWED_ROOTS": str(scenes_dir.resolve())}
    clusters = _clusters(other, workers, out, env)
    rows: dict[str, dict[str, Any]] = {}
    try:
        jobs = [(rec, path) for kind, path in scenes for rec in RECOGNIZERS[kind]] + [("aruco", one_tile)]
        for name, cluster in clusters.items():
            for recognizer in {rec for rec, _ in jobs}:
                cluster.warm(str(one_tile), recognizer, {}, 300)
            print(f"warmed {name}", file=sys.stderr)
        for rep in range(reps):
            order = list(clusters.items()) if rep % 2 == 0 else list(clusters.items())[::-1]
            for recognizer, path in jobs:
                key = f"{recognizer} {path.suffix.lstrip('.')} {path.stem.split('-')[1]}"
                row = rows.setdefault(key, {"this": [], "other": [], "same": True})
                found = {}
                for name, cluster in order:
                    run_ = cluster.run(str(path), recognizer, {}, 600)
                    if run_.error:
                        raise RuntimeError(f"{name} failed {key}: {run_.error}")
                    row[name].append(run_.wall_s)
                    found[name] = run_.result["detections"]
                row["same"] = row["same"] and found["this"] == found["other"]
                print(f"rep {rep} {key}: this {row['this'][-1]:.3f} s, other {row['other'][-1]:.3f} s", file=sys.stderr)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    for row in rows.values():
        row["this_median_s"] = statistics.median(row["this"])
        row["other_median_s"] = statistics.median(row["other"])
        row["ratio"] = row["this_median_s"] / row["other_median_s"]
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
        f"ratio = this checkout's median time / {other.name}'s",
        "",
        "| scene | this s | other s | ratio | same detections |",
        "|---|---|---|---|---|",
    ]
    for key, row in summary["rows"].items():
        lines.append(
            f"| {key} | {row['this_median_s']:.3f} | {row['other_median_s']:.3f} | {row['ratio']:.3f} | "
            f"{'yes' if row['same'] else 'NO'} |"
        )
    lines += ["", f"median ratio {summary['median_ratio']:.3f}, largest {summary['max_ratio']:.3f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout, with its own .venv")
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out/versus"))
    args = parser.parse_args()
    summary = run(args.other.resolve(), args.size, args.workers, args.reps, args.out)
    print(_markdown(summary, args.other))


if __name__ == "__main__":
    main()
