"""Many images in one run: images per second of a local cluster fed by `tasks.client.submit_many` against a loop of
`pipeline.recognize_image` in one process, and the AP of each code recognizer on generated scenes with COCO truth,
end to end through `tilerec run DIR --out` and `tilerec evaluate`.

  python -m bench.datasets [--images 1000] [--size 1000x750] [--workers 1,2] [--recognizer aruco]
                           [--ap-images 100] [--ap-size 640x480] [--out bench-out/datasets]

Throughput: the same N images (two ArUco markers each, one or a few tiles) are recognized by the loop (each file
read and decoded, then `recognize_image`) and by clusters of W worker processes started beforehand (the timing
starts at the first submission and ends with the last result). The per-image overhead is what the cluster spends
per image beyond the loop's own work: (W × wall − loop wall) / N, in process-milliseconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

from pipeline.inference import recognize_image
from pipeline.outputs.datasets import write_scene_set

CODE_RECOGNIZERS = ("qrcode", "aruco", "barcode")  # the built-ins a generated scene has truth for


def loop_seconds(paths: Sequence[Path], recognizer: str) -> float:
    """Wall time of recognizing every image in this process, one after another, reading each file as a job does."""
    began = time.perf_counter()
    for path in paths:
        recognize_image(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), recognizer)
    return time.perf_counter() - began


def cluster_seconds(folder: Path, recognizer: str, workers: int, spread: bool) -> tuple[float, int]:
    """`timed_cluster` in a process of its own: Celery's client keeps its first broker's connections for good."""
    command = [sys.executable, "-m", "bench.datasets", "--one-cluster", str(workers), "--recognizer", recognizer]
    command += ["--folder", str(folder)] + (["--spread"] if spread else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the W={workers} cluster run failed: {done.stderr.strip()[-2000:]}")
    seconds, failed = json.loads(done.stdout.strip().splitlines()[-1])
    return float(seconds), int(failed)


def timed_cluster(paths: Sequence[Path], recognizer: str, workers: int, spread: bool) -> tuple[float, int]:
    """Wall time of the images as jobs on a fresh local cluster of `workers` processes (started before the clock),
    and how many failed. Each job in as few batches as their cost allows (`min_batches=1`, what `tilerec run DIR`
    sends), or with `spread` its tiles split over the processes as for one big image (TILEREC_MIN_BATCHES)."""
    from tasks.celery import configure
    from tasks.client import IN_FLIGHT_PER_PROCESS, submit_many
    from tasks.local import LocalCluster

    cluster = LocalCluster(workers=workers, env={"TILEREC_ALLOWED_ROOTS": str(paths[0].parent)})
    cluster.env.update(
        TILEREC_BROKER_URL=cluster.url, TILEREC_RESULT_BACKEND=cluster.url, TILEREC_STORE_URL=cluster.url
    )
    with cluster:
        configure(broker_url=cluster.url, result_backend=cluster.url, tilerec_store_url=cluster.url)
        list(submit_many(paths[:workers], recognizer, max_in_flight=workers))  # warm: each process loads its recognizer
        began = time.perf_counter()
        options = {} if spread else {"min_batches": 1}
        limit = IN_FLIGHT_PER_PROCESS * workers
        done = list(submit_many(map(str, paths), recognizer, max_in_flight=limit, **options))
        return time.perf_counter() - began, sum(not completed.ok for completed in done)


def throughput(folder: Path, images: int, size: tuple[int, int], workers: Sequence[int], recognizer: str) -> dict:
    """The loop against each cluster size on the same images."""
    write_scene_set(folder, images, *size, kinds=("aruco",), per_image=2, seed=1)
    paths = sorted((folder / "images").glob("*.png"))
    loop = loop_seconds(paths, recognizer)
    rows = [{"mode": "loop of recognize_image, 1 process", "workers": 1, "seconds": loop, "failed": 0}]
    for count in workers:
        for spread in (False, True):
            seconds, failed = cluster_seconds(folder / "images", recognizer, count, spread)
            mode = f"tilerec cluster, W={count}" + (", tiles spread over processes" if spread else "")
            rows.append({"mode": mode, "workers": count, "seconds": seconds, "failed": failed})
    for row in rows:
        row["images_per_s"] = images / row["seconds"]
        row["vs_loop"] = loop / row["seconds"]
        row["overhead_ms"] = 1000 * (row["workers"] * row["seconds"] - loop) / images
    return {"images": images, "size": list(size), "recognizer": recognizer, "rows": rows}


def tilerec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True, check=False)


def accuracy(folder: Path, images: int, size: tuple[int, int], workers: int) -> list[dict[str, Any]]:
    """Each code recognizer on its own generated set: `tilerec run DIR --out`, then `tilerec evaluate`."""
    rows = []
    for recognizer in CODE_RECOGNIZERS:
        truth = write_scene_set(folder / recognizer, images, *size, kinds=(recognizer,), per_image=3, seed=7)
        out, metrics = folder / recognizer / "out", folder / recognizer / "metrics.json"
        run = tilerec(
            "run", f"{truth.parent / 'images'}/", "-r", recognizer, "--out", str(out), "--workers", str(workers)
        )
        if run.returncode != 0:
            raise RuntimeError(f"tilerec run {recognizer} failed: {run.stderr.strip()}")
        evaluated = tilerec("evaluate", str(out / "coco.json"), "--truth", str(truth), "--json", str(metrics))
        if evaluated.returncode != 0:
            raise RuntimeError(f"tilerec evaluate {recognizer} failed: {evaluated.stderr.strip()}")
        stats = json.loads(metrics.read_text())["runs"][0]["bbox"]["stats"]
        rows.append({"recognizer": recognizer, "images": images, "objects": 3 * images, **stats})
    return rows


def report(results: dict[str, Any]) -> str:
    speed = results["throughput"]
    width, height = speed["size"]
    lines = [
        f"{speed['images']} images of {width}x{height}, `{speed['recognizer']}`:",
        "",
        "| mode | wall s | images/s | vs loop | overhead ms/image |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in speed["rows"]:
        lines.append(
            f"| {row['mode']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} | {row['vs_loop']:.2f}× "
            f"| {row['overhead_ms']:.1f} |"
        )
    lines += ["", "| recognizer | images | objects | AP | AP50 | AP75 | AR100 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["accuracy"]:
        lines.append(
            f"| {row['recognizer']} | {row['images']} | {row['objects']} | {row['AP']:.3f} | {row['AP50']:.3f} "
            f"| {row['AP75']:.3f} | {row['AR100']:.3f} |"
        )
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datasets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the throughput runs (default 1000)")
    parser.add_argument("--size", type=parse_size, default=(1000, 750), help="their size (default 1000x750)")
    parser.add_argument("--workers", default="1,2", help="cluster sizes, comma-separated (default 1,2)")
    parser.add_argument("--recognizer", default="aruco", help="for the throughput runs (default aruco)")
    parser.add_argument("--ap-images", type=int, default=100, help="images per recognizer for AP (default 100)")
    parser.add_argument("--ap-size", type=parse_size, default=(640, 480), help="their size (default 640x480)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/datasets"), help="results.json and report.md")
    parser.add_argument("--one-cluster", type=int, help=argparse.SUPPRESS)  # cluster_seconds' own process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_cluster:
        paths = sorted(args.folder.glob("*.png"))
        print(json.dumps(timed_cluster(paths, args.recognizer, args.one_cluster, args.spread)))
        return 0
    workers = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="tilerec-bench-datasets-") as scratch:
        results = {
            "throughput": throughput(Path(scratch) / "speed", args.images, args.size, workers, args.recognizer),
            "accuracy": accuracy(Path(scratch) / "ap", args.ap_images, args.ap_size, max(workers)),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
