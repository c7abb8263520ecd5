"""COCO evaluation of recognitions against a ground-truth dataset, with faster-coco-eval (the `eval` extra): AP,
AP50, AP75, AP by object size, AR, and AP per class, for boxes and (where results and truth have them) masks.

Results are read from any of what tilerec writes: a run's `results.jsonl` (one recognition a line), its `coco.json`
(a COCO document with `images`, `categories` and scored `annotations`), or COCO's plain results list (category
ids already the truth's). Categories are matched by name and images by file name, so ids need not agree; labels the
truth does not know are reported, not scored as zero in silence.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import Recognition
from pipeline.outputs.datasets import Dataset, DatasetError, read_dataset
from pipeline.outputs.export import coco_results

# faster-coco-eval's stats, in its order (COCOeval.summarize for bbox and segm)
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


@dataclass(frozen=True)
class CocoResults:
    """Results ready for COCO: records with the truth's image and category ids, and what could not be matched."""

    records: list[dict[str, Any]]
    unknown_labels: dict[str, int] = field(default_factory=dict)  # label the truth lacks: detections dropped
    unknown_images: tuple[str, ...] = ()  # result images the truth lacks: their detections dropped
    failed_images: tuple[str, ...] = ()  # a results.jsonl's failed entries

    @property
    def has_masks(self) -> bool:
        return any("segmentation" in record for record in self.records)


@dataclass(frozen=True)
class ClassMetrics:
    """One category's scores: AP over IoU 0.5:0.95, AP at 0.5 and 0.75, AR at 100 detections, and counts."""

    ap: float
    ap50: float
    ap75: float
    ar: float
    truths: int
    detections: int


@dataclass(frozen=True)
class Metrics:
    """A COCO evaluation: the 12 summary stats (-1 where COCO has nothing to score), per class scores and the
    precision–recall curve of each class at IoU 0.5 (precision at the 101 recall points 0, 0.01, …, 1)."""

    iou_type: str
    stats: dict[str, float]
    per_class: dict[str, ClassMetrics]
    curves: dict[str, list[float]]
    images: int
    unknown_labels: dict[str, int]
    missing_labels: tuple[str, ...]  # truth categories no result has: scored, at AP 0, but worth saying

    def to_json(self) -> dict[str, Any]:
        return {
            "iou_type": self.iou_type,
            "images": self.images,
            "stats": self.stats,
            "per_class": {name: vars(metrics) for name, metrics in self.per_class.items()},
            "unknown_labels": self.unknown_labels,
            "missing_labels": list(self.missing_labels),
        }


def load_truth(path: str | Path) -> Dataset:
    """The ground truth: a COCO dataset with annotations (see pipeline.outputs.datasets.read_dataset for its errors)."""
    dataset = read_dataset(path)
    if not isinstance(dataset.document.get("annotations"), list):
        raise DatasetError(f"ground truth {str(path)!r} has no `annotations` list")
    if not dataset.categories:
        raise DatasetError(f"ground truth {str(path)!r} has no categories")
    return dataset


def image_ids_by_name(truth: Dataset) -> dict[str, int]:
    """The truth's image ids by file name and, where unambiguous, by base name too (a run names files by path)."""
    ids = {image.file_name: image.id for image in truth.images}
    bases = Counter(Path(image.file_name).name for image in truth.images)
    ids.update({Path(i.file_name).name: i.id for i in truth.images if bases[Path(i.file_name).name] == 1})
    return ids


def match_image(names: Sequence[str], ids: Mapping[str, int]) -> int | None:
    """The truth's id of an image known by any of `names` (as given, its path, …), by name then by base name."""
    for name in names:
        if name in ids:
            return ids[name]
    for name in names:
        if Path(name).name in ids:
            return ids[Path(name).name]
    return None


def _from_recognitions(
    entries: Sequence[tuple[list[str], int | None, dict[str, Any]]], truth: Dataset
) -> tuple[list[dict[str, Any]], Counter[str], list[str]]:
    """COCO records of recognitions given with their names and, when known, their truth image id."""
    ids = image_ids_by_name(truth)
    records: list[dict[str, Any]] = []
    unknown_labels: Counter[str] = Counter()
    unknown_images: list[str] = []
    for names, image_id, document in entries:
        image_id = image_id if image_id is not None else match_image(names, ids)
        if image_id is None:
            unknown_images.append(names[0])
            continue
        recognition = Recognition.from_json(document)
        labels = [str(label) for label in recognition.detections.labels]
        unknown_labels.update(label for label in labels if label not in truth.categories)
        keep = np.array([label in truth.categories for label in labels], dtype=bool)
        kept = replace(recognition, detections=recognition.detections[keep])
        records += coco_results(kept, image_id, truth.categories)
    return records, unknown_labels, unknown_images


def read_jsonl(path: Path, truth: Dataset) -> CocoResults:
    """A run's results.jsonl: each whole line one image (a half-written last line, from a hard kill, is skipped)."""
    entries, failed = [], []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        names = [str(entry.get("image")), str(entry.get("path"))]
        if entry.get("result") is None:
            failed.append(names[0])
            continue
        given_id = entry.get("image_id")
        entries.append((names, given_id if given_id in {image.id for image in truth.images} else None, entry["result"]))
    records, unknown_labels, unknown_images = _from_recognitions(entries, truth)
    return CocoResults(records, dict(unknown_labels), tuple(unknown_images), tuple(failed))


def read_document(document: dict[str, Any], truth: Dataset, where: str) -> CocoResults:
    """A COCO document of results (tilerec's coco.json): categories matched by name, images by file name."""
    names = {category["id"]: str(category["name"]) for category in document.get("categories") or []}
    ids = image_ids_by_name(truth)
    images = {image["id"]: match_image([str(image.get("file_name"))], ids) for image in document.get("images") or []}
    records, unknown_labels = [], Counter()
    unknown_images = {str(image.get("file_name")) for image in document["images"] if images[image["id"]] is None}
    for annotation in document["annotations"]:
        name = names.get(annotation.get("category_id"))
        if name is None:
            number = annotation.get("category_id")
            raise DatasetError(f"results {where!r}: an annotation's category_id {number} is not in its categories")
        image_id = images.get(annotation.get("image_id"))
        if image_id is None:
            continue
        if name not in truth.categories:
            unknown_labels[name] += 1
            continue
        records.append({**annotation, "image_id": image_id, "category_id": truth.categories[name]})
    return CocoResults(records, dict(unknown_labels), tuple(sorted(unknown_images)))


def read_results_list(records: list[Any], truth: Dataset, where: str) -> CocoResults:
    """COCO's results list: image and category ids are taken to be the truth's; unknown ones are reported."""
    known_images = {image.id for image in truth.images}
    by_id = {number: name for name, number in truth.categories.items()}
    kept, unknown_labels, unknown_images = [], Counter(), set()
    for record in records:
        if not isinstance(record, dict) or "image_id" not in record or "category_id" not in record:
            raise DatasetError(f"results {where!r}: every record needs image_id, category_id, bbox and score")
        if record["category_id"] not in by_id:
            unknown_labels[f"category_id {record['category_id']}"] += 1
        elif record["image_id"] not in known_images:
            unknown_images.add(str(record["image_id"]))
        else:
            kept.append(record)
    return CocoResults(kept, dict(unknown_labels), tuple(sorted(unknown_images)))


def load_detections(path: str | Path, truth: Dataset) -> CocoResults:
    """Results from a run's results.jsonl, a COCO results document (coco.json) or a COCO results list.

    Raises:
        DatasetError: the file is missing, is not JSON, or is none of those shapes.
    """
    where, source = str(path), Path(path)
    try:
        if source.suffix == ".jsonl":
            return read_jsonl(source, truth)
        loaded = json.loads(source.read_text())
    except FileNotFoundError:
        raise DatasetError(f"results {where!r}: no such file") from None
    except OSError as error:
        raise DatasetError(f"results {where!r}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"results {where!r} is not JSON (a run's results.jsonl must end in .jsonl): {error}"
        ) from None
    if isinstance(loaded, list):
        return read_results_list(loaded, truth, where)
    if isinstance(loaded, dict) and isinstance(loaded.get("annotations"), list):
        return read_document(loaded, truth, where)
    raise DatasetError(f"results {where!r}: neither a COCO results list nor a document with `annotations`")


def _coco() -> Any:
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ImportError("evaluation needs faster-coco-eval: pip install 'tilerec[eval]'") from None
    return COCO, COCOeval_faster


def evaluate(truth: Dataset, detections: CocoResults, iou_type: str = "bbox") -> Metrics:
    """COCO metrics of the detections against the truth.

    Args:
        truth: the ground-truth dataset.
        detections: results with the truth's ids (load_detections).
        iou_type: "bbox", or "segm" (masks against the truth's masks; detections without a mask are left out).

    Returns:
        The metrics; every stat 0 when there is no detection at all (COCO itself cannot load an empty list).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    COCO, COCOeval_faster = _coco()
    document = truth.document
    names = {number: name for name, number in truth.categories.items()}
    truths = Counter(names.get(a["category_id"], "?") for a in document["annotations"] if not a.get("iscrowd"))
    records = [r for r in detections.records if iou_type == "bbox" or "segmentation" in r]
    found = Counter(names[record["category_id"]] for record in records)
    missing = tuple(sorted(name for name in truth.categories if truths[name] and not found[name]))
    base = {"iou_type": iou_type, "images": len(truth.images), "unknown_labels": detections.unknown_labels}
    if not records:
        zero = ClassMetrics(0.0, 0.0, 0.0, 0.0, 0, 0)
        per_class = {name: ClassMetrics(**{**vars(zero), "truths": truths[name]}) for name in truth.categories}
        curves = {name: [0.0] * 101 for name in truth.categories}
        stats = dict.fromkeys(STATS, 0.0)
        return Metrics(stats=stats, per_class=per_class, curves=curves, missing_labels=missing, **base)
    ground = COCO(json.loads(json.dumps(document)))  # through JSON: COCO indexes the document it is given
    found_coco = ground.loadRes(json.loads(json.dumps(records)))
    evaluation = COCOeval_faster(ground, found_coco, iou_type, print_function=lambda *_: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    stats = {name: float(value) for name, value in zip(STATS, evaluation.stats, strict=False)}
    per_class, curves = _per_class(evaluation, names, truths, found)
    return Metrics(stats=stats, per_class=per_class, curves=curves, missing_labels=missing, **base)


def _mean_valid(values: np.ndarray) -> float:
    """COCO's mean: over entries above -1 (−1 marks 'nothing to score'); -1 when there are none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _per_class(
    evaluation: Any, names: Mapping[int, str], truths: Counter[str], found: Counter[str]
) -> tuple[dict[str, ClassMetrics], dict[str, list[float]]]:
    """Per class AP and AR from COCOeval's accumulated arrays, as its summarize averages them for all classes:
    precision[T, R, K, A, M] and recall[T, K, A, M], area range 'all' (A = 0), the largest maxDets (M = -1)."""
    precision, recall = evaluation.eval["precision"], evaluation.eval["recall"]
    thresholds = list(np.round(evaluation.params.iouThrs, 2))
    at50, at75 = thresholds.index(0.5), thresholds.index(0.75)
    per_class, curves = {}, {}
    for k, category_id in enumerate(evaluation.params.catIds):
        name = names[category_id]
        p = precision[:, :, k, 0, -1]
        per_class[name] = ClassMetrics(
            ap=_mean_valid(p),
            ap50=_mean_valid(p[at50]),
            ap75=_mean_valid(p[at75]),
            ar=_mean_valid(recall[:, k, 0, -1]),
            truths=truths[name],
            detections=found[name],
        )
        curves[name] = np.clip(p[at50], 0, None).tolist()
    return per_class, curves


def plot_curves(metrics: Metrics, folder: str | Path) -> list[Path]:
    """Precision–recall curves at IoU 0.5, one PNG per class (`pr-<class>.png`), with matplotlib (the `plots`
    extra); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plots needs matplotlib: pip install 'tilerec[plots]'") from None
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    recall = np.linspace(0, 1, 101)
    written = []
    for name, precision in metrics.curves.items():
        figure, axes = plt.subplots(figsize=(5, 4))
        scores = metrics.per_class[name]
        axes.plot(recall, precision, label=f"IoU 0.5 (AP50 {scores.ap50:.3f})")
        title = f"{name}: {scores.truths} objects, {scores.detections} detections ({metrics.iou_type})"
        axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left")
        path = out / f"pr-{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
