"""What a run writes: the summary, the JSON (tilerec's schema or COCO), annotated images, the exit code."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
from rich.console import Console
from rich.table import Table

from pipeline.model import Recognition
from pipeline.outputs.export import coco_document, geojson_document, hocr_document, plain_text
from pipeline.outputs.render import draw_detections
from pipeline.readers import sources
from tasks.cli.errors import EXIT_FAILED, EXIT_OK, CliError, describe, markup_safe, print_error, say
from tasks.cli.inputs import Target

if TYPE_CHECKING:  # tasks.client loads the Celery app: imported when a run starts
    from tasks.client import Completed


def label_counts(result: Recognition) -> str:
    counts = Counter(result.detections.labels)
    return ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "none"


def summary_row(outcome: Completed) -> dict[str, str]:
    """One image's summary cells; tiles that failed in a partial result (--on-tile-error partial) are shown."""
    result = outcome.result
    cells = {"image": outcome.image.given, "wall s": f"{outcome.seconds:.1f}"}
    if result is None:
        return {**cells, "detections": "failed", "per label": "", "tiles": "", "batches": "", "tasks": ""}
    failed = len(result.failed_tiles)
    crops_failed = len(result.second_stage.failed_crops) if result.second_stage is not None else 0
    return {
        **cells,
        "detections": str(len(result.detections)) + (f" ({crops_failed} crops failed)" if crops_failed else ""),
        "per label": label_counts(result),
        "tiles": f"{result.tiles}" + (f" ({failed} failed)" if failed else ""),
        "batches": str(result.batches),
        "tasks": str(result.tasks),
    }


def summarize(outcomes: Sequence[Completed], console: Console) -> None:
    """A table on a terminal; one plain line per image otherwise."""
    rows = [summary_row(outcome) for outcome in outcomes]
    if console.is_terminal:
        table = Table(title="tilerec", title_justify="left")
        columns = ("image", "detections", "per label", "tiles", "batches", "tasks", "wall s")
        for column in columns:
            table.add_column(column, justify="left" if column in ("image", "per label") else "right")
        for row in rows:
            table.add_row(*(markup_safe(row[column]) for column in columns))
        console.print(table)
        return
    for row in rows:
        if row["detections"] == "failed":
            say(console, f"{row['image']}: failed after {row['wall s']} s")
            continue
        say(
            console,
            f"{row['image']}: {row['detections']} detections ({row['per label']}), "
            f"{row['tiles']} tiles in {row['batches']} batches, {row['tasks']} tasks, {row['wall s']} s",
        )


def document(outcomes: Sequence[Completed], fmt: str, wgs84: bool = False) -> Any:
    """The --json output: one recognition (or a list, for several images), or one COCO document, GeoJSON
    FeatureCollection, plain text (pages split by form feeds) or hOCR document for them all."""
    done = [outcome for outcome in outcomes if outcome.result is not None]
    recognitions = [outcome.result for outcome in done]
    names = [outcome.image.given for outcome in done]
    if fmt == "text":
        return plain_text(recognitions)
    if fmt == "hocr":
        return hocr_document(recognitions, names)
    if fmt == "coco":
        return coco_document(recognitions, names)
    if fmt == "geojson":
        try:
            return geojson_document(recognitions, names, wgs84)
        except ValueError as error:
            raise CliError(f"cannot write GeoJSON: {error}", EXIT_FAILED) from None
    results = [recognition.to_json() for recognition in recognitions]
    return results[0] if len(outcomes) == 1 else results


def write_json(destination: str, data: Any) -> None:
    """Write a document to a file or stdout ("-"): a str as it is (text, hOCR), anything else as JSON."""
    text = data if isinstance(data, str) else json.dumps(data, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot write {destination!r}: {error.strerror or error}", EXIT_FAILED) from None


def write_annotated(target: Target, result: Recognition, path: Path) -> None:
    """The merged detections drawn on the original image (keypoints named, so COCO's skeleton is drawn)."""
    pixels = sources.decode(target.path.read_bytes())
    canvas = draw_detections(pixels, result.detections)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise CliError(f"cannot write the annotated image {str(path)!r}", EXIT_FAILED)


def write_outputs(
    outcomes: Sequence[Completed], json_to: str | None, fmt: str, annotated: Sequence[Path], wgs84: bool = False
) -> None:
    if json_to is not None and any(outcome.result is not None for outcome in outcomes):
        write_json(json_to, document(outcomes, fmt, wgs84))
    for outcome, path in zip(outcomes, annotated, strict=False):
        if outcome.result is not None:
            write_annotated(outcome.image, outcome.result, path)


def report_failures(outcomes: Sequence[Completed]) -> int:
    """One error line per failed job; the exit code of the run."""
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    for outcome in failed:
        print_error(f"{outcome.image.given}: {describe(outcome.error)}")
    return EXIT_FAILED if failed else EXIT_OK
