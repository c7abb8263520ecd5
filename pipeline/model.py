"""The one result model: `Detections` flows from recognizer to merge to JSON; `Recognition` is a whole job's result."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely

from pipeline.shapes import ShapeError, as_mask, check_mask, obb_corners, rings_of

SCHEMA = "tilerec/recognition@2"
READABLE = ("tilerec/recognition@1", SCHEMA)  # @1 results have no optional columns


def _object_array(values: Iterable[Any], length: int) -> np.ndarray:
    array = np.fromiter(values, dtype=object)  # one element per value: equal-shaped arrays must not broadcast
    if len(array) != length:
        raise ValueError(f"all detection columns must have the same length ({len(array)} != {length})")
    return array


class Detections:
    """Columnar detections (like supervision's `Detections`), so merging is vectorised.

    Always: xyxy (N, 4) float box corners; scores (N,); labels (N,) str; texts, a decoded payload or None; points,
    (P, 2) landmark or corner arrays or None; cut, the box touches an inner tile border, so a neighbouring tile may
    have seen the object whole.
    Optional columns (None where a detection has none): masks, shapely (Multi)Polygons, holes allowed
    (`pipeline.shapes`); obb (N, 5) oriented boxes (cx, cy, w, h, degrees clockwise), NaN rows where absent;
    keypoints, (K, 3) arrays of x, y, score or visibility, all with the same K, named by `keypoint_names`;
    class_id (N,) int, -1 where absent; data, any further per-detection columns by name (JSON values), kept through
    every stage.

    Examples:
        A recognizer builds one per tile, in the tile's pixels; tilerec shifts, clips and merges them:

        >>> import numpy as np
        >>> found = Detections.from_xywh([[10, 20, 30, 40]], [0.9], "face")
        >>> found.xyxy.tolist(), found.labels.tolist()
        ([[10.0, 20.0, 40.0, 60.0]], ['face'])
        >>> len(Detections.concat([found, found.shifted(100, 0)]))
        2
    """

    __slots__ = ("class_id", "cut", "data", "keypoint_names", "keypoints", "labels", "masks", "obb", "points",
                 "scores", "texts", "xyxy")  # fmt: skip

    def __init__(
        self,
        xyxy: np.ndarray,
        scores: np.ndarray,
        labels: Sequence[str],
        texts: Sequence[str | None] | None = None,
        points: Sequence[np.ndarray | None] | None = None,
        cut: np.ndarray | None = None,
        *,
        masks: Sequence[Any] | None = None,
        obb: np.ndarray | Sequence[Sequence[float] | None] | None = None,
        keypoints: Sequence[np.ndarray | None] | None = None,
        keypoint_names: Sequence[str] = (),
        class_id: Sequence[int] | np.ndarray | None = None,
        data: Mapping[str, Sequence[Any]] | None = None,
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
        self.masks = _object_array((as_mask(m) for m in masks) if masks is not None else [None] * n, n)
        self.obb = _obb_column(obb, n)
        self.keypoint_names = tuple(str(name) for name in keypoint_names)
        self.keypoints = _keypoint_column(keypoints, n, self.keypoint_names)
        self.class_id = np.full(n, -1, dtype=np.int64) if class_id is None else _class_ids(class_id, n)
        self.data = {str(key): _object_array(values, n) for key, values in (data or {}).items()}

    def _with(self, index: Any = None, **columns: Any) -> Detections:
        """These detections, rows picked by `index` (all if None) and columns replaced by `columns`."""
        pick = slice(None) if index is None else index
        current = {
            "xyxy": self.xyxy, "scores": self.scores, "labels": self.labels, "texts": self.texts,
            "points": self.points, "cut": self.cut, "masks": self.masks, "obb": self.obb,
            "keypoints": self.keypoints, "class_id": self.class_id,
        }  # fmt: skip
        values = {name: columns.get(name, column)[pick] for name, column in current.items()}
        data = {key: column[pick] for key, column in columns.get("data", self.data).items()}
        return Detections(
            values.pop("xyxy"), values.pop("scores"), values.pop("labels"), values.pop("texts"),
            list(values.pop("points")), values.pop("cut"), masks=list(values.pop("masks")),
            keypoints=list(values.pop("keypoints")), data=data, keypoint_names=self.keypoint_names, **values,
        )  # fmt: skip

    @classmethod
    def empty(cls) -> Detections:
        """No detections: what a recognizer returns for a tile with nothing in it."""
        return cls(np.zeros((0, 4)), np.zeros(0), [])

    @classmethod
    def from_xywh(
        cls,
        boxes: np.ndarray | Sequence[Sequence[float]],
        scores: Sequence[float] | np.ndarray,
        labels: Sequence[str] | str,
        texts: Sequence[str | None] | None = None,
        points: Sequence[np.ndarray | None] | None = None,
        **columns: Any,
    ) -> Detections:
        """Detections from COCO-order boxes.

        Args:
            boxes: (N, 4) boxes [x, y, w, h].
            scores: (N,) scores.
            labels: one label for all, or one per box.
            texts: decoded payloads, or None.
            points: landmark or corner arrays, or None.
            **columns: the optional columns (masks, obb, keypoints, keypoint_names, class_id, data).

        Returns:
            The detections, boxes as corners (xyxy).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xyxy = boxes.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        if isinstance(labels, str):
            labels = [labels] * len(boxes)
        return cls(xyxy, scores, labels, texts, points, **columns)

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        """One Detections of several; a data column some parts lack is None in their rows."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        names = sorted({name for part in parts for name in part.data})
        names_of_keypoints = {part.keypoint_names for part in parts if part.keypoint_names}
        if len(names_of_keypoints) > 1:
            raise ShapeError(f"keypoints: parts name their keypoints differently: {sorted(names_of_keypoints)}")
        joined = np.concatenate
        return cls(
            joined([p.xyxy for p in parts]),
            joined([p.scores for p in parts]),
            joined([p.labels for p in parts]),
            joined([p.texts for p in parts]),
            list(joined([p.points for p in parts])),
            joined([p.cut for p in parts]),
            masks=list(joined([p.masks for p in parts])),
            obb=joined([p.obb for p in parts]),
            keypoints=list(joined([p.keypoints for p in parts])),
            keypoint_names=next(iter(names_of_keypoints), ()),
            class_id=joined([p.class_id for p in parts]),
            data={name: joined([p.data.get(name, np.full(len(p), None)) for p in parts]) for name in names},
        )

    def __len__(self) -> int:
        return len(self.scores)

    def with_data(self, columns: Mapping[str, Sequence[Any]]) -> Detections:
        """These detections with data columns added or replaced (one JSON value per detection, None: none)."""
        added = {key: _object_array(values, len(self)) for key, values in columns.items()}
        return self._with(data={**self.data, **added})

    def __getitem__(self, index: np.ndarray | slice | list[int]) -> Detections:
        return self._with(index)

    def has(self, column: str) -> bool:
        """Whether any detection has a value in an optional column (masks, obb, keypoints, class_id)."""
        if column == "obb":
            return bool(self.with_obb().any())
        if column == "class_id":
            return bool((self.class_id >= 0).any())
        return any(value is not None for value in getattr(self, column))

    def with_obb(self) -> np.ndarray:
        """(N,) bool: the detections that have an oriented box (an all-NaN row is none)."""
        return ~np.isnan(self.obb).all(axis=1)

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections moved by (dx, dy): tile coordinates to image coordinates."""
        offset = np.array([dx, dy], dtype=np.float64)
        obb = self.obb.copy()
        obb[:, :2] += offset
        masks = self.masks
        if self.has("masks"):
            masks = _object_array(
                (None if m is None else shapely.transform(m, lambda xy: xy + offset) for m in self.masks), len(self)
            )
        keypoints = [None if k is None else k + np.array([dx, dy, 0.0]) for k in self.keypoints]
        return self._with(
            xyxy=self.xyxy + np.tile(offset, 2),
            points=_object_array((None if p is None else p + offset for p in self.points), len(self)),
            masks=masks,
            obb=obb,
            keypoints=_object_array(keypoints, len(self)),
        )

    def clipped(self, width: int, height: int) -> Detections:
        """Boxes, points, keypoints and masks clamped to the image; boxes left with no area are dropped."""
        xyxy = self.xyxy.copy()
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        points = _object_array((None if p is None else p.clip([0, 0], [width, height]) for p in self.points), len(self))
        keypoints = _object_array(
            (None if k is None else k.clip([0, 0, -np.inf], [width, height, np.inf]) for k in self.keypoints), len(self)
        )
        masks = self.masks
        if self.has("masks"):
            masks = _object_array(
                (m if m is None or _inside(m, width, height) else _clip(m, width, height) for m in self.masks),
                len(self),
            )
        kept = self._with(xyxy=xyxy, points=points, keypoints=keypoints, masks=masks)
        area_ok = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return kept if area_ok.all() else kept[np.flatnonzero(area_ok)]

    def check(self, width: float, height: float) -> None:
        """Raise ShapeError naming the column, the detection and the fault, where a recognizer's output for a
        `width`×`height` tile is not well formed (NaN, an invalid polygon, a mask outside the tile)."""
        if not len(self):
            return
        for name in ("xyxy", "scores"):
            bad = np.flatnonzero(~np.isfinite(getattr(self, name)).reshape(len(self), -1).all(axis=1))
            if len(bad):
                raise ShapeError(f"{name}: detection {bad[0]} has a value that is not a finite number")
        present = self.with_obb()
        bad = np.flatnonzero(present & (~np.isfinite(self.obb).all(axis=1) | (self.obb[:, 2:4] <= 0).any(axis=1)))
        if len(bad):
            row = self.obb[bad[0]].tolist()
            raise ShapeError(f"obb: detection {bad[0]} is {row}: not finite, or not of positive size")
        for i, keypoints in enumerate(self.keypoints):
            if keypoints is not None and not np.isfinite(keypoints).all():
                raise ShapeError(f"keypoints: detection {i} has a value that is not a finite number")
        for i, mask in enumerate(self.masks):
            fault = None if mask is None else check_mask(mask, width, height)
            if fault is not None:
                raise ShapeError(f"masks: detection {i} is {fault}")

    def to_columns(self) -> dict[str, Any]:
        """Exact, compact JSON form for passing detections between stages (tile task to merge); optional columns
        only when some detection has them."""
        columns: dict[str, Any] = {
            "xyxy": self.xyxy.tolist(),
            "scores": self.scores.tolist(),
            "labels": list(self.labels),
            "texts": list(self.texts),
            "points": [None if p is None else p.tolist() for p in self.points],
            "cut": self.cut.tolist(),
        }
        if self.has("masks"):
            columns["masks"] = [None if m is None else rings_of(m) for m in self.masks]
        if self.has("obb"):
            columns["obb"] = [
                row.tolist() if present else None for row, present in zip(self.obb, self.with_obb(), strict=True)
            ]
        if self.has("keypoints"):
            columns["keypoints"] = [None if k is None else k.tolist() for k in self.keypoints]
            columns["keypoint_names"] = list(self.keypoint_names)
        if self.has("class_id"):
            columns["class_id"] = self.class_id.tolist()
        if self.data:
            columns["data"] = {key: list(values) for key, values in self.data.items()}
        return columns

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any]) -> Detections:
        return cls(
            np.asarray(columns["xyxy"], dtype=np.float64).reshape(-1, 4),
            columns["scores"],
            columns["labels"],
            columns["texts"],
            columns["points"],
            np.asarray(columns["cut"], dtype=bool),
            masks=columns.get("masks"),
            obb=columns.get("obb"),
            keypoints=columns.get("keypoints"),
            keypoint_names=columns.get("keypoint_names", ()),
            class_id=columns.get("class_id"),
            data=columns.get("data"),
        )

    def to_records(self, ndigits: int = 2) -> list[dict[str, Any]]:
        """JSON-ready records in COCO box order [x, y, w, h], for people and other programs; each optional field
        only where the detection has it."""

        def rounded(values: np.ndarray) -> list[Any]:
            return np.round(values, ndigits).tolist()

        corners, with_obb = obb_corners(self.obb), self.with_obb()
        records = []
        for i in range(len(self)):
            x1, y1, x2, y2 = self.xyxy[i]
            record: dict[str, Any] = {
                "label": self.labels[i],
                "score": round(float(self.scores[i]), 4),
                "box": [round(float(v), ndigits) for v in (x1, y1, x2 - x1, y2 - y1)],
            }
            if self.class_id[i] >= 0:
                record["class_id"] = int(self.class_id[i])
            if self.texts[i] is not None:
                record["text"] = self.texts[i]
            if self.points[i] is not None:
                record["points"] = rounded(self.points[i])
            if with_obb[i]:
                cx, cy, w, h, angle = self.obb[i]
                record["obb"] = {
                    "center": rounded(np.array([cx, cy])),
                    "size": rounded(np.array([w, h])),
                    "angle": round(float(angle), 3),
                    "corners": rounded(corners[i]),
                }
            if self.masks[i] is not None:
                record["mask"] = rings_of(self.masks[i], ndigits)
            if self.keypoints[i] is not None:
                record["keypoints"] = [[round(float(x), ndigits), round(float(y), ndigits), round(float(s), 4)]
                                       for x, y, s in self.keypoints[i]]  # fmt: skip
            if self.cut[i]:
                record["cut"] = True
            values = {key: column[i] for key, column in self.data.items() if column[i] is not None}
            if values:
                record["data"] = values
            records.append(record)
        return records

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], keypoint_names: Sequence[str] = ()) -> Detections:
        """Detections from `to_records`' form (schema @1 records too: they have no optional columns)."""
        keys = sorted({key for r in records for key in r.get("data", {})})

        def obb(record: Mapping[str, Any]) -> list[float] | None:
            box = record.get("obb")
            return None if box is None else [*box["center"], *box["size"], box["angle"]]

        return cls.from_xywh(
            [r["box"] for r in records],
            [r["score"] for r in records],
            [r["label"] for r in records],
            [r.get("text") for r in records],
            [r.get("points") for r in records],
            cut=np.array([bool(r.get("cut", False)) for r in records], dtype=bool),
            masks=[r.get("mask") for r in records],
            obb=[obb(r) for r in records],
            keypoints=[r.get("keypoints") for r in records],
            keypoint_names=keypoint_names,
            class_id=[r.get("class_id", -1) for r in records],
            data={key: [r.get("data", {}).get(key) for r in records] for key in keys},
        )

    def __repr__(self) -> str:
        return f"Detections(n={len(self)}, labels={sorted(set(self.labels))})"


def _obb_column(obb: Any, n: int) -> np.ndarray:
    """(n, 5) oriented boxes, NaN rows for None entries."""
    if obb is None:
        return np.full((n, 5), np.nan)
    if isinstance(obb, np.ndarray) and obb.dtype != object:
        return np.asarray(obb, dtype=np.float64).reshape(n, 5)
    rows = list(obb)
    if len(rows) != n:
        raise ValueError(f"all detection columns must have the same length ({len(rows)} != {n})")
    column = np.full((n, 5), np.nan)
    for i, row in enumerate(rows):
        if row is not None:
            values = np.asarray(row, dtype=np.float64).reshape(-1)
            if values.shape != (5,):
                raise ShapeError(f"obb: detection {i} has {values.size} values, not 5 (cx, cy, w, h, angle)")
            column[i] = values
    return column


def _keypoint_column(keypoints: Any, n: int, names: Sequence[str]) -> np.ndarray:
    """(K, 3) arrays (a K×2 input gets score 1), all of one K, which `names` gives if it is not empty."""
    if keypoints is None:
        return np.full(n, None, dtype=object)
    column = _object_array(keypoints, n)
    count = len(names) or None
    for i, value in enumerate(column):
        if value is None:
            continue
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] not in (2, 3):
            raise ShapeError(f"keypoints: detection {i} has shape {array.shape}, not K x 3 (x, y, score)")
        if array.shape[1] == 2:
            array = np.hstack([array, np.ones((len(array), 1))])
        count = count or len(array)
        if len(array) != count:
            raise ShapeError(f"keypoints: detection {i} has {len(array)} keypoints, not {count}"
                             + (f" ({', '.join(names)})" if names else ""))  # fmt: skip
        column[i] = array
    return column


def _class_ids(values: Any, n: int) -> np.ndarray:
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer) and array.size:
        floats = array.astype(np.float64)
        if not np.isfinite(floats).all() or (floats != np.round(floats)).any():
            raise ShapeError(f"class_id: values must be whole numbers, got {array.tolist()[:5]}")
    return array.astype(np.int64).reshape(n)


def _inside(mask: Any, width: float, height: float) -> bool:
    x1, y1, x2, y2 = mask.bounds
    return x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height


def _clip(mask: Any, width: float, height: float) -> Any:
    """A mask cut to the image; None if nothing is left."""
    clipped = shapely.clip_by_rect(mask, 0, 0, width, height)
    polygons = [g for g in getattr(clipped, "geoms", [clipped]) if g.geom_type == "Polygon" and not g.is_empty]
    if not polygons:
        return None
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


@dataclass(frozen=True)
class Spatial:
    """Where an image's pixels are in the world, as its source says: a map (CRS and geotransform) or a microscope
    slide (microns per pixel). Everything refers to level-0 pixels; a field is None where the source has no value."""

    crs: str | None = None  # WKT
    epsg: int | None = None  # the CRS's EPSG code, where one matches
    transform: tuple[float, ...] | None = (
        None  # affine (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f
    )
    georeferenced: bool | None = None  # False: a raster read for its bands that has no place on a map
    mpp: tuple[float, float] | None = None  # microns per pixel (x, y) of a slide

    def to_json(self) -> dict[str, Any]:
        """The fields that have a value, as the result's `image` carries them."""
        document: dict[str, Any] = {}
        if self.georeferenced is not None:
            document["georeferenced"] = self.georeferenced
        if self.crs is not None:
            document["crs"] = {"wkt": self.crs, "epsg": self.epsg}
        if self.transform is not None:
            document["transform"] = list(self.transform)
        if self.mpp is not None:
            document["mpp"] = list(self.mpp)
        return document

    @classmethod
    def from_json(cls, image: Mapping[str, Any]) -> Spatial | None:
        """From a result's `image` (or `to_json`'s form); None when it has none of the fields."""
        crs, transform, mpp = image.get("crs"), image.get("transform"), image.get("mpp")
        if crs is None and transform is None and mpp is None and image.get("georeferenced") is None:
            return None
        return cls(
            crs=crs["wkt"] if crs else None,
            epsg=crs.get("epsg") if crs else None,
            transform=tuple(transform) if transform is not None else None,
            georeferenced=image.get("georeferenced"),
            mpp=tuple(mpp) if mpp is not None else None,
        )


def map_points(transform: Sequence[float], downsample: float, points: np.ndarray) -> np.ndarray:
    """Pixel coordinates of a level (x, y in its pixels; corners of pixels, as boxes and masks are) on the map.

    Args:
        transform: level 0's affine (a, b, c, d, e, f).
        downsample: level 0's width / the level's width.
        points: (..., 2) pixel coordinates at the level.

    Returns:
        (..., 2) map coordinates in the raster's CRS.
    """
    a, b, c, d, e, f = transform[:6]
    col, row = points[..., 0] * downsample, points[..., 1] * downsample
    return np.stack([a * col + b * row + c, d * col + e * row + f], axis=-1)


@dataclass
class StageSummary:
    """What a job's second stage did (`pipeline.recognizers.stages`), as the result's `second_stage` carries it."""

    name: str
    crops: int = 0  # crops read and recognized
    batches: int = 1  # the crops cut into this many batch tasks (1 in one process)
    over_limit: int = 0  # detections the stage wanted beyond the job's max_crops, left as the first stage gave them
    failed_crops: list[dict[str, Any]] = field(default_factory=list)  # {"crop", "box", "window", "error"}
    output: dict[str, Any] = field(default_factory=dict)  # the stage's page-level fields (text, word count, …)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "crops": self.crops, "batches": self.batches, "over_limit": self.over_limit,
                "failed_crops": self.failed_crops, "output": self.output}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageSummary:
        return cls(data["name"], int(data["crops"]), int(data["batches"]), int(data.get("over_limit", 0)),
                   list(data.get("failed_crops", [])), dict(data.get("output", {})))  # fmt: skip


@dataclass
class Recognition:
    """A whole image's recognition: what `tilerec.merge` returns (as `to_json()`), `recognize_image` gives in
    process and `tasks.client` gives a caller.

    Examples:
        >>> from pipeline.model import Detections, Recognition
        >>> found = Recognition(640, 480, Detections.from_xywh([[1, 2, 3, 4]], [0.5], "qrcode"), "qrcode")
        >>> document = found.to_json()
        >>> document["schema"], document["detections"][0]["box"]
        ('tilerec/recognition@2', [1.0, 2.0, 3.0, 4.0])
        >>> len(Recognition.from_json(document).detections)
        1
    """

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
    skipped_tiles: list[list[int]] = field(default_factory=list)  # their windows [x, y, w, h], for a viewer
    spatial: Spatial | None = None  # where the pixels are on a map or a slide; None: pixels only
    second_stage: StageSummary | None = None  # what the recognizer's second stage did; None: it ran none

    def to_json(self) -> dict[str, Any]:
        """The result document (docs/tasks.md, "The result"), JSON-ready.

        `image.level`/`image.downsample` (level > 0), `image.roi` (a roi was given), `tiling.skipped` and
        `tiling.skipped_tiles` (skip_blank was on), `keypoint_names` (detections have keypoints) and `second_stage`
        (one ran) appear only when they apply.

        Returns:
            The document, schema `tilerec/recognition@2`.
        """
        image: dict[str, Any] = {"width": self.width, "height": self.height, "source": self.source}
        if self.level:
            image.update(level=self.level, downsample=round(self.downsample, 6))
        if self.roi is not None:
            image["roi"] = list(self.roi)
        records = self.detections.to_records()
        if self.spatial is not None:
            image.update(self.spatial.to_json())
            if self.spatial.transform is not None:
                _add_map_boxes(records, self.detections.xyxy, self.spatial.transform, self.downsample)
        tiling: dict[str, Any] = {
            "tile": self.tile,
            "overlap": self.overlap,
            "tiles": self.tiles,
            "batches": self.batches,
            "tasks": self.tasks,
        }
        if self.skipped is not None:
            tiling.update(skipped=self.skipped, skipped_tiles=self.skipped_tiles)
        document = {
            "schema": SCHEMA,
            "image": image,
            "recognizer": {"name": self.recognizer, "params": self.params},
            "tiling": tiling,
            "detections": records,
            "failed_tiles": self.failed_tiles,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.detections.keypoint_names:
            document["keypoint_names"] = list(self.detections.keypoint_names)
        if self.second_stage is not None:
            document["second_stage"] = self.second_stage.to_json()
        return document

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recognition:
        """A recognition from its result document.

        Args:
            data: a document of schema @2, or of @1 (which has no optional columns).

        Returns:
            The recognition.

        Raises:
            ValueError: the document names another schema.
        """
        if data.get("schema") not in READABLE:
            raise ValueError(f"not a {' or '.join(READABLE)} result: schema is {data.get('schema')!r}")
        return cls(
            width=data["image"]["width"],
            height=data["image"]["height"],
            source=data["image"].get("source"),
            detections=Detections.from_records(data["detections"], data.get("keypoint_names", ())),
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
            skipped_tiles=data["tiling"].get("skipped_tiles", []),
            spatial=Spatial.from_json(data["image"]),
            second_stage=StageSummary.from_json(data["second_stage"]) if "second_stage" in data else None,
        )


def _add_map_boxes(
    records: list[dict[str, Any]], xyxy: np.ndarray, transform: Sequence[float], downsample: float
) -> None:
    """Each record's `map_box`: [min x, min y, max x, max y] of its box's corners on the map, in the raster's CRS."""
    x1, y1, x2, y2 = (xyxy[:, k] for k in range(4))
    corners = np.stack(
        [np.stack([x1, y1], -1), np.stack([x2, y1], -1), np.stack([x2, y2], -1), np.stack([x1, y2], -1)], 1
    )
    placed = map_points(transform, downsample, corners)
    for record, points in zip(records, placed, strict=True):
        record["map_box"] = [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]
