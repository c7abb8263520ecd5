"""COCO datasets: reading a dataset JSON (its images and categories) with errors that say what is wrong, and
writing sets of small generated scenes with their COCO ground truth, for tests, benchmarks and evaluation.

A dataset is COCO's usual document: `images` (id, file_name, width, height), `categories` (id, name) and, for a
ground truth, `annotations` (image_id, category_id, bbox [x, y, w, h], area, iscrowd).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from pipeline.scenes.codes import Scene, code_scene


class DatasetError(ValueError):
    """A dataset JSON that cannot be used: the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class DatasetImage:
    """One of a dataset's images: its COCO id and its file name (relative to the dataset's image folder)."""

    id: int
    file_name: str


@dataclass(frozen=True)
class Dataset:
    """A parsed dataset JSON: the document itself, its images, and its category ids by name."""

    document: dict[str, Any]
    images: tuple[DatasetImage, ...]
    categories: dict[str, int]


def read_dataset(path: str | Path) -> Dataset:
    """Read and check a COCO dataset JSON.

    Args:
        path: the JSON file.

    Returns:
        The dataset, its images in file order.

    Raises:
        DatasetError: the file is missing or unreadable, is not JSON, or lacks COCO's `images` (each with an id
            and a file_name) or has categories without an id and a name, or two images with one id.
    """
    where = str(path)
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset {where!r}: no such file") from None
    except OSError as error:
        raise DatasetError(f"dataset {where!r}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"dataset {where!r} is not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DatasetError(f"dataset {where!r} is not a COCO dataset: it has no `images` list")
    images = []
    for number, image in enumerate(document["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not image.get("file_name"):
            raise DatasetError(f"dataset {where!r}: images[{number}] needs an integer `id` and a `file_name`")
        images.append(DatasetImage(image["id"], str(image["file_name"])))
    ids = [image.id for image in images]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"dataset {where!r}: two images share an id")
    categories = {}
    for number, category in enumerate(document.get("categories") or []):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
            raise DatasetError(f"dataset {where!r}: categories[{number}] needs an integer `id` and a `name`")
        categories[str(category["name"])] = category["id"]
    return Dataset(document, tuple(images), categories)


def coco_truth(scenes: Sequence[Scene], file_names: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """The ground truth of generated scenes as a COCO dataset.

    Args:
        scenes: the scenes, whose `truths` hold every object's label and box.
        file_names: each scene's image file, as the dataset names it.
        labels: the category names, numbered from 1 in this order (every truth's label must be among them).

    Returns:
        A COCO dataset: images with ids 1, 2, … in order, categories, and one annotation per known object (its
        box as drawn, area w×h, not a crowd).
    """
    ids = {label: number for number, label in enumerate(labels, start=1)}
    images, annotations = [], []
    for image_id, (scene, name) in enumerate(zip(scenes, file_names, strict=True), start=1):
        height, width = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for truth in scene.truths:
            x, y, w, h = truth.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ids[truth.label],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": number, "name": label, "supercategory": "code"} for label, number in ids.items()]
    return {"images": images, "categories": categories, "annotations": annotations}


def write_scene_set(
    folder: str | Path,
    count: int,
    width: int = 320,
    height: int = 240,
    kinds: tuple[str, ...] = ("aruco",),
    per_image: int = 2,
    seed: int = 0,
) -> Path:
    """Write `count` small scenes with known codes (pipeline.scenes.codes.code_scene) as PNGs and their COCO truth.

    Args:
        folder: where `truth.json` goes, the images in its `images/` folder (`scene-00000.png`, …); made if missing.
        count: how many images.
        width, height: each image's size.
        kinds: the code kinds (qrcode, aruco, barcode), taken in turn within an image.
        per_image: objects per image.
        seed: image i is drawn with seed `seed + i`, so a set is reproducible.

    Returns:
        The path of `truth.json`, whose file names (`images/scene-00000.png`, …) are relative to `folder`.
    """
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes, names = [], []
    for index in range(count):
        scene = code_scene(width, height, kinds=kinds, count=per_image, seed=seed + index)
        name = f"images/scene-{index:05d}.png"
        if not cv2.imwrite(str(out / name), scene.image):
            raise OSError(f"OpenCV could not write {out / name}")
        scenes.append(scene)
        names.append(name)
    truth = out / "truth.json"
    truth.write_text(json.dumps(coco_truth(scenes, names, sorted(set(kinds)))))
    return truth
