"""The decode floor: the serial part of a job of a decoded format at W=2, measured in one process, and the best
ratio to the one-process time that it leaves.

    python -m bench.floor [--size 8000] [--reps 5] [--formats jpg,png,webp,tif] [--recognizer qrcode]
        [--out bench-out/floor]

For each format of the benchmark's code scene (the scenes of `bench.versus`), interleaved, `reps` times, in this
process at one thread:

- decode: the image decoded whole (`sources.decode`), what the one-process run pays before its first tile, and
  decode OpenCV: by `cv2.imdecode`, as the readers before libvips decoded a JPEG, PNG or WebP whole;
- serial: what the tiling task of a streamed job does alone: the image opened in row order (grey where the job's
  tiles are grey), each tile made storable and stored in a private Redis row by row (`store.put_tiles`, as
  `tasks.jobs` streams it), and first_row, when its first row of tiles was stored; serial colour: the same with
  the image opened in colour and each tile converted to grey (how it was done before bands were converted once);
- recognize: the tiles recognized one after the other (`recognize_windows`; a tiled TIFF's read from the file).

The one-thread time is decode + recognize. At W=2 the tiling process does the serial part, then recognizes; the
other process recognizes from the first row on. With no cost per batch and two full cores, the job cannot end
before max((recognize + first_row + serial) / 2, serial + a row's tiles / 2): the floor, and one-thread time over
it is the best ratio the decode leaves. Each part is timed by the clock and by the process's user CPU time: on a
loaded machine the CPU times are the better estimate of what the parts cost on an idle one (libvips may use a
second thread, so they can also exceed it), and the floor is given from both. `--together` also measures that
floor instead of adding it up: each format's job as an ideal W=2 that costs nothing to distribute
(`bench.inprocess.run_together` with `decoding`: two one-thread processes share the tiles through a counter; the
first decodes the image in row order, as the tiling task streams it, into shared memory, then recognizes, while
the other recognizes each row once decoded; a TIFF's tiles are read from the file by both), once per rep,
interleaved: no Celery, no Redis, no copy of a tile, only the decode, the recognition and what two processes of
this machine give over one (the shared image's pages touched beforehand, as a warm process's are). Against the
same job in one process (W=1: decoding in row order, then recognizing) it bounds what any W=2 job of that format
gains here; `bench.versus --in-process` gives the warm one-process run to hold the W=2 time against.
Writes floor.json and floor.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.versus import _scenes

PARTS = ("decode", "decode_opencv", "first_row", "serial", "serial_colour", "recognize")


def _user_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


class _Clocks:
    """Wall and user CPU seconds since it was made (user time: the kernel's time faulting in a whole image's fresh
    pages varied 0.1 to 1.2 s with the load here, and is not the decoder's work)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), _user_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, _user_seconds() - self.cpu


def _decode(path: Path) -> tuple[float, float]:
    from pipeline.readers.sources import decode

    clocks = _Clocks()
    decode(path.read_bytes())
    return clocks.read()


def _decode_opencv(path: Path) -> tuple[float, float]:
    import cv2
    import numpy as np

    clocks = _Clocks()
    cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    return clocks.read()


def _serial(path: Path, options: Any, client: Any, grey: bool) -> dict[str, tuple[float, float]]:
    """The first row of tiles stored and the last ((wall, CPU) seconds each), as the tiling task streams the image
    (`grey`: opened grey where its tiles are, else in colour and each tile converted)."""
    from pipeline.inference import grey_tiles, storable, windows_of
    from pipeline.readers.sources import open_source
    from pipeline.tiling import row_ends
    from tasks import store

    clocks, first = _Clocks(), [(0.0, 0.0)]
    source = open_source(path, in_row_order=True, grey=grey and grey_tiles(options))
    windows = windows_of(source.height, source.width, options)
    ends = row_ends(windows)
    first_row_end = min(ends)

    def tiles() -> Any:
        for window in windows:
            if window.index == first_row_end:  # the first row is stored by the time the next tile is asked for
                first[0] = clocks.read()
            yield window, storable(source.read(window), options)

    store.put_job(client, "floor", "{}", len(windows), 600, streamed=True)
    store.put_tiles(client, "floor", tiles(), 600, ends)
    total = clocks.read()
    source.close()
    store.delete_job(client, "floor", len(windows))
    return {"first_row": first[0], "serial": total}


def _recognize(path: Path, options: Any) -> tuple[tuple[float, float], int, int]:
    """((wall, CPU) seconds, tiles, rows of tiles) of the tiles recognized one after the other, the image read as
    in one process: a tiled TIFF window by window (grey for a grey-only recognizer, as tile tasks read it), anything
    else decoded whole first (not timed)."""
    from pipeline.inference import grey_tiles, recognize_windows, windows_of
    from pipeline.readers.sources import open_source
    from pipeline.tiling import row_ends

    source = open_source(path, grey=path.suffix == ".tif" and grey_tiles(options))
    windows = windows_of(source.height, source.width, options)
    clocks = _Clocks()
    recognize_windows(source.read, windows, options, source.width, source.height)
    seconds = clocks.read()
    source.close()
    return seconds, len(windows), len(row_ends(windows))


def floor(first_row: float, serial: float, recognize: float, rows: int) -> float:
    """The earliest end of a W=2 job (see the module's docstring)."""
    return max((recognize + first_row + serial) / 2, serial + recognize / rows / 2)


def run(size: int, reps: int, formats: tuple[str, ...], recognizer: str, out: Path, together: bool) -> dict[str, Any]:
    from bench.inprocess import _set_threads, _warm_up, run_together
    from pipeline.memory import keep_freed_buffers
    from pipeline.options import parse_options
    from tasks.local import RedisServer

    keep_freed_buffers()
    _set_threads(1)
    _warm_up(recognizer, {})
    options = parse_options(recognizer, {})
    scenes = [path for kind, path in _scenes(out / "scenes", size, formats) if kind == "codes"]
    rows: dict[str, dict[str, Any]] = {path.suffix.lstrip("."): {"load": []} for path in scenes}
    with RedisServer() as server:
        client = server.client()
        for rep in range(reps):
            for path in scenes if rep % 2 == 0 else scenes[::-1]:
                row = rows[path.suffix.lstrip(".")]
                tiff = path.suffix == ".tif"  # its tile tasks read their own windows: nothing serial
                nothing = {"first_row": (0.0, 0.0), "serial": (0.0, 0.0)}
                grey = nothing if tiff else _serial(path, options, client, grey=True)
                colour = nothing if tiff else _serial(path, options, client, grey=False)
                parts = {"decode": (0.0, 0.0) if tiff else _decode(path),
                         "decode_opencv": (0.0, 0.0) if tiff else _decode_opencv(path),
                         **grey, "serial_colour": colour["serial"]}  # fmt: skip
                parts["recognize"], row["tiles"], row["rows"] = _recognize(path, options)
                for workers in ((1, 2) if rep % 2 == 0 else (2, 1)) if together else ():
                    shared = run_together({"image": str(path), "recognizer": recognizer}, workers, 1800, decoding=True)
                    if "error" in shared:
                        raise RuntimeError(f"{workers} process(es) failed on {path.name}: {shared['error']}")
                    row.setdefault(f"together_{workers}_s", []).append(shared["recognize_s"])
                for part, (wall, cpu) in parts.items():
                    row.setdefault(f"{part}_s", []).append(wall)
                    row.setdefault(f"{part}_cpu_s", []).append(cpu)
                row["load"].append(os.getloadavg()[0])
                print(f"rep {rep} {path.name}: " + ", ".join(f"{part} {wall:.3f} ({cpu:.3f} CPU)" for part, (wall, cpu)
                                                            in parts.items()), file=sys.stderr)  # fmt: skip
    for row in rows.values():
        for clock in ("", "_cpu"):
            median = {part: statistics.median(row[f"{part}{clock}_s"]) for part in PARTS}
            row.update({f"{part}{clock}_median_s": value for part, value in median.items()})
            row[f"floor{clock}_s"] = floor(median["first_row"], median["serial"], median["recognize"], row["rows"])
            row[f"best_ratio{clock}"] = (median["decode"] + median["recognize"]) / row[f"floor{clock}_s"]
        if "together_2_s" in row:
            one, two = statistics.median(row["together_1_s"]), statistics.median(row["together_2_s"])
            row.update(together_1_median_s=one, together_2_median_s=two, together_ratio=one / two)
        row["load_median"] = statistics.median(row["load"])
    summary: dict[str, Any] = {"size": size, "reps": reps, "recognizer": recognizer, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "floor.json").write_text(json.dumps(summary, indent=1))
    (out / "floor.md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['size']}² code scene, {summary['recognizer']}, medians of {summary['reps']} interleaved reps "
        "in one process at one thread, wall seconds (user CPU seconds); floor = the earliest end of a W=2 job with no "
        "cost per batch; best ratio = (decode + recognize) / floor",
        "",
        "| format | decode s | decode, OpenCV s | first row s | serial s | serial, colour s | recognize s | floor s "
        "| best ratio | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        cells = [f"{row[f'{part}_median_s']:.3f} ({row[f'{part}_cpu_median_s']:.3f})" for part in PARTS]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {row['floor_s']:.3f} ({row['floor_cpu_s']:.3f}) "
            f"| {row['best_ratio']:.2f} ({row['best_ratio_cpu']:.2f}) | {row['load_median']:.1f} |"
        )
    together = {name: row for name, row in summary["rows"].items() if "together_ratio" in row}
    if together:
        lines += ["", "The job with nothing to distribute it (`--together`: one process decoding in row order into "
                  "shared memory and recognizing, against two sharing the tiles; medians, wall seconds):", "",
                  "| format | one process s | two processes s | × |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {name} | {row['together_1_median_s']:.3f} | {row['together_2_median_s']:.3f} "
                  f"| {row['together_ratio']:.2f} |" for name, row in together.items()]  # fmt: skip
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--formats", default="jpg,png,webp,tif", help="of png, tif (uncompressed, tiled), jpg, webp")
    parser.add_argument("--recognizer", default="qrcode")
    parser.add_argument("--together", action="store_true", help="also each job as an ideal W=2 (and W=1)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/floor"))
    args = parser.parse_args()
    summary = run(args.size, args.reps, tuple(args.formats.split(",")), args.recognizer, args.out, args.together)
    print(_markdown(summary))


if __name__ == "__main__":
    main()
