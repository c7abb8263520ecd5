"""In-process recognition, timed from the image file on disk, in a fresh interpreter per variant.

A fresh process per variant because thread settings leak: once OpenCV's pool or an ONNX Runtime session is built
with N threads, later runs in that process keep N. The parent runs `python -m bench.inprocess SPEC_JSON` and reads
one JSON line back.

Modes: "tiled" is `pipeline.recognize_image` (same tiles and merge as tilerec: what SAHI does); "whole" calls the
recognizer once on the whole image (no tiling, no merge). Threads: "default" leaves the libraries' pools as they
come (what a SAHI user gets); a number caps OpenCV and ONNX Runtime to it (1: the per-core compute limit).
`run_together` starts W one-thread interpreters that share the same tiles, each taking the next one not yet taken:
the recognition stage with a perfect split and no Celery at all, so the hardware's own limit on W processes (cores
shared with hyperthreads, memory bandwidth, other tenants) shows apart from what tilerec adds.
Every variant keeps freed buffers (`pipeline.memory`), as tilerec's worker processes do: without it glibc faults
fresh pages in for each tile's buffers (barcode: 360 thousand faults, 28 % slower), and the ratios would credit
distribution with what is an allocator setting.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import vm_hwm_mb


def _configure_models() -> None:
    """The parent's models (TILEREC_MODEL_DIR), as a worker is given its own: the library reads no variable."""
    from pipeline.recognizers.dnn import configure_models

    configure_models(os.environ.get("TILEREC_MODEL_DIR", ""))


def _set_threads(threads: str | int) -> None:
    """Must run before any recognizer is built: ONNX Runtime reads the budget when its session is created."""
    if threads == "default":
        return
    from pipeline.recognizers import limit_threads

    limit_threads(int(threads))


def _warm_up(recognizer: str, options: dict[str, Any]) -> None:
    """Build the recognizer and start the thread pools on a blank tile, as a warm worker process would have."""
    from pipeline.options import parse_options
    from pipeline.recognizers import get_recognizer

    parsed = parse_options(recognizer, options)
    get_recognizer(parsed.recognizer, parsed.params)(np.full((parsed.tile, parsed.tile, 3), 200, dtype=np.uint8))


def _whole(pixels: np.ndarray, recognizer: str, options: dict[str, Any]) -> tuple[list[dict[str, Any]], float]:
    """The recognizer once on the whole image, detections placed as a single full-image window would be."""
    from pipeline.merge.detections import place
    from pipeline.options import parse_options
    from pipeline.recognizers import get_recognizer
    from pipeline.tiling import Window

    parsed = parse_options(recognizer, options)
    height, width = pixels.shape[:2]
    began = time.perf_counter()
    found = get_recognizer(parsed.recognizer, parsed.params)(pixels)
    seconds = time.perf_counter() - began
    return place(found, Window(0, 0, 0, width, height), width, height).to_records(), seconds


def _faults_since(before: resource.struct_rusage) -> dict[str, float]:
    """The pass's page faults (minor: fresh pages the kernel handed the process) and its system CPU seconds, which
    on this VM are mostly those faults: a pass that maps a whole decoded image afresh pays them, a warm one reuses."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": now.ru_minflt - before.ru_minflt, "sys_s": now.ru_stime - before.ru_stime}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `reps` passes over the image file; detections from the first pass (later ones are checked equal).

    `warm`: the process keeps every freed buffer (`keep_all_freed_memory`) and makes one pass first, untimed
    ("cold" in the result), so the timed passes reuse the pages of its decoded image instead of faulting in fresh
    ones, whose cost on this VM varies twentyfold from minute to minute (docs/performance.md)."""
    from pipeline.memory import keep_all_freed_memory, keep_freed_buffers

    warm = bool(spec.get("warm"))
    if warm:
        keep_all_freed_memory()
    else:
        keep_freed_buffers()
    _set_threads(spec["threads"])
    from pipeline.inference import recognize_image
    from pipeline.readers.sources import decode

    recognizer, options = spec["recognizer"], spec.get("options", {})
    _warm_up(recognizer, options)
    passes, detections, identical = [], None, True
    for _ in range(spec.get("reps", 1) + warm):
        usage0, cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        if Path(spec["image"]).suffix in (".tif", ".tiff") and spec["mode"] != "whole":
            # a tiled TIFF is read window by window, as the tile tasks read it (grey for a grey-only recognizer, as
            # they open it): no whole decode
            from pipeline.inference import grey_tiles, recognize_source
            from pipeline.options import parse_options
            from pipeline.readers.sources import open_source

            source = open_source(Path(spec["image"]), grey=grey_tiles(parse_options(recognizer, options)))
            t1 = t2 = time.perf_counter()
            result = recognize_source(source, recognizer, **options)
            source.close()
            records, tiles = result.detections.to_records(), result.tiles
            recognize_s, merge_s = result.timings["recognize_s"], result.timings["merge_s"]
            t3 = time.perf_counter()
            passes.append({"read_s": t1 - t0, "decode_s": 0.0, "recognize_s": recognize_s, "merge_s": merge_s,
                           "total_s": t3 - t0, "cpu_s": time.process_time() - cpu0, "tiles": tiles,
                           **_faults_since(usage0)})  # fmt: skip
            detections = records if detections is None else detections
            identical = identical and records == detections
            continue
        data = Path(spec["image"]).read_bytes()
        t1 = time.perf_counter()
        pixels = decode(data)
        del data
        t2 = time.perf_counter()
        if spec["mode"] == "whole":
            records, recognize_s = _whole(pixels, recognizer, options)
            merge_s, tiles = 0.0, 1
        else:
            result = recognize_image(pixels, recognizer, **options)
            records, tiles = result.detections.to_records(), result.tiles
            recognize_s, merge_s = result.timings["recognize_s"], result.timings["merge_s"]
        t3 = time.perf_counter()
        passes.append(
            {
                "read_s": t1 - t0,
                "decode_s": t2 - t1,
                "recognize_s": recognize_s,
                "merge_s": merge_s,
                "total_s": t3 - t0,
                "cpu_s": time.process_time() - cpu0,
                "tiles": tiles,
                **_faults_since(usage0),
            }
        )
        if detections is None:
            detections = records
        identical = identical and records == detections
        del pixels
    import cv2

    return {
        "cold": passes.pop(0) if warm else None,
        "passes": passes,
        "detections": detections,
        "reps_identical": identical,
        "peak_rss_mb": vm_hwm_mb(os.getpid()),
        "opencv_threads": cv2.getNumThreads(),
    }


SHARE_CHUNK = 4  # tiles taken at a time: neighbours share a TIFF's tiles, which each process caches (as a batch)


def _share(spec: dict[str, Any], start: Any, next_tile: Any, out: Any, rank: int, ready: Any, image: Any) -> None:
    """One process of the ceiling: load and warm up, wait for the others, then take the next tiles not yet taken
    until none is left (the dynamic split of an ideal scheduler that costs nothing). A TIFF's windows are read from
    the file by each process (grey for a grey-only recognizer, as tile tasks read them); any other image is decoded
    whole by each before the start, or, given `image` (shared memory), by process 0 alone after the start, in row
    order as the tiling task streams it, with no copy to a store: a tile is then taken once process 0 has decoded
    its row (`ready`: the tiles in place), so process 0 recognizes after decoding and the others from the first
    row on."""
    try:
        from multiprocessing import shared_memory

        from pipeline.memory import keep_freed_buffers

        keep_freed_buffers()
        _set_threads(1)
        _configure_models()
        from pipeline.inference import grey_tiles, recognize_window, windows_of
        from pipeline.options import parse_options
        from pipeline.readers.sources import open_source
        from pipeline.tiling import row_ends

        recognizer, options = spec["recognizer"], spec.get("options", {})
        parsed = parse_options(recognizer, options)
        decoded = image is not None
        source = open_source(Path(spec["image"]), in_row_order=decoded, grey=grey_tiles(parsed))  # else whole
        windows = windows_of(source.height, source.width, parsed)
        read = source.read
        if decoded:
            name, shape = image
            memory = shared_memory.SharedMemory(name=name)
            pixels = np.ndarray(shape, np.uint8, memory.buf)
            read = lambda w: pixels[w.y : w.y2, w.x : w.x2]  # noqa: E731
        _warm_up(recognizer, options)
        start.wait()
        started, cpu0, tiles, found, decode_s = time.time(), time.process_time(), 0, 0, 0.0
        if decoded and rank == 0:
            ends = row_ends(windows)
            for window in windows:
                pixels[window.y : window.y2, window.x : window.x2] = source.read(window)
                if window.index + 1 in ends:
                    ready.value = window.index + 1
            decode_s = time.time() - started
        while True:
            with next_tile.get_lock():
                first = next_tile.value
                next_tile.value += SHARE_CHUNK
            taken = windows[first : first + SHARE_CHUNK]
            if not taken:
                break
            while decoded and ready.value < first + len(taken):
                time.sleep(0.001)
            for window in taken:
                outcome = recognize_window(read, window, parsed, source.width, source.height)
                found += len(outcome.detections) if outcome.detections is not None else 0
            tiles += len(taken)
        out.put({"start": started, "end": time.time(), "cpu_s": time.process_time() - cpu0, "tiles": tiles,
                 "decode_s": decode_s, "found": found})  # fmt: skip
        source.close()
    except Exception as error:  # reported as data, like run_in_subprocess
        start.abort()
        out.put({"error": f"{type(error).__name__}: {error}"[:300]})


def run_together(spec: dict[str, Any], workers: int, timeout: float, decoding: bool = False) -> dict[str, Any]:
    """The hardware ceiling of the recognition stage: `workers` fresh one-thread interpreters share the tiles,
    released at once when all are loaded; with `decoding`, an image other than a TIFF is decoded by the first one
    after the release, in row order, into shared memory (`_share`): the ceiling of a whole streamed job. The stage
    runs from the first start to the last end."""
    import multiprocessing
    import queue
    from multiprocessing import shared_memory

    from pipeline.inference import grey_tiles
    from pipeline.options import parse_options
    from pipeline.readers.sources import open_source

    context = multiprocessing.get_context("spawn")
    start, next_tile, out = context.Barrier(workers), context.Value("l", 0), context.Queue()
    ready, image, memory = context.Value("l", 0), None, None
    path = Path(spec["image"])
    if decoding and path.suffix not in (".tif", ".tiff"):
        grey = grey_tiles(parse_options(spec["recognizer"], spec.get("options", {})))
        with contextlib.closing(open_source(path, in_row_order=True, grey=grey)) as header:  # nothing decoded
            shape = (header.height, header.width) + (() if header.channels == 1 else (header.channels,))
        memory = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
        # its pages touched here, not by the decoding: a fresh page's price swings twentyfold on this VM from one
        # minute to the next (docs/performance.md), and the one-thread baseline reuses warm pages too
        np.ndarray(shape, np.uint8, memory.buf)[:] = 0
        image = (memory.name, shape)
    procs = [context.Process(target=_share, args=(spec, start, next_tile, out, rank, ready, image))
             for rank in range(workers)]  # fmt: skip
    for proc in procs:
        proc.start()
    parts: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(parts) < workers:
            try:
                parts.append(out.get(timeout=1.0))
            except queue.Empty:
                if time.monotonic() > deadline:
                    return {"error": f"timed out after {timeout:.0f} s", "timed_out": True}
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    return {"error": "a share process died before it reported"}
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
        if memory is not None:
            memory.close()
            memory.unlink()
    errors = sorted((part["error"] for part in parts if "error" in part), key=lambda e: e.startswith("BrokenBarrier"))
    if errors:  # the cause first, not the others' broken barrier
        return {"error": errors[0]}
    return {
        "recognize_s": max(p["end"] for p in parts) - min(p["start"] for p in parts),
        "share_s": [p["end"] - p["start"] for p in parts],
        "decode_s": max(p["decode_s"] for p in parts),
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "tiles": sum(p["tiles"] for p in parts),
        "found": sum(p["found"] for p in parts),  # detections in all tiles, before merging
    }


def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run `run(spec)` in a fresh interpreter; a crash, an error or a time-out comes back as {"error": ...}."""
    command = [sys.executable, "-m", "bench.inprocess", json.dumps(spec)]
    cwd = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "timed_out": True}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


def main() -> None:
    _configure_models()
    spec = json.loads(sys.argv[1])
    try:
        out = run(spec)
    except Exception as error:  # reported to the parent as data: one failed variant must not stop the benchmark
        out = {"error": f"{type(error).__name__}: {error}"[:300]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
