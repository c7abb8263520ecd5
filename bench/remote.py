"""`python -m bench.remote [--size 20000] [--out FILE]`: one Cloud-Optimized GeoTIFF recognized from local disk and
from object storage (a SeaweedFS S3 server on loopback, `tasks.local.S3Server`), with wall time and peak memory per
process.

The scene is bench.gigapixel's (RGB, one QR code per 1000² cell at known places), converted by GDAL into a COG
(512² deflate tiles, overviews) with a UTM geotransform, so it is read through rasterio in both runs. Each run has
fresh workers, as in production with separate queues (W=2 tile processes):
    jobs worker   (1 process, queue tilerec)        : the tiling task (reads the header, plans) and the merge
    tiles worker  (2 processes, queue tilerec.tiles) : the tile tasks (each reads its own windows, by range requests
                                                       for the object)
Every code must be found exactly once. Peak memory is each process's VmHWM from /proc, read after the job.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gigapixel import check, peak_mb, write_scene

BUCKET = "bench"


def write_cog(folder: Path, size: int) -> tuple[Path, list[Any]]:
    """The gigapixel scene as a georeferenced COG; returns its path and the codes' truth."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    staging = folder / "staging.tif"
    codes = write_scene(staging, size, "zlib")
    with rasterio.open(staging, "r+") as dataset:  # a plain TIFF given a place: UTM 33N, 0.5 m pixels
        dataset.crs, dataset.transform = "EPSG:32633", from_origin(500_000, 4_200_000, 0.5, 0.5)
    cog = folder / "scene-cog.tif"
    rasterio.shutil.copy(staging, cog, driver="COG", blocksize=512, compress="deflate", overview_resampling="average",
                         BIGTIFF="IF_SAFER")  # fmt: skip
    staging.unlink()
    return cog, codes


def run(image: str, redis_url: str, env: dict[str, str], folder: Path, codes: list[Any], name: str) -> dict[str, Any]:
    from tasks import recognize
    from tasks.client import fetch_document
    from tasks.local import Worker

    logs = folder / f"workers-{name}.log"
    with (
        Worker(redis_url, 1, queues=["tilerec"], env=env, log_file=str(logs), name=f"jobs-{name}") as jobs,
        Worker(redis_url, 2, queues=["tilerec.tiles"], env=env, log_file=str(logs), name=f"tiles-{name}") as tiles,
    ):
        submitted = time.perf_counter()
        result = fetch_document(recognize.delay(image, "qrcode").get(timeout=3600))
        wall = time.perf_counter() - submitted
        memory = {
            "jobs_main_mb": round(peak_mb(jobs.process.pid), 1),
            "jobs_child_mb": round(max(peak_mb(pid) for pid in jobs.child_pids()), 1),
            "tiles_main_mb": round(peak_mb(tiles.process.pid), 1),
            "tiles_children_mb": [round(peak_mb(pid), 1) for pid in tiles.child_pids()],
        }
    return {"input": name, "image": image, "wall_s": round(wall, 2), "tiles": result["tiling"]["tiles"],
            "batches": result["tiling"]["batches"], "timings": result["timings"],
            "check": check(result["detections"], codes), **memory}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON lines here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("TILEREC_ALLOWED_ROOTS", "")
    from tasks import app
    from tasks.local import RedisServer, S3Server

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="tilerec-remote-") as name,
        RedisServer() as server,
        S3Server() as s3,
    ):
        folder = Path(name)
        app.conf.update(broker_url=server.url, result_backend=server.url, tilerec_store_url=server.url)
        began = time.perf_counter()
        cog, codes = write_cog(folder, args.size)
        fs = s3.filesystem()
        fs.mkdir(BUCKET)
        fs.put_file(str(cog), f"{BUCKET}/{cog.name}")
        prepared = time.perf_counter() - began
        env = {"TILEREC_RESULT_BACKEND": server.url, "TILEREC_ALLOWED_ROOTS": str(folder),
               "TILEREC_ALLOWED_URLS": f"s3://{BUCKET}", **s3.env()}  # fmt: skip
        for image, label in ((str(cog), "local disk"), (f"s3://{BUCKET}/{cog.name}", "S3 (SeaweedFS, loopback)")):
            row = run(image, server.url, env, folder, codes, label)
            row.update(size=args.size, object_mb=round(cog.stat().st_size / 2**20, 1), prepare_s=round(prepared, 1),
                       s3_server_mb=round(peak_mb(s3.process.pid), 1))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


if __name__ == "__main__":
    main()
