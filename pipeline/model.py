"""The one result model: `Detections` flows from recognizer to merge to JSON; `Recognition` is a whole job's result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA = "tilerec/recognition@1"


def _object_array(values: Iterable[Any], length: int) -> np.ndarray:
    values = list(values)
    if len(values) != length:
        raise ValueError(f"all detection columns must have the same length ({len(values)} != {length})")
    array = np.empty(length, dtype=object)
    for index, value in enumerate(values):  # element by element: equal-shaped arrays must not broadcast
        array[index] = value
    return array


class Detections:
    """Columnar detections (like supervision's `Detections`), so merging is vectorised.

    xyxy: (N, 4) float box corners; scores: (N,); labels: (N,) str; texts: decoded payload or None;
    points: (K, 2) landmark or corner arrays or None; cut: the box touches an inner tile border, so a
    neighbouring tile may have seen the object whole.
    """

    __slots__ = ("cut", "labels", "points", "scores", "texts", "xyxy")

    def __init__(
        self,
        xyxy: np.ndarray,
        scores: np.ndarray,
        labels: Sequence[str],
        texts: Sequence[str | None] | None = None,
        points: Sequence[np.ndarray | None] | None = None,
        cut: np.ndarray | None = None,
    ) -> None:
        n = len(scores)
        self.xyxy = np.asarray(xyxy, dtype=np.float64).reshape(n, 4)
        self.scores = np.asarray(scores, dtype=np.float64).reshape(n)
        self.labels = _object_array((str(label) for label in labels), n)
        self.texts = _object_array(texts if texts is not None else [None] * n, n)
        self.points = _object_array(
            (None if p is None else np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in points)
            if points is not None
            else [None] * n,
            n,
        )
        self.cut = np.zeros(n, dtype=bool) if cut is None else np.asarray(cut, dtype=bool).reshape(n)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), [])

    @classmethod
    def from_xywh(
        cls,
        boxes: np.ndarray | Sequence[Sequence[float]],
        scores: Sequence[float] | np.ndarray,
        labels: Sequence[str] | str,
        texts: Sequence[str | None] | None = None,
        points: Sequence[np.ndarray | None] | None = None,
    ) -> Detections:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xyxy = boxes.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        if isinstance(labels, str):
            labels = [labels] * len(boxes)
        return cls(xyxy, scores, labels, texts, points)

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.texts for p in parts]),
            list(np.concatenate([p.points for p in parts])),
            np.concatenate([p.cut for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: np.ndarray | slice | list[int]) -> Detections:
        return Detections(
            self.xyxy[index],
            self.scores[index],
            self.labels[index],
            self.texts[index],
            list(self.points[index]),
            self.cut[index],
        )

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections moved by (dx, dy): tile coordinates to image coordinates."""
        offset = np.array([dx, dy], dtype=np.float64)
        return Detections(
            self.xyxy + np.tile(offset, 2),
            self.scores,
            self.labels,
            self.texts,
            [None if p is None else p + offset for p in self.points],
            self.cut,
        )

    def clipped(self, width: int, height: int) -> Detections:
        """Boxes and points clamped to the image; boxes left with no area are dropped."""
        xyxy = self.xyxy.copy()
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        points = [None if p is None else p.clip([0, 0], [width, height]) for p in self.points]
        kept = Detections(xyxy, self.scores, self.labels, self.texts, points, self.cut)
        area_ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return kept if area_ok.all() else kept[np.flatnonzero(area_ok)]

    def to_columns(self) -> dict[str, list[Any]]:
        """Exact, compact JSON form for passing detections between stages (tile task to merge)."""
        return {
            "xyxy": self.xyxy.tolist(),
            "scores": self.scores.tolist(),
            "labels": list(self.labels),
            "texts": list(self.texts),
            "points": [None if p is None else p.tolist() for p in self.points],
            "cut": self.cut.tolist(),
        }

    @classmethod
    def from_columns(cls, columns: dict[str, list[Any]]) -> Detections:
        return cls(
            np.asarray(columns["xyxy"], dtype=np.float64).reshape(-1, 4),
            columns["scores"],
            columns["labels"],
            columns["texts"],
            columns["points"],
            np.asarray(columns["cut"], dtype=bool),
        )

    def to_records(self, ndigits: int = 2) -> list[dict[str, Any]]:
        """JSON-ready records in COCO box order [x, y, w, h], for people and other programs."""
        records = []
        for i in range(len(self)):
            x1, y1, x2, y2 = self.xyxy[i]
            record: dict[str, Any] = {
                "label": self.labels[i],
                "score": round(float(self.scores[i]), 4),
                "box": [round(float(v), ndigits) for v in (x1, y1, x2 - x1, y2 - y1)],
            }
            if self.texts[i] is not None:
                record["text"] = self.texts[i]
            if self.points[i] is not None:
                record["points"] = [[round(float(a), ndigits), round(float(b), ndigits)] for a, b in self.points[i]]
            if self.cut[i]:
                record["cut"] = True
            records.append(record)
        return records

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Detections:
        boxes = [r["box"] for r in records]
        detections = cls.from_xywh(
            boxes,
            [r["score"] for r in records],
            [r["label"] for r in records],
            [r.get("text") for r in records],
            [r.get("points") for r in records],
        )
        detections.cut = np.array([bool(r.get("cut", False)) for r in records], dtype=bool)
        return detections

    def __repr__(self) -> str:
        return f"Detections(n={len(self)}, labels={sorted(set(self.labels))})"


@dataclass
class Recognition:
    """A whole image's recognition: what `tilerec.merge` returns and `recognize_image` gives in process."""

    width: int
    height: int
    detections: Detections
    recognizer: str
    params: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    tile: int = 640
    overlap: float = 0.2
    tiles: int = 1
    batches: int = 1  # the tiles cut into this many batches
    tasks: int = 1  # the tasks (worker processes) that took the batches; 1 in one process
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    level: int = 0  # pyramid level read; width, height and boxes are in its pixels
    downsample: float = 1.0  # level 0's width / this level's width: boxes times this are level-0 pixels
    roi: list[int] | None = None  # [x, y, w, h] the job was restricted to; None: the whole image
    skipped: int | None = None  # tiles skipped as blank; None: skip_blank was off

    def to_json(self) -> dict[str, Any]:
        """The result document; `image.level`/`image.downsample` (level > 0), `image.roi` (a roi was given) and
        `tiling.skipped` (skip_blank was on) appear only when they apply."""
        image: dict[str, Any] = {"width": self.width, "height": self.height, "source": self.source}
        if self.level:
            image.update(level=self.level, downsample=round(self.downsample, 6))
        if self.roi is not None:
            image["roi"] = list(self.roi)
        tiling: dict[str, Any] = {
            "tile": self.tile,
            "overlap": self.overlap,
            "tiles": self.tiles,
            "batches": self.batches,
            "tasks": self.tasks,
        }
        if self.skipped is not None:
            tiling["skipped"] = self.skipped
        return {
            "schema": SCHEMA,
            "image": image,
            "recognizer": {"name": self.recognizer, "params": self.params},
            "tiling": tiling,
            "detections": self.detections.to_records(),
            "failed_tiles": self.failed_tiles,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recognition:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} result: schema is {data.get('schema')!r}")
        return cls(
            width=data["image"]["width"],
            height=data["image"]["height"],
            source=data["image"].get("source"),
            detections=Detections.from_records(data["detections"]),
            recognizer=data["recognizer"]["name"],
            params=data["recognizer"]["params"],
            tile=data["tiling"]["tile"],
            overlap=data["tiling"]["overlap"],
            tiles=data["tiling"]["tiles"],
            batches=data["tiling"].get("batches", data["tiling"]["tasks"]),
            tasks=data["tiling"]["tasks"],
            failed_tiles=data.get("failed_tiles", []),
            timings=data.get("timings", {}),
            level=data["image"].get("level", 0),
            downsample=data["image"].get("downsample", 1.0),
            roi=data["image"].get("roi"),
            skipped=data["tiling"].get("skipped"),
        )
