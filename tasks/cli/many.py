"""`tilerec run` over many images: a folder, a glob, a list file or a COCO dataset's images, with a bounded number
of jobs in flight, each finished image streamed to `OUT/results.jsonl`, a COCO document at the end, and `--resume`.

results.jsonl has one JSON object a line, written whole and flushed as each image finishes, so an interrupted run
leaves a file whose every line is an image's final outcome; `--resume` keeps the lines that hold a result, drops
failed ones (they are tried again) and a half-written last line (from a hard kill), and runs the images left.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console

from pipeline.model import Recognition
from pipeline.outputs.datasets import DatasetError, read_dataset
from pipeline.outputs.export import coco_document
from tasks.cli.errors import CliError, describe, say
from tasks.cli.inputs import Target, annotate_paths, check_image, reader_suffixes
from tasks.cli.jobs import Overview, execute
from tasks.cli.output import report_failures, summarize, write_json, write_outputs
from tasks.cli.people import FACES, RunFaces, group_run, label_outcome
from tasks.cli.settings import RunSettings

if TYPE_CHECKING:  # tasks.client loads the Celery app: imported when a run starts
    from tasks.client import Completed

RESULTS, COCO = "results.jsonl", "coco.json"
PATTERN = set("*?[")  # glob's special characters
LISTED = 5  # missing files named in an error, before "and N more"
TABLE_MAX = 20  # images summarized one row each; more get one line


@dataclass
class Inputs:
    """The images of a run, in order: those to run, those rejected before any job (one failed entry each, with
    its reason), and each image's COCO id (a dataset's, else its place in the run, from 1)."""

    targets: list[Target] = field(default_factory=list)
    rejected: list[Completed] = field(default_factory=list)
    image_ids: dict[Path, int] = field(default_factory=dict)
    file_names: dict[Path, str] = field(default_factory=dict)  # the dataset's name for an image, for coco.json
    categories: dict[str, int] | None = None  # the dataset's category ids by name
    left_out: list[str] = field(default_factory=list)  # files of a folder or pattern that no reader takes


def is_many(args: argparse.Namespace) -> bool:
    """Whether a run is over many images (the overall bar, results.jsonl) rather than a few named files."""
    named = all(not Path(given).expanduser().is_dir() and not is_pattern(given) for given in args.images)
    return not named or bool(args.list or args.coco_images or args.out)


def is_pattern(given: str) -> bool:
    return bool(PATTERN & set(given)) and not Path(given).expanduser().exists()


def folder_files(given: str) -> tuple[list[str], list[str]]:
    """A folder's files (not hidden, not in subfolders), or a pattern's matching files (`**` recursive), sorted and
    split by extension: those an available reader takes, and the others (a truth.json, a README), left out."""
    if is_pattern(given):
        found = sorted(name for name in glob.glob(os.path.expanduser(given), recursive=True) if Path(name).is_file())
        where = f"{given!r} matches"
    else:
        folder = Path(given).expanduser()
        found = sorted(str(path) for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
        where = f"folder {given!r} has"
    suffixes = reader_suffixes()
    images = [name for name in found if Path(name).suffix.lower() in suffixes]
    others = [name for name in found if Path(name).suffix.lower() not in suffixes]
    if not images:
        left = f" ({len(others)} other file(s): {', '.join(Path(name).name for name in others[:LISTED])})"
        raise CliError(f"{where} no image files{left if others else ''}")
    return images, others


def missing_files(paths: Sequence[Path], what: str) -> None:
    """One error naming the missing files, a few of them, rather than as many failed jobs."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
        raise CliError(f"{what} names {len(missing)} missing file(s): {', '.join(missing[:LISTED])}{more}")


def list_files(list_file: str) -> list[str]:
    """A list file's image paths, one a line (blank lines and `#` comments skipped), relative to its folder."""
    try:
        lines = Path(list_file).read_text().splitlines()
    except OSError as error:
        raise CliError(f"cannot read --list {list_file!r}: {error.strerror or error}") from None
    base = Path(list_file).parent
    paths = [str(base / line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    missing_files([Path(path) for path in paths], f"--list {list_file!r}")
    return paths


def gather(args: argparse.Namespace, max_pixels: int) -> Inputs:
    """Every image of the run, checked (header only) before any cluster starts.

    A named or listed file that is not a usable image fails the run at once or becomes one failed entry with its
    reason; of a folder or a pattern, only the files whose extension a reader takes are run (a bad one becomes a
    failed entry), the others are left out and counted. A dataset or list naming missing files, or a
    dataset that does not parse, is an error saying which.
    """
    from tasks.client import Completed

    inputs = Inputs()
    found: list[tuple[str, bool]] = []  # (path as given, whether a bad file is an entry rather than an error)
    for given in args.images:
        if not Path(given).expanduser().is_dir() and not is_pattern(given):
            found.append((given, False))
            continue
        images, others = folder_files(given)
        found += [(name, True) for name in images]
        inputs.left_out += others
    if args.list:
        found += [(name, True) for name in list_files(args.list)]
    if args.coco_images:
        try:
            dataset = read_dataset(args.coco_images)
        except DatasetError as error:
            raise CliError(str(error)) from None
        root = Path(args.images_root) if args.images_root else Path(args.coco_images).parent
        paths = [root / image.file_name for image in dataset.images]
        missing_files(paths, f"dataset {args.coco_images!r} (images under {str(root)!r})")
        inputs.categories = dataset.categories
        for image, path in zip(dataset.images, paths, strict=True):
            inputs.image_ids[path.resolve()] = image.id
            inputs.file_names[path.resolve()] = image.file_name
            found.append((str(path), True))
    seen: set[Path] = set()
    for given, as_entry in found:
        path = Path(given).expanduser().resolve()
        if path in seen:
            continue
        seen.add(path)
        inputs.image_ids.setdefault(path, len(seen))
        try:
            inputs.targets.append(check_image(given, max_pixels))
        except CliError as error:
            if not as_entry:
                raise
            inputs.rejected.append(Completed(Target(given, path), error=error))
    return inputs


def entry(outcome: Completed, image_id: int) -> dict[str, Any]:
    """One results.jsonl line: the image (as given and its path), its COCO id, and its result or its error."""
    return {
        "image": outcome.image.given,
        "path": str(outcome.image.path),
        "image_id": image_id,
        "ok": outcome.ok,
        "error": None if outcome.error is None else describe(outcome.error),
        "job_id": outcome.job_id,
        "seconds": round(outcome.seconds, 3),
        "result": None if outcome.result is None else outcome.result.to_json(),
    }


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a results.jsonl (a half-written last line from a hard kill does not parse: skipped)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def rewrite_entries(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    """results.jsonl rewritten whole and renamed into place, so an interrupt leaves the previous file."""
    partial = path.with_name(RESULTS + ".partial")
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(partial, path)


class ResultsFile:
    """OUT/results.jsonl, appended a whole flushed line per finished image; on resume, cut to the images with a
    result, rewritten atomically so an interrupt during the rewrite loses nothing."""

    def __init__(self, folder: Path, resume: bool) -> None:
        self.path = folder / RESULTS
        try:
            folder.mkdir(parents=True, exist_ok=True)
            existing = self.path.exists() and self.path.stat().st_size > 0
            if existing and not resume:
                raise CliError(f"{self.path} exists: add --resume to continue that run, or choose another --out")
            kept = [line for line in read_entries(self.path) if line.get("ok") and line.get("result")]
            rewrite_entries(self.path, kept)
            (folder / COCO).unlink(missing_ok=True)  # a coco.json is there only when the run is complete
            self.handle: TextIO = open(self.path, "a")  # noqa: SIM115  (closed in close(), after the run)
        except OSError as error:
            raise CliError(f"cannot write {str(self.path)!r}: {error.strerror or error}") from None
        self.done = {line["path"] for line in kept}

    def write(self, outcome: Completed, image_id: int) -> None:
        self.handle.write(json.dumps(entry(outcome, image_id)) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def coco_of(entries: Sequence[dict[str, Any]], inputs: Inputs) -> tuple[dict[str, Any], list[str]]:
    """The run's COCO document (image ids, file names and category ids from the dataset when there is one), and
    the labels found that the dataset's categories lack (numbered after its ids, and reported)."""
    done = [line for line in entries if line.get("ok") and line.get("result")]
    recognitions = [Recognition.from_json(line["result"]) for line in done]
    labels = sorted({str(label) for recognition in recognitions for label in recognition.detections.labels})
    ids = dict(inputs.categories or {})
    unknown = [label for label in labels if label not in ids] if inputs.categories is not None else []
    for label in labels:
        ids.setdefault(label, max(ids.values(), default=0) + 1)
    names = [inputs.file_names.get(Path(line["path"]), line["image"]) for line in done]
    document = coco_document(recognitions, names, image_ids=[line["image_id"] for line in done], ids=ids)
    return document, unknown


def summary_line(outcomes: Sequence[Completed], skipped: int, seconds: float) -> str:
    """The run in one line: images ok and failed, detections per label, wall time and images per second."""
    ok = [outcome.result for outcome in outcomes if outcome.result is not None]
    labels = Counter(label for result in ok for label in result.detections.labels)
    per_label = ", ".join(f"{label} {n}" for label, n in sorted(labels.items())) or "none"
    resumed = f", {skipped} done before" if skipped else ""
    rate = len(outcomes) / seconds if seconds > 0 else 0.0
    return (
        f"tilerec: {len(outcomes)} images in {seconds:.1f} s ({rate:.1f}/s): {len(ok)} ok, "
        f"{len(outcomes) - len(ok)} failed{resumed}; {sum(labels.values())} detections ({per_label})"
    )


def run_many(
    args: argparse.Namespace, options: dict[str, Any], settings: RunSettings, console: Console, max_pixels: int
) -> int:
    """`tilerec run` over many images; the exit code says whether any failed (1) or all went through (0)."""
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR, the folder of the run to continue")
    if "batch_size" not in options:  # the images in flight keep every process busy: no need to split a job
        options = {**options, "min_batches": 1}
    inputs = gather(args, max_pixels)
    out = Path(args.out) if args.out else None
    results = ResultsFile(out, args.resume) if out else None
    if inputs.left_out and not settings.quiet:
        names = ", ".join(Path(name).name for name in inputs.left_out[:LISTED])
        more = f", and {len(inputs.left_out) - LISTED} more" if len(inputs.left_out) > LISTED else ""
        say(console, f"tilerec: left out {len(inputs.left_out)} file(s) not images by their extension: {names}{more}")
    # a run that names faces keeps them, to group the unknown ones into people: the jobs return their embeddings,
    # which go to OUT/faces.npz, never to results.jsonl (tasks/cli/people.py)
    taken = RunFaces() if out and (options.get("params") or {}).get("identify") else None
    if taken is not None:
        options = {**options, "params": {**options["params"], "embeddings": True}}
    began = time.monotonic()
    try:
        done = results.done if results else set()
        todo = [target for target in inputs.targets if str(target.path) not in done]
        annotated = annotate_paths(args.annotate, todo)
        if results:
            for outcome in inputs.rejected:
                results.write(outcome, inputs.image_ids[outcome.image.path])

        def sink(outcome: Completed) -> Completed:
            if taken is not None:
                outcome = taken.take(outcome)
            if results:
                results.write(outcome, inputs.image_ids[outcome.image.path])
            return outcome

        live = console.is_terminal and not settings.quiet
        total = len(inputs.targets) + len(inputs.rejected)
        outcomes: list[Completed] = []
        if todo:
            overview = Overview(console, total, len(inputs.targets) - len(todo), live)
            for outcome in inputs.rejected:
                overview.finish(outcome.image, None, ok=False)
            outcomes = execute(todo, args.recognizer, options, settings, console, sink=sink, overview=overview)
    except KeyboardInterrupt:
        if results and not settings.quiet:
            say(console, f"tilerec: stopped; {results.path} has every finished image: add --resume to run the rest")
        raise
    finally:
        if results:
            results.close()
    grouped = None
    if out and taken is not None:
        grouped = group_run(out, taken, read_entries(out / RESULTS))
        rewrite_entries(out / RESULTS, grouped.lines)
        named = grouped.by_image
        outcomes = [label_outcome(o, named.get(str(o.image.path or o.image.given), {})) for o in outcomes]
    write_outputs(outcomes, args.json, args.format, annotated)
    outcomes = inputs.rejected + outcomes
    if out:
        document, unknown = coco_of(read_entries(out / RESULTS), inputs)
        write_json(str(out / COCO), document)
        if unknown:
            say(console, f"tilerec: warning: labels not among the dataset's categories: {', '.join(unknown)}")
    if not settings.quiet:
        if len(outcomes) <= TABLE_MAX:
            summarize(outcomes, console)
        say(console, summary_line(outcomes, len(inputs.targets) - len(todo), time.monotonic() - began))
        if out:
            say(console, f"tilerec: results in {out / RESULTS} and {out / COCO}")
        if grouped:
            faces, people = grouped.faces, grouped.people
            say(console, f"tilerec: {faces} faces embedded; the unknown ones are {people} people (unknown-1 …); "
                         f"embeddings (biometric data) in {out / FACES}")  # fmt: skip
    return report_failures(outcomes)
