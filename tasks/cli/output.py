"""What a run writes: the summary, the JSON (tilerec's schema or COCO), annotated images, the exit code."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import images
from pipeline.export import coco_document, geojson_document
from pipeline.model import Detections, Recognition
from pipeline.render import draw_detections
from tasks.cli.errors import EXIT_FAILED, EXIT_OK, CliError, print_error, say
from tasks.cli.inputs import Target
from tasks.cli.jobs import Outcome


def label_counts(result: dict[str, Any]) -> str:
    counts = Counter(record["label"] for record in result["detections"])
    return ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) or "none"


def summary_row(outcome: Outcome) -> dict[str, str]:
    """One image's summary cells; tiles that failed in a partial result (--on-tile-error partial) are shown."""
    row = outcome.result
    cells = {"image": outcome.target.given, "wall s": f"{outcome.seconds:.1f}"}
    if row is None:
        return {**cells, "detections": "failed", "per label": "", "tiles": "", "batches": "", "tasks": ""}
    failed = len(row.get("failed_tiles") or [])
    crops_failed = len((row.get("second_stage") or {}).get("failed_crops") or [])
    return {
        **cells,
        "detections": str(len(row["detections"])) + (f" ({crops_failed} crops failed)" if crops_failed else ""),
        "per label": label_counts(row),
        "tiles": f"{row['tiling']['tiles']}" + (f" ({failed} failed)" if failed else ""),
        "batches": str(row["tiling"].get("batches", row["tiling"]["tasks"])),
        "tasks": str(row["tiling"]["tasks"]),
    }


def summarize(outcomes: Sequence[Outcome], console: Console) -> None:
    """A table on a terminal; one plain line per image otherwise."""
    rows = [summary_row(outcome) for outcome in outcomes]
    if console.is_terminal:
        table = Table(title="tilerec", title_justify="left")
        columns = ("image", "detections", "per label", "tiles", "batches", "tasks", "wall s")
        for column in columns:
            table.add_column(column, justify="left" if column in ("image", "per label") else "right")
        for row in rows:
            table.add_row(*(escape(row[column]) for column in columns))
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


def document(outcomes: Sequence[Outcome], fmt: str, wgs84: bool = False) -> Any:
    """The --json output: one recognition (or a list, for several images), or one COCO document or GeoJSON
    FeatureCollection for them all."""
    done = [outcome for outcome in outcomes if outcome.result is not None]
    if fmt == "coco":
        return coco_document([Recognition.from_json(o.result) for o in done], [o.target.given for o in done])
    if fmt == "geojson":
        recognitions = [Recognition.from_json(o.result) for o in done]
        try:
            return geojson_document(recognitions, [o.target.given for o in done], wgs84)
        except ValueError as error:
            raise CliError(f"cannot write GeoJSON: {error}", EXIT_FAILED) from None
    results = [outcome.result for outcome in done]
    return results[0] if len(outcomes) == 1 else results


def write_json(destination: str, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(destination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as error:
        raise CliError(f"cannot write {destination!r}: {error.strerror or error}", EXIT_FAILED) from None


def write_annotated(target: Target, result: dict[str, Any], path: Path) -> None:
    """The merged detections drawn on the original image (keypoints named, so COCO's skeleton is drawn)."""
    pixels = images.decode(target.path.read_bytes())
    canvas = draw_detections(pixels, Detections.from_records(result["detections"], result.get("keypoint_names", ())))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise CliError(f"cannot write the annotated image {str(path)!r}", EXIT_FAILED)


def write_outputs(
    outcomes: Sequence[Outcome], json_to: str | None, fmt: str, annotated: Sequence[Path], wgs84: bool = False
) -> None:
    if json_to is not None and any(outcome.result is not None for outcome in outcomes):
        write_json(json_to, document(outcomes, fmt, wgs84))
    for outcome, path in zip(outcomes, annotated, strict=False):
        if outcome.result is not None:
            write_annotated(outcome.target, outcome.result, path)


def report_failures(outcomes: Sequence[Outcome]) -> int:
    """One error line per failed job; the exit code of the run."""
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    for outcome in failed:
        print_error(f"{outcome.target.given}: {outcome.error}")
    return EXIT_FAILED if failed else EXIT_OK
