"""COCO export of recognitions, so results load in COCO tools (pycocotools' `loadRes`, FiftyOne, CVAT, …).

Two shapes: `coco_results` is COCO's detection *results* format (a list of image_id, category_id, bbox, score);
`coco_document` wraps the same records as a dataset-style document with its `images` and `categories` lists, which
is what most tools want when no ground-truth file exists. Boxes are [x, y, width, height] in pixels, like tilerec's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.model import Recognition

SUPERCATEGORY = "tilerec"


def category_ids(labels: Iterable[str]) -> dict[str, int]:
    """Labels to COCO category ids, numbered from 1 in sorted order (COCO keeps 0 for 'no object')."""
    return {label: number for number, label in enumerate(sorted(set(labels)), start=1)}


def categories(ids: Mapping[str, int]) -> list[dict[str, Any]]:
    """COCO's category list for a label-to-id mapping, by id."""
    ordered = sorted(ids.items(), key=lambda item: item[1])
    return [{"id": number, "name": label, "supercategory": SUPERCATEGORY} for label, number in ordered]


def _labels(recognitions: Iterable[Recognition]) -> list[str]:
    return [str(label) for recognition in recognitions for label in recognition.detections.labels]


def coco_results(
    recognition: Recognition, image_id: int, ids: Mapping[str, int], ndigits: int = 2
) -> list[dict[str, Any]]:
    """One image's detections in COCO's results format. A label missing from `ids` is an error, not a silent drop."""
    detections = recognition.detections
    records = []
    for i in range(len(detections)):
        label = str(detections.labels[i])
        if label not in ids:
            raise KeyError(f"label {label!r} has no COCO category id (known: {', '.join(sorted(ids)) or 'none'})")
        x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
        records.append(
            {
                "image_id": image_id,
                "category_id": ids[label],
                "bbox": [round(x1, ndigits), round(y1, ndigits), round(x2 - x1, ndigits), round(y2 - y1, ndigits)],
                "score": round(float(detections.scores[i]), 4),
            }
        )
    return records


def coco_document(
    recognitions: Sequence[Recognition],
    file_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A COCO document for several images: `images`, `categories` and `annotations` (each with its `score`).

    Image ids are 1, 2, … in the order given. `labels` fixes the category list (and so its ids) across runs;
    without it the categories are the labels found. Decoded payloads go in each annotation's `text`.
    """
    if file_names is not None and len(file_names) != len(recognitions):
        raise ValueError(f"{len(file_names)} file names for {len(recognitions)} recognitions")
    ids = category_ids(labels if labels is not None else _labels(recognitions))
    images, annotations = [], []
    for image_id, recognition in enumerate(recognitions, start=1):
        name = file_names[image_id - 1] if file_names is not None else recognition.source
        images.append({"id": image_id, "file_name": name, "width": recognition.width, "height": recognition.height})
        texts = recognition.detections.texts
        for k, record in enumerate(coco_results(recognition, image_id, ids)):
            width, height = record["bbox"][2:]
            extra = {"text": texts[k]} if texts[k] is not None else {}
            annotations.append(
                {"id": len(annotations) + 1, **record, "area": round(width * height, 2), "iscrowd": 0, **extra}
            )
    return {
        "info": {"description": "tilerec detection results"},
        "images": images,
        "categories": categories(ids),
        "annotations": annotations,
    }
