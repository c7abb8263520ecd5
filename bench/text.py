"""`python -m bench.text`: the `text` recognizer on W worker processes against RapidOCR on the whole image in one
process (the user's alternative), side by side in one run.

    python -m bench.text [--sizes 2000,4000,8000,12000] [--page-sizes 2000,4000] [--workers 2] [--reps 1]
                         [--det-scale 0.5] [--out bench-out/text]

Scenes: generated posters (`poster`: a headline and blocks of two columns of 32 px text on a
light ground, as many of 1,200 words as fit: 163 at 2000 px, 483 at 4000, all from 8000 on, so the biggest hold the
same text in more white space), generated pages (three or more columns of 28 px text filling the page) and the
real scans in ../shared/images/text.
Each scene is written as a PNG and read by both: tilerec submits it to a private cluster (a private Redis and one
`celery worker` of W processes, warmed first) and times the job from submit to result; RapidOCR (`RapidOCR()`,
built and warmed once before, as a long-lived process would) is timed on `ocr(path)`. The two alternate which goes
first on each repetition, so a drift of the machine's speed hits both alike; the load average is recorded with
each figure. Scores: word recall (each truth word found as often as it occurs) and character error rate of the
text in reading order. Writes `text.json` and `text.md`. Needs the `bench` extra (it has RapidOCR).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.cluster import Cluster
from bench.scenes import shared_images_dir
from pipeline.scenes.text import (
    LineTruth,
    TextPage,
    character_error_rate,
    column_page,
    draw_lines,
    word_recall,
    words,
)

POSTER_WORDS = 1200


def poster(
    width: int,
    vocabulary: Sequence[str],
    size: int = 32,
    headline: str = "Tilerec reads posters",
    per_block: int = 160,
    seed: int = 0,
) -> TextPage:
    """A poster `width` px wide (3:4): a headline a fortieth of its width tall over a light grey ground, and text
    blocks of two columns at `size` px (`per_block` words each), laid row by row with white space between them,
    filled with the words in order as far as they fit. Text stays `size` px at every poster size, as when a bigger
    poster holds more (or is printed at more dots per inch): whole-image OCR shrinks it out of reach.

    Returns:
        The page; its lines are the headline, then each block's lines in reading order, blocks row by row.
    """
    height = width * 3 // 4
    image = np.full((height, width), 235, np.uint8)
    rng = np.random.default_rng(seed)
    image = np.clip(image.astype(np.int16) + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    big = max(size, width // 40)
    truths = draw_lines(image, [(width // 20, height // 30, headline)], big)
    block_width = min(width - 2 * (width // 20), 1800)
    across = max(1, (width - width // 10 + 200) // (block_width + 200))
    top, start = height // 30 + 2 * big, 0
    while start < len(vocabulary):
        row = []
        for column in range(across):
            chunk = vocabulary[start : start + per_block]
            if not chunk:
                break
            row.append((width // 20 + column * (block_width + 200), column_page(chunk, 2, block_width, size, 40, 80)))
            start += len(chunk)
        tallest = max(block.image.shape[0] for _, block in row)
        if top + tallest > height - height // 40:
            break
        for x, block in row:
            rows, cols = block.image.shape
            image[top : top + rows, x : x + cols] = np.minimum(image[top : top + rows, x : x + cols], block.image)
            truths += [LineTruth(t.text, (t.box[0] + x, t.box[1] + top, t.box[2], t.box[3])) for t in block.lines]
        top += tallest + 150
    return TextPage(image, truths)


def _scenes(folder: Path, sizes: list[int], page_sizes: list[int]) -> list[tuple[str, Path, str]]:
    """(name, image file, true text) of every scene, written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for size in sizes:
        scene = poster(size, words(POSTER_WORDS, seed=size))
        found.append((f"poster {size}", scene))
    for size in page_sizes:
        columns = max(3, size // 1300)
        # about as tall as wide: N² / 3800 words of 28 px text
        scene = column_page(words(size * size // 3800, seed=size + 1), columns=columns, width=size, size=28)
        found.append((f"page {size}", scene))
    written = []
    for name, scene in found:
        path = folder / f"{name.replace(' ', '-')}.png"
        cv2.imwrite(str(path), scene.image)
        written.append((f"{name} ({scene.image.shape[1]}x{scene.image.shape[0]})", path, scene.text))
    scans = shared_images_dir() / "text"
    for image in sorted(scans.glob("*.tif")):
        truth = image.with_suffix(".txt")
        if truth.exists():
            copy = folder / image.name
            copy.write_bytes(image.read_bytes())
            written.append((f"scan {image.stem}", copy, truth.read_text(encoding="utf-8")))
    return written


def _scores(truth: str, found: str, seconds: float) -> dict[str, float]:
    return {
        "recall": word_recall(truth.split(), found.split()),
        "cer": character_error_rate(truth, found),
        "seconds": seconds,
        "load": os.getloadavg()[0],
    }


def _tilerec(cluster: Cluster, path: Path, options: dict[str, Any], truth: str) -> dict[str, float]:
    run = cluster.run(str(path), "text", options, 3600)
    if run.error or run.result is None:
        raise RuntimeError(f"tilerec failed on {path.name}: {run.error}")
    return _scores(truth, run.result["second_stage"]["output"]["text"], run.wall_s)


def _rapidocr(ocr: Any, path: Path, truth: str) -> dict[str, float]:
    began = time.perf_counter()
    found = ocr(str(path))
    seconds = time.perf_counter() - began
    return _scores(truth, "\n".join(found.txts or ()), seconds)


def run(sizes: list[int], page_sizes: list[int], workers: int, reps: int, det_scale: float, out: Path) -> dict:
    from rapidocr import RapidOCR

    scenes = _scenes(out / "scenes", sizes, page_sizes)
    smallest = str(min((path for _, path, _ in scenes), key=lambda path: path.stat().st_size))
    ocr = RapidOCR(params={"Global.log_level": "error"})
    ocr(smallest)  # builds its three sessions: a long-lived process has them
    options = {"det_scale": det_scale, "skip_blank": True}
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    with Cluster(workers, out, {"TILEREC_ALLOWED_ROOTS": str((out / "scenes").resolve())}) as cluster:
        cluster.warm(smallest, "text", options, 600)
        for rep in range(reps):
            for name, path, truth in scenes:
                row = rows.setdefault(name, {"tilerec": [], "rapidocr": []})
                order = ("tilerec", "rapidocr") if rep % 2 == 0 else ("rapidocr", "tilerec")
                for who in order:
                    measure = (
                        _tilerec(cluster, path, options, truth) if who == "tilerec" else _rapidocr(ocr, path, truth)
                    )
                    row[who].append(measure)
                    figures = row[who][-1]
                    print(f"rep {rep} {name} {who}: recall {figures['recall']:.3f}, CER {figures['cer']:.3f}, "
                          f"{figures['seconds']:.1f} s, load {figures['load']:.1f}", file=sys.stderr)  # fmt: skip
    summary = {"workers": workers, "reps": reps, "det_scale": det_scale, "cpus": os.cpu_count(), "rows": {}}
    for name, row in rows.items():
        summary["rows"][name] = {
            who: {key: statistics.median(run[key] for run in runs) for key in ("recall", "cer", "seconds", "load")}
            for who, runs in row.items()
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.json").write_text(json.dumps(summary, indent=1))
    (out / "text.md").write_text(markdown(summary))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The report's table: per scene, both tools' recall, CER and time, and the time ratio."""
    lines = [
        f"tilerec `text` at W={summary['workers']} (det_scale {summary['det_scale']}, skip_blank) against "
        f"RapidOCR on the whole image in one process; median of {summary['reps']} interleaved run(s); "
        f"{summary['cpus']} CPUs; load = 1-minute load average at the measurement",
        "",
        "| scene | tilerec recall | RapidOCR recall | tilerec CER | RapidOCR CER | tilerec s | RapidOCR s | "
        "time ratio | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        ours, theirs = row["tilerec"], row["rapidocr"]
        lines.append(
            f"| {name} | {ours['recall']:.3f} | {theirs['recall']:.3f} | {ours['cer']:.3f} | {theirs['cer']:.3f} | "
            f"{ours['seconds']:.1f} | {theirs['seconds']:.1f} | {ours['seconds'] / theirs['seconds']:.2f} | "
            f"{(ours['load'] + theirs['load']) / 2:.1f} |"
        )
    return "\n".join([*lines, ""])


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[2000, 4000, 8000, 12000], help="poster widths")
    parser.add_argument("--page-sizes", type=_ints, default=[2000, 4000], help="page widths")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--det-scale", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench-out/text"))
    args = parser.parse_args()
    summary = run(args.sizes, args.page_sizes, args.workers, args.reps, args.det_scale, args.out)
    print(markdown(summary))


if __name__ == "__main__":
    main()
