"""`tilerec evaluate`: COCO metrics of a run's results against a ground-truth dataset (pipeline.outputs.evaluate),
printed as a table, written as JSON, drawn as precision–recall curves, and two runs side by side with --compare."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.outputs.datasets import Dataset, DatasetError
from pipeline.outputs.evaluate import STATS, CocoResults, Metrics, evaluate, load_detections, load_truth, plot_curves
from tasks.cli.errors import EXIT_OK, CliError, markup_safe, say
from tasks.cli.output import write_json


def iou_types(truth: Dataset, detections: CocoResults) -> list[str]:
    """Boxes always; masks too when the results have masks and every truth annotation has a segmentation."""
    annotations = truth.document["annotations"]
    masked = bool(annotations) and all("segmentation" in annotation for annotation in annotations)
    return ["bbox", "segm"] if detections.has_masks and masked else ["bbox"]


def warn_unmatched(console: Console, where: str, truth: Dataset, detections: CocoResults) -> None:
    """What was not scored, and why; an error when no detection's label is one of the truth's categories."""
    unknown = ", ".join(f"{label} {n}" for label, n in sorted(detections.unknown_labels.items()))
    if detections.unknown_labels and not detections.records:
        known = ", ".join(sorted(truth.categories))
        raise CliError(f"{where}: no detection's label is a category of the truth ({unknown}; the truth has {known})")
    if unknown:
        say(console, f"tilerec: warning: {where}: detections of labels the truth lacks, not scored: {unknown}")
    if detections.unknown_images:
        count = len(detections.unknown_images)
        named = ", ".join(detections.unknown_images[:3]) + (" …" if count > 3 else "")
        say(console, f"tilerec: warning: {where}: {count} image(s) not in the truth, not scored: {named}")
    if detections.failed_images:
        say(console, f"tilerec: warning: {where}: {len(detections.failed_images)} image(s) failed in the run")


def evaluate_run(path: str, truth: Dataset, console: Console) -> dict[str, Metrics]:
    """One results file's metrics for each IoU type that applies."""
    try:
        detections = load_detections(path, truth)
    except DatasetError as error:
        raise CliError(str(error)) from None
    warn_unmatched(console, path, truth, detections)
    evaluated = {iou: evaluate(truth, detections, iou) for iou in iou_types(truth, detections)}
    missing = evaluated["bbox"].missing_labels
    if missing:
        say(console, f"tilerec: warning: {path}: no detection of {', '.join(missing)} (scored at AP 0)")
    return evaluated


def cell(value: float) -> str:
    return "–" if value < 0 else f"{value:.3f}"


def stats_table(runs: Sequence[tuple[str, dict[str, Metrics]]], iou: str) -> Table:
    """The 12 COCO stats, a column per run, and the difference of the second from the first."""
    table = Table(title=f"COCO {iou} metrics", title_justify="left")
    table.add_column("metric")
    for name, _ in runs:
        table.add_column(markup_safe(Path(name).name if len(runs) > 1 else name), justify="right")
    if len(runs) == 2:
        table.add_column("Δ", justify="right")
    for stat in STATS:
        values = [metrics[iou].stats[stat] for _, metrics in runs]
        delta = [f"{values[1] - values[0]:+.3f}" if min(values) >= 0 else "–"] if len(runs) == 2 else []
        table.add_row(stat, *(cell(value) for value in values), *delta)
    return table


def class_table(runs: Sequence[tuple[str, dict[str, Metrics]]], iou: str) -> Table:
    """AP, AP50 and AR per class for each run, with each class's objects and detections."""
    table = Table(title=f"per class ({iou})", title_justify="left")
    table.add_column("class")
    table.add_column("objects", justify="right")
    for number, _ in enumerate(runs, start=1):
        suffix = f" #{number}" if len(runs) > 1 else ""
        for column in ("detections", "AP", "AP50", "AR"):
            table.add_column(column + suffix, justify="right")
    first = runs[0][1][iou]
    for name, scores in first.per_class.items():
        row = [markup_safe(name), str(scores.truths)]
        for _, metrics in runs:
            theirs = metrics[iou].per_class[name]
            row += [str(theirs.detections), cell(theirs.ap), cell(theirs.ap50), cell(theirs.ar)]
        table.add_row(*row)
    return table


def report(runs: Sequence[tuple[str, dict[str, Metrics]]], truth_path: str) -> dict[str, Any]:
    return {
        "truth": truth_path,
        "runs": [{"results": name, **{iou: m.to_json() for iou, m in metrics.items()}} for name, metrics in runs],
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    messages = Console(stderr=True)
    try:
        truth = load_truth(args.truth)
    except DatasetError as error:
        raise CliError(str(error)) from None
    paths = [args.results] + ([args.compare] if args.compare else [])
    runs = [(path, evaluate_run(path, truth, messages)) for path in paths]
    shared = [iou for iou in runs[0][1] if all(iou in metrics for _, metrics in runs)]
    if args.json != "-":
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)  # rich's 80 columns off a terminal would squeeze the comparison
        for iou in shared:
            console.print(stats_table(runs, iou))
            console.print(class_table(runs, iou))
    if args.json:
        write_json(args.json, report(runs, args.truth))
    if args.plots:
        try:
            for number, (_, metrics) in enumerate(runs):
                for iou, evaluated in metrics.items():
                    plot_curves(evaluated, Path(args.plots) / ("compare" if number else "") / iou)
        except ImportError as error:
            raise CliError(str(error)) from None
        say(messages, f"tilerec: precision–recall curves in {args.plots}")
    return EXIT_OK


def add_evaluate(commands: Any) -> None:
    """The `evaluate` subcommand's parser."""
    parser = commands.add_parser(
        "evaluate",
        help="COCO metrics (AP, AP50, AP75, AP by size, AR, per class) of results against ground truth",
        description="Score a run's results (OUT/results.jsonl or OUT/coco.json, or a COCO results list) against a "
        "COCO ground-truth dataset with faster-coco-eval; categories are matched by name, images by file name.",
    )
    parser.add_argument("results", metavar="RESULTS", help="results.jsonl or coco.json of a run, or COCO results")
    parser.add_argument("--truth", required=True, metavar="DATASET.json", help="the COCO ground truth")
    parser.add_argument("--json", metavar="OUT", help="write the metrics as JSON to OUT (- for stdout)")
    parser.add_argument("--plots", metavar="DIR", help="precision–recall curves per class, as PNGs (matplotlib)")
    parser.add_argument("--compare", metavar="OTHER", help="another run's results, scored side by side")
    parser.set_defaults(handler=cmd_evaluate)
