"""`python -m bench.masks [--objects N]`: merge time and peak memory of N instance masks cut by tile seams, side
by side with the same detections as boxes only and as oriented boxes, each variant in a fresh process.

The scene is what a segmentation job over a large image gives the merge: objects (ellipses of 64 vertices,
12–52 px, at random angles, touching but not overlapping) over a grid of 640 px tiles overlapping by 20 %; each
tile that sees an object reports its piece (clipped to the tile, `cut` where the tile's edge cuts it), so objects
in the overlap bands come in two to four views. A correct merge gives back one detection per object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import shapely
from shapely import affinity

from bench.config import vm_hwm_mb
from pipeline.merge.detections import merge_detections, place
from pipeline.model import Detections
from pipeline.shapes import obb_corners
from pipeline.tiling import grid

VARIANTS = ("boxes", "obb", "masks")


def scene(objects: int, seed: int = 1) -> tuple[int, list[tuple[float, ...]]]:
    """(image side, objects as (cx, cy, a, b, angle)): ellipses on a jittered 60 px lattice that touch but do not
    overlap, as cells in a slide or buildings in a city do."""
    per_row = int(np.ceil(np.sqrt(objects)))
    side = per_row * 60
    rng = np.random.default_rng(seed)
    cells = np.arange(objects)
    cx, cy = (
        30 + 60 * (cells % per_row) + rng.uniform(-4, 4, objects),
        30 + 60 * (cells // per_row) + rng.uniform(-4, 4, objects),
    )
    a = rng.uniform(6, 26, objects)
    b = a * rng.uniform(0.4, 1.0, objects)
    angle = rng.uniform(0, 180, objects)
    return side, list(zip(cx, cy, a, b, angle, strict=True))


def tile_detections(side: int, objects: list[tuple[float, ...]], variant: str) -> Detections:
    """What the tiles report: each tile's pieces of the objects it sees, placed in the image."""
    shapes = [affinity.rotate(affinity.scale(shapely.Point(x, y).buffer(1, 16), a, b), t) for x, y, a, b, t in objects]
    bounds = shapely.bounds(np.array(shapes))
    parts = []
    for window in grid(side, side, 640, 0.2):
        seen = np.flatnonzero(
            (bounds[:, 0] < window.x2)
            & (bounds[:, 2] > window.x)
            & (bounds[:, 1] < window.y2)
            & (bounds[:, 3] > window.y)
        )
        if not len(seen):
            continue
        pieces = shapely.clip_by_rect(np.array(shapes)[seen], window.x, window.y, window.x2, window.y2)
        local = shapely.transform(pieces, lambda xy, w=window: xy - [w.x, w.y])
        xyxy = shapely.bounds(local)
        columns: dict = {}
        if variant == "masks":
            columns["masks"] = list(local)
        if variant == "obb":
            x, y, a, b, t = np.array([objects[k] for k in seen]).T
            columns["obb"] = np.stack([x - window.x, y - window.y, 2 * a, 2 * b, t], axis=1)
        found = Detections(xyxy, np.full(len(seen), 0.9), ["cell"] * len(seen), **columns)
        parts.append(place(found, window, side, side))
    return Detections.concat(parts)


def measure(objects: int, variant: str) -> dict:
    """One variant, in this process: detections in, merge time, objects out, peak RSS."""
    side, truth = scene(objects)
    detections = tile_detections(side, truth, variant)
    began = time.perf_counter()
    merged = merge_detections(detections)
    seconds = time.perf_counter() - began
    if variant == "obb":
        assert np.isfinite(obb_corners(merged.obb)).all()
    return {
        "variant": variant,
        "detections": len(detections),
        "objects": len(truth),
        "merged": len(merged),
        "merge_s": round(seconds, 3),
        "peak_rss_mb": round(vm_hwm_mb(os.getpid()) or 0.0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.objects, args.variant)))
        return
    rows = []
    for variant in VARIANTS:
        child = [sys.executable, "-m", "bench.masks", "--objects", str(args.objects), "--variant", variant]
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
    base = rows[0]
    print(f"{args.objects:,} objects over {base['detections']:,} tile detections (merge: greedy_nmm, ios 0.5)")
    print(f"{'variant':8} {'merged':>8} {'merge s':>8} {'x boxes':>8} {'peak RSS MB':>12}")
    for row in rows:
        ratio = row["merge_s"] / base["merge_s"] if base["merge_s"] else float("nan")
        print(
            f"{row['variant']:8} {row['merged']:>8,} {row['merge_s']:>8.2f} {ratio:>8.1f} {row['peak_rss_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
