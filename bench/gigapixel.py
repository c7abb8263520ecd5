"""`python -m bench.gigapixel [--sizes 4000,8000,...] [--compression none|zlib] [--shared true|false] [--out DIR]`:
gigapixel TIFFs recognized end to end by a real local cluster, with time and peak memory per process.

For each size S, an S x S RGB TIFF of 512² tiles is written tile by tile (never whole in memory) with QR codes at
known places: one per 1000² cell, some across tilerec's tile seams, most across the TIFF's own tile edges. It is
recognized by a private Redis (one for the whole run) and two Celery workers (fresh for every size),
as in production with separate queues:
    jobs worker   (1 process, queue tilerec)        : the tiling task (reads the header, plans) and the merge
    tiles worker  (2 processes, queue tilerec.tiles) : the tile tasks (each reads its own windows from the file)
Every code must be found exactly once. Peak memory is each process's VmHWM from /proc, read after the job, so
it covers everything that process did; the workers are fresh for every size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from pipeline.scenes.codes import qr_code
from pipeline.tiling import grid

TIFF_TILE = 512
CELL = 1000  # one code per CELL x CELL pixels


@dataclass(frozen=True)
class Code:
    text: str
    x: int  # the picture's corner (quiet zone included)
    y: int
    picture: np.ndarray
    box: tuple[int, int, int, int]  # the code itself, image pixels


def place_codes(size: int, seed: int = 0, tile: int = 640, overlap: float = 0.2, per_cell: int = 1) -> list[Code]:
    """One code per cell (or `per_cell`², each in a cell of its own share of the side); every third one straddles a
    tilerec seam (and is still whole in the next tile)."""
    rng = np.random.default_rng(seed)
    starts = sorted({w.x for w in grid(size, size, tile, overlap)})
    codes = []
    cell = CELL // per_cell
    for cy in range(0, size - cell + 1, cell):
        for cx in range(0, size - cell + 1, cell):
            text = f"gp-{len(codes):05d}"
            picture, (bx, by, bw, bh) = qr_code(text, int(rng.integers(3, 5)) if per_cell == 1 else 3)
            side = picture.shape[0]
            x, y = cx + int(rng.integers(20, cell - side - 20)), cy + int(rng.integers(20, cell - side - 20))
            if len(codes) % 3 == 0:  # across the seam nearest to x: the code starts before the next tile's start
                seams = [s + tile for s in starts if cx + 20 < s + tile - bw // 2 < cx + cell - side - 20]
                if seams:
                    x = seams[0] - bw // 2 - bx
            codes.append(Code(text, x, y, picture, (x + bx, y + by, bw, bh)))
    return codes


def texture(seed: int = 1, side: int = 2048) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(150, 230, (side, side), dtype=np.uint8), (0, 0), 3)


def tiles(size: int, codes: list[Code], background: np.ndarray) -> Iterator[np.ndarray]:
    """The image's TIFF tiles in row order, each painted with the codes that reach into it."""
    by_cell: dict[tuple[int, int], list[Code]] = {}
    for code in codes:
        side = code.picture.shape[0]
        for ty in range(code.y // TIFF_TILE, (code.y + side - 1) // TIFF_TILE + 1):
            for tx in range(code.x // TIFF_TILE, (code.x + side - 1) // TIFF_TILE + 1):
                by_cell.setdefault((tx, ty), []).append(code)
    span = background.shape[0] - TIFF_TILE
    for ty in range(-(-size // TIFF_TILE)):
        for tx in range(-(-size // TIFF_TILE)):
            ox, oy = (tx * 389) % span, (ty * 613) % span
            grey = background[oy : oy + TIFF_TILE, ox : ox + TIFF_TILE].copy()
            left, top = tx * TIFF_TILE, ty * TIFF_TILE
            for code in by_cell.get((tx, ty), []):
                side = code.picture.shape[0]
                x0, y0 = max(code.x, left), max(code.y, top)
                x1, y1 = min(code.x + side, left + TIFF_TILE), min(code.y + side, top + TIFF_TILE)
                grey[y0 - top : y1 - top, x0 - left : x1 - left] = code.picture[
                    y0 - code.y : y1 - code.y, x0 - code.x : x1 - code.x
                ]
            yield np.repeat(grey[:, :, None], 3, axis=2)


def write_scene(path: Path, size: int, compression: str, seed: int = 0, per_cell: int = 1) -> list[Code]:
    codes = place_codes(size, seed, per_cell=per_cell)
    tifffile.imwrite(
        path,
        tiles(size, codes, texture(seed + 1)),
        shape=(size, size, 3),
        dtype=np.uint8,
        photometric="rgb",
        tile=(TIFF_TILE, TIFF_TILE),
        compression=None if compression == "none" else compression,
        bigtiff=size * size * 3 > 2**32 - 2**25,
    )
    return codes


def check(detections: list[dict[str, Any]], codes: list[Code], tolerance: float = 3.0) -> dict[str, int]:
    truths = {code.text: code.box for code in codes}
    found: dict[str, int] = {}
    misplaced = 0
    for d in detections:
        text = d.get("text")
        found[text] = found.get(text, 0) + 1
        if text in truths and max(abs(a - b) for a, b in zip(d["box"], truths[text], strict=True)) > tolerance:
            misplaced += 1
    return {
        "codes": len(codes),
        "found_once": sum(1 for text in truths if found.get(text) == 1),
        "missed": sum(1 for text in truths if text not in found),
        "duplicates": sum(n - 1 for text, n in found.items() if text in truths and n > 1),
        "false": sum(n for text, n in found.items() if text not in truths),
        "misplaced": misplaced,
    }


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_size(
    size: int, folder: Path, redis_url: str, compression: str, shared: bool, options: dict[str, Any]
) -> dict[str, Any]:
    from tasks import recognize
    from tasks.client import fetch_document
    from tasks.local import Worker

    path = folder / f"scene-{size}.tif"
    began = time.perf_counter()
    codes = write_scene(path, size, compression)
    written = time.perf_counter() - began
    env = {
        "TILEREC_ALLOWED_ROOTS": str(folder),
        "TILEREC_SHARED_STORAGE": "true" if shared else "false",
        "TILEREC_RESULT_BACKEND": redis_url,
    }
    logs = folder / f"workers-{size}.log"
    with (
        Worker(redis_url, 1, queues=["tilerec"], env=env, log_file=str(logs), name="jobs") as jobs,
        Worker(redis_url, 2, queues=["tilerec.tiles"], env=env, log_file=str(logs), name="tiles") as tiles_,
    ):
        submitted = time.perf_counter()
        result = fetch_document(recognize.delay(str(path), "qrcode", **options).get(timeout=3600))
        wall = time.perf_counter() - submitted
        memory = {
            "jobs_main_mb": peak_mb(jobs.process.pid),
            "jobs_child_mb": max(peak_mb(pid) for pid in jobs.child_pids()),
            "tiles_main_mb": peak_mb(tiles_.process.pid),
            "tiles_children_mb": [round(peak_mb(pid), 1) for pid in tiles_.child_pids()],
        }
    path.unlink()
    return {
        "size": size,
        "megapixels": size * size / 1e6,
        "decoded_mb": round(size * size * 3 / 2**20, 1),
        "compression": compression,
        "shared_storage": shared,
        "options": options,
        "write_s": round(written, 1),
        "wall_s": round(wall, 2),
        "s_per_megapixel": round(wall / (size * size / 1e6), 4),
        "tiles": result["tiling"]["tiles"],
        "batches": result["tiling"]["batches"],
        "tasks": result["tiling"]["tasks"],
        "timings": result["timings"],
        "check": check(result["detections"], codes),
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in memory.items()},
    }


def messages(size: int, per_cell: int, folder: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Every broker message of one job on a dense scene, read off the Redis lists between its stages
    (bench.anatomy), with its tiles and detections: no message may grow with the job."""
    from bench.anatomy import dissect

    path = folder / f"dense-{size}.tif"
    codes = write_scene(path, size, "none", per_cell=per_cell)
    env = {"TILEREC_ALLOWED_ROOTS": str(folder)}
    row = dissect(path, "qrcode", options, 2, env, folder, 3600)
    path.unlink()
    largest = {kind: summary["max_bytes"] for kind, summary in row["messages"].items()}
    return {"size": size, "codes": len(codes), "tiles": row["tiles"], "batches": row["batches"],
            "detections": row["detections"], "messages": row["messages"], "largest_message_bytes": largest,
            "keys_left": row["keys_left"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4000,8000,12000,16000,20000")
    parser.add_argument("--compression", default="none", choices=["none", "zlib"])
    parser.add_argument("--shared", default="true", choices=["true", "false"])
    parser.add_argument("--options", type=json.loads, default={}, help='job options as JSON: {"batch_size": 8}')
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON lines here too")
    parser.add_argument(
        "--messages", type=int, metavar="N", default=0, help="instead: the broker messages of one job per size, N²"
        " codes per 1000² cell"
    )  # fmt: skip
    args = parser.parse_args()
    if args.messages:
        with tempfile.TemporaryDirectory(prefix="tilerec-messages-") as folder:
            for size in (int(s) for s in args.sizes.split(",")):
                print(json.dumps(messages(size, args.messages, Path(folder), args.options)), flush=True)
        return
    os.environ.setdefault("TILEREC_ALLOWED_ROOTS", "")
    from tasks import app
    from tasks.local import RedisServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="tilerec-gigapixel-") as folder, RedisServer() as server:
        app.conf.update(broker_url=server.url, result_backend=server.url, tilerec_store_url=server.url)
        for size in (int(s) for s in args.sizes.split(",")):
            row = run_size(size, Path(folder), server.url, args.compression, args.shared == "true", args.options)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if len(rows) > 1:
        pixels = np.array([r["megapixels"] for r in rows])
        seconds = np.array([r["wall_s"] for r in rows])
        slope, intercept = np.polyfit(pixels, seconds, 1)
        fitted = slope * pixels + intercept
        r2 = 1 - ((seconds - fitted) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
        print(json.dumps({"fit": f"wall_s = {slope:.4f} * megapixels + {intercept:.2f}", "r2": round(float(r2), 4)}))


if __name__ == "__main__":
    main()
