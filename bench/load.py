"""`python -m bench.load [--quick] [--out FILE]`: tilerec under load with a small tile store.

Client processes submit jobs of mixed sizes (QR scenes from one tile to 8000², known codes) all at once, while
`tilerec run DIR/` runs a dataset of one-code images, to one worker of W=2 processes whose Redis is capped
(`maxmemory`, noeviction): admission control makes the big jobs wait for room instead of failing. It reports every
job's outcome checked against its scene (lost, duplicated and wrong jobs: all must be 0), the peak of the store's
memory (Redis's used_memory_peak) against the cap, the jobs that waited in line, and the latency of the small jobs
beside a second run without the big ones. Each run has a fresh Redis and worker.

  python -m bench.load            200 jobs (150 × 600², 30 × 1500², 15 × 3000², 5 × 8000²), a 2,000-image dataset,
                                  a 200 MB store: about 15 minutes on 2 cores
  python -m bench.load --quick    the smoke test: 24 jobs up to 4000², 60 images, a 64 MB store (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.cluster import LOG_LINE
from pipeline.scenes.codes import qr_code, qr_scene
from tasks import store

CLIENTS = 4
SMALL = "small"
ENDS = ("tilerec.recognize", "tilerec.merge")  # a job ends in one of these (one batch: in its tiling task)


@dataclass(frozen=True)
class Profile:
    """The jobs (per size: its side and how many), the dataset's images and the store's cap."""

    sizes: dict[str, tuple[int, int]]  # name: (side, jobs)
    dataset: int
    cap: str  # redis-server's maxmemory


FULL = Profile({SMALL: (600, 150), "medium": (1500, 30), "large": (3000, 15), "huge": (8000, 5)}, 2000, "200mb")
QUICK = Profile({SMALL: (600, 16), "medium": (1500, 4), "large": (3000, 2), "huge": (4000, 2)}, 60, "64mb")


def write_scenes(folder: Path, profile: Profile) -> dict[str, list[str]]:
    """A QR scene per size, about 2 codes per megapixel (at least 2); returns its path's codes by path."""
    truths = {}
    for name, (side, _) in profile.sizes.items():
        scene = qr_scene(side, side, count=max(2, side * side // 500_000), seed=side, prefix=name)
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), scene.image)
        truths[str(path)] = sorted(truth.text for truth in scene.truths)
    return truths


def write_dataset(folder: Path, images: int) -> dict[str, list[str]]:
    """One-tile images with one code each, whose payload is the file's name; returns the codes by path."""
    folder.mkdir()
    truths = {}
    for number in range(images):
        name = f"image-{number:05d}"
        picture, _ = qr_code(name, 3)
        image = np.full((320, 320), 235, np.uint8)
        image[40 : 40 + picture.shape[0], 40 : 40 + picture.shape[1]] = picture
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), image)
        truths[str(path)] = [name]
    return truths


def client(url: str, paths: list[str], out: Path) -> None:
    """One client process: every job submitted at once (tasks.client.submit_many), each outcome written down
    with its latency and whether it was seen waiting for room in the store."""
    from tasks.celery import configure

    configure(broker_url=url, result_backend=url, tilerec_store_url=url)
    from tasks.client import submit_many

    waited: set[str] = set()

    def seen(running: Any) -> None:
        waited.update(run.job.id for run in running if run.job.waiting)

    rows = []
    for done in submit_many(paths, "qrcode", max_in_flight=len(paths), on_poll=seen):
        texts = None if done.result is None else sorted(text or "" for text in done.result.detections.texts)
        error = None if done.error is None else f"{type(done.error).__name__}: {done.error}"
        rows.append({"path": done.image, "job": done.job_id, "seconds": done.seconds, "texts": texts, "error": error})
    for row in rows:
        row["waited"] = row["job"] in waited
    out.write_text(json.dumps(rows))


def job_list(profile: Profile, folder: Path, big: bool) -> list[str]:
    """The jobs' images, sizes interleaved so every client gets a mix; `big`: with the sizes above SMALL's."""
    paths = [str(folder / f"{name}.png") for name, (_, jobs) in profile.sizes.items()
             for _ in range(jobs) if big or name == SMALL]  # fmt: skip
    return [paths[index] for index in np.random.default_rng(0).permutation(len(paths))]


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(values, share)) if values else float("nan")


def run(profile: Profile, folder: Path, truths: dict[str, list[str]], big: bool) -> dict[str, Any]:
    """One run on a fresh capped Redis and worker; returns its figures."""
    from tasks.local import RedisServer, Worker

    log = folder / f"worker-{'mixed' if big else 'small'}.log"
    env = {"TILEREC_ALLOWED_ROOTS": str(folder)}
    with RedisServer(options=["--maxmemory", profile.cap, "--maxmemory-policy", "noeviction"]) as server:
        env["TILEREC_RESULT_BACKEND"] = server.url
        with Worker(server.url, 2, env=env, log_file=str(log)) as worker:
            jobs = job_list(profile, folder, big)
            began = time.monotonic()
            clients = []
            for number in range(CLIENTS):
                out = folder / f"client-{number}.json"
                command = [sys.executable, "-m", "bench.load", "--client", server.url, str(out), *jobs[number::CLIENTS]]
                clients.append((subprocess.Popen(command), out))
            dataset = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "run", f"{folder / 'dataset'}/", "-r", "qrcode", "--broker",
                 server.url, "--shared-path", "--out", str(folder / "dataset-out"), "-q"],
                env={**os.environ, "TILEREC_RESULT_BACKEND": server.url},
            )  # fmt: skip
            for process, _ in clients:
                process.wait()
            dataset.wait()
            wall = time.monotonic() - began
            memory = server.client().info("memory")
            alive = worker.process.poll() is None
        kept = (b"tilerec:cost:", store.ROSTER_KEY.encode())  # measured tile costs; the roster of running nodes
        left = sorted(key.decode() for key in server.client().scan_iter("tilerec:*") if not key.startswith(kept))
    rows = [row for _, out in clients for row in json.loads(out.read_text())]
    entries = [json.loads(line) for line in (folder / "dataset-out" / "results.jsonl").read_text().splitlines()]
    for entry in entries:
        found = None if entry["result"] is None else sorted(d.get("text") or "" for d in entry["result"]["detections"])
        rows.append({"path": entry["path"], "job": entry["job_id"], "seconds": entry["seconds"], "texts": found,
                     "error": entry["error"], "waited": False})  # fmt: skip
    ended = Counter(found["id"] for found in map(LOG_LINE.match, log.read_text().splitlines())
                    if found and found["task"] in ENDS and found["what"].startswith("succeeded"))  # fmt: skip
    small = [row["seconds"] for row in rows if row["path"].endswith(f"{SMALL}.png")]
    return {
        "run": "mixed" if big else "small jobs only",
        "jobs": len(jobs),
        "dataset_images": len(entries),
        "wall_s": round(wall, 1),
        "wrong": sum(row["texts"] is not None and row["texts"] != truths[row["path"]] for row in rows),
        "failed": [row["error"] for row in rows if row["error"] is not None],
        "lost": len(jobs) + profile.dataset - len({row["job"] for row in rows} & set(ended)),
        "duplicated": sum(count > 1 for count in ended.values()),  # a job's result made twice
        "waited": sum(row["waited"] for row in rows),
        "cap_mb": round(int(memory["maxmemory"]) / 1e6, 1),
        "peak_mb": round(int(memory["used_memory_peak"]) / 1e6, 1),
        "small_p50_s": round(percentile(small, 50), 2),
        "small_p99_s": round(percentile(small, 99), 2),
        "keys_left": left,
        "worker_alive": alive,
        "load": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smoke test's sizes")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--client", nargs="+", metavar=("URL OUT", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        url, out, *paths = args.client
        client(url, paths, Path(out))
        return []
    profile = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix="tilerec-load-") as name:
        folder = Path(name)
        truths = {**write_scenes(folder, profile), **write_dataset(folder / "dataset", profile.dataset)}
        for big in (True, False):
            row = run(profile, folder, truths, big)
            (folder / "dataset-out" / "results.jsonl").unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
