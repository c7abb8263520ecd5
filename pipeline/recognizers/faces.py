"""Who a face is: each face aligned from the full-resolution image by its five landmarks and embedded by a face
recognition model, matched one to one against a gallery of people, or grouped with the other unknown faces.

Embedders (the `faces` extra): dlib's ResNet (128-D, the files of the `face-recognition-models` package run by
`dlib-bin`) by default; OpenCV's SFace (`cv2.FaceRecognizerSF`, 128-D) from an ONNX file the caller names. Each has
its own `similarity`, higher for more alike faces, and a default threshold from its authors:

    dlib    similarity = 1 - Euclidean distance of the descriptors; dlib's usual same-person distance, 0.6, is 0.4
    sface   similarity = cosine similarity of the features; OpenCV's same-person threshold is 0.363

Pure functions and per-process models; no Celery, no Redis: the tasks layer keeps galleries in Redis.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline.model import Detections
from pipeline.recognizers.stages import Crop, SecondStage, StageResult

EMBEDDERS = ("dlib", "sface")
MIN_FACE_PX = 32  # the shorter side of a face's box: a smaller face is blown up past what the embedders resolve
UNKNOWN = "unknown"
# where YuNet's five landmarks (eyes, nose tip, mouth corners; the subject's right first) fall in dlib's 150x150
# chip (dlib.get_face_chip, padding 0.25): measured by aligning faces with dlib's own 5-point predictor, mapping
# YuNet's landmarks of the same faces into those chips, averaging and making the result symmetric
DLIB_TEMPLATE = np.array([[45.6, 44.3], [102.8, 44.3], [74.2, 78.8], [48.2, 105.1], [100.2, 105.1]], np.float32)
DLIB_CHIP = 150
DLIB_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


class FaceError(ValueError):
    """A face that cannot be embedded (too small, no landmarks), or an embedder that cannot be built."""


class Embedder(Protocol):
    """Turns a face, given by its box and five landmarks in an image, into a vector; `model` names what made it
    (vectors of different models never compare: `similarity`)."""

    model: str

    def embed(self, image: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...


DLIB = "dlib-resnet-v1"
SFACE = "sface:"  # and the ONNX file's name


def is_sface(model: str) -> bool:
    return model.startswith(SFACE)


def default_threshold(model: str) -> float:
    """The model's authors' same-person similarity: dlib's distance 0.6, OpenCV's SFace cosine 0.363."""
    return 0.363 if is_sface(model) else 0.4


def similarity(model: str, distance: np.ndarray) -> np.ndarray:
    """The similarity of vectors of `model` this far apart (Euclidean): 1 - distance for dlib's descriptors, the
    cosine for SFace's unit-length features."""
    distance = np.asarray(distance, np.float64)
    return 1.0 - np.square(distance) / 2.0 if is_sface(model) else 1.0 - distance


def distance(model: str, least: float) -> float:
    """The Euclidean distance of vectors of `model` that are `least` similar (the inverse of `similarity`)."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * least)) if is_sface(model) else 1.0 - least


def _bgr(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def check_face(box: np.ndarray, landmarks: np.ndarray | None, min_face: int = MIN_FACE_PX) -> np.ndarray:
    """The face's five landmarks as a (5, 2) float32 array, after checking it can be embedded.

    Raises:
        FaceError: the face has no five landmarks, or its box is smaller than `min_face` pixels on a side.
    """
    if landmarks is None or len(landmarks) != 5:
        raise FaceError("a face needs its five landmarks (eyes, nose tip, mouth corners) to be aligned")
    x1, y1, x2, y2 = (float(v) for v in box)
    side = min(x2 - x1, y2 - y1)
    if side < min_face:
        raise FaceError(
            f"the face at {round(x1)},{round(y1)},{round(x2 - x1)},{round(y2 - y1)} is {side:.0f} px on its shorter "
            f"side; at least {min_face} px are needed to embed it"
        )
    return np.asarray(landmarks, np.float32)[:, :2]


def align(image: np.ndarray, landmarks: np.ndarray, template: np.ndarray, size: int) -> np.ndarray:
    """The face warped onto `template` (where its landmarks go in a `size`-pixel square) by the similarity transform
    that fits the five landmarks best; LMEDS, so one landmark guessed wrong (a hand over the mouth) does not tilt
    the face. Edges are replicated where the face reaches the image's border."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise FaceError("the face's landmarks do not fit a face (they are degenerate)")
    return cv2.warpAffine(_bgr(image), matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def dlib_model_files() -> Path:
    """The folder of dlib's models in the `face-recognition-models` package (its own helpers need pkg_resources).

    Raises:
        FaceError: the package or dlib is not installed (the `faces` extra).
    """
    try:
        import dlib  # noqa: F401

        folder = importlib.resources.files("face_recognition_models") / "models"
    except ImportError as error:
        raise FaceError(
            f"identities need dlib and its models ({error.name} is missing): pip install 'tilerec[faces]'"
        ) from None
    return Path(str(folder))


class DlibEmbedder:
    """dlib's ResNet face descriptor (128-D) of the face aligned onto dlib's 150x150 chip by its landmarks."""

    model = DLIB

    def __init__(self, min_face: int = MIN_FACE_PX) -> None:
        import dlib

        self.net = dlib.face_recognition_model_v1(str(dlib_model_files() / DLIB_MODEL))
        self.min_face = min_face

    def embed(self, image: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        chip = align(image, check_face(box, landmarks, self.min_face), DLIB_TEMPLATE, DLIB_CHIP)
        return np.asarray(self.net.compute_face_descriptor(cv2.cvtColor(chip, cv2.COLOR_BGR2RGB)), np.float32)


class SFaceEmbedder:
    """OpenCV's SFace feature (128-D, made unit length) of the face aligned by `alignCrop` from YuNet's face row."""

    def __init__(self, path: Path, min_face: int = MIN_FACE_PX) -> None:
        try:
            self.net = cv2.FaceRecognizerSF.create(str(path), "")
        except cv2.error as error:
            reason = " ".join(str(error).split()).rpartition("error: ")[2][:200]
            raise FaceError(f"face_model {path} is not a usable SFace ONNX model: {reason}") from None
        self.model = SFACE + path.name
        self.min_face = min_face

    def embed(self, image: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        points = check_face(box, landmarks, self.min_face)
        x1, y1, x2, y2 = (float(v) for v in box)
        row = np.array([[x1, y1, x2 - x1, y2 - y1, *points.reshape(-1), 1.0]], np.float32)
        feature = self.net.feature(self.net.alignCrop(_bgr(image), row)).reshape(-1).astype(np.float32)
        return feature / max(float(np.linalg.norm(feature)), 1e-12)


@lru_cache(maxsize=4)
def get_embedder(embedder: str = "dlib", face_model: str = "", min_face: int = MIN_FACE_PX) -> Embedder:
    """The embedder built once per process: dlib's, or SFace from the ONNX file `face_model`.

    Raises:
        FaceError: an unknown embedder, a missing or unusable file, dlib not installed.
    """
    if embedder == "dlib":
        return DlibEmbedder(min_face)
    if embedder == "sface":
        if not face_model:
            raise FaceError("embedder 'sface' needs its ONNX file: set face_model to its path under the model folders")
        path = Path(face_model).expanduser()
        if not path.is_file():
            raise FaceError(f"face_model {path} (embedder 'sface') does not exist")
        return SFaceEmbedder(path, min_face)
    raise FaceError(f"embedder must be one of {', '.join(EMBEDDERS)}, got {embedder!r}")


def stack(vectors: Sequence[Any]) -> np.ndarray:
    """Embeddings as one (N, D) float32 matrix; (0, 0) for none."""
    return np.array(vectors, np.float32).reshape(len(vectors), -1) if len(vectors) else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Gallery:
    """A gallery's people as one matrix: row i of `vectors` is an embedding of person `names[owners[i]]`, all made
    by `model`."""

    name: str
    model: str
    names: tuple[str, ...]
    vectors: np.ndarray  # (M, D) float32
    owners: np.ndarray  # (M,) int: index into names

    @classmethod
    def of(cls, name: str, model: str, people: dict[str, Sequence[np.ndarray]]) -> Gallery:
        """From each person's embeddings."""
        names = tuple(sorted(people))
        rows = [(index, vector) for index, person in enumerate(names) for vector in people[person]]
        return cls(name, model, names, stack([vector for _, vector in rows]), np.array([i for i, _ in rows], np.int64))


def person_similarities(faces: np.ndarray, gallery: Gallery) -> np.ndarray:
    """(faces, people): each face's similarity to each person's nearest embedding (`faces` made by the gallery's
    model)."""
    scores = np.full((len(faces), len(gallery.names)), -np.inf)
    if not len(faces) or not len(gallery.vectors):
        return scores
    distances = np.linalg.norm(faces[:, None, :] - gallery.vectors[None, :, :], axis=2)
    similar = similarity(gallery.model, distances)
    for person in range(len(gallery.names)):
        scores[:, person] = similar[:, gallery.owners == person].max(axis=1)
    return scores


@dataclass(frozen=True)
class Match:
    """A face's identity: a person's name or `unknown`, and its similarity to the nearest person (None: no one to
    compare with)."""

    identity: str
    similarity: float | None


def match_faces(scores: np.ndarray, names: Sequence[str], threshold: float, repeats: bool = False) -> list[Match]:
    """Each face's person: of the assignments of faces to people by pairs at or above `threshold`, each face at most
    one person and each person at most one face (a person is in a photo once), the one naming the most faces and,
    among those, of the highest total similarity (scipy's linear_sum_assignment); with `repeats`, each face its
    most similar person (twins, mirrors, posters).

    Args:
        scores: (faces, people) similarities (`person_similarities`).
        names: the people's names, in the columns' order.
        threshold: the least similarity that makes a face a person.
        repeats: one person may be several faces of the image.

    Returns:
        One Match per face; a face assigned to no one is `unknown` with its best similarity.
    """
    faces = len(scores)
    best = scores.max(axis=1) if scores.shape[1] else np.full(faces, -np.inf)
    matches = [Match(UNKNOWN, None if math.isinf(b) else round(float(b), 4)) for b in best]
    if not faces or not scores.shape[1]:
        return matches
    if repeats:
        pairs = [(face, int(np.argmax(scores[face]))) for face in range(faces)]
    else:
        from scipy.optimize import linear_sum_assignment

        # a pair below the threshold weighs nothing, so no assignment gains by it; one above weighs its excess plus
        # more than any assignment's total excess, so naming more faces always wins
        excess = np.where(scores >= threshold, scores - threshold, -1.0)
        weights = np.where(excess >= 0, excess + min(scores.shape) * max(float(excess.max()), 0.0) + 1.0, 0.0)
        rows, columns = linear_sum_assignment(weights, maximize=True)
        pairs = list(zip(rows.tolist(), columns.tolist(), strict=True))
    for face, person in pairs:
        if scores[face, person] >= threshold:
            matches[face] = Match(names[person], round(float(scores[face, person]), 4))
    return matches


def with_identities(detections: Detections, matches: Sequence[Match | None]) -> Detections:
    """The detections with `identity` and `similarity` data columns (None for a face that was not embedded)."""
    return detections.with_data({
        "identity": [None if m is None else m.identity for m in matches],
        "similarity": [None if m is None else m.similarity for m in matches],
    })  # fmt: skip


def cluster_faces(model: str, vectors: np.ndarray, threshold: float) -> list[int]:
    """Faces grouped into people with dlib's Chinese whispers (edges between faces at least `threshold` similar),
    labelled 1, 2, … in the order each group's first face comes (so a rerun of the same faces labels them alike)."""
    if not len(vectors):
        return []
    import dlib

    labels = dlib.chinese_whispers_clustering(
        [dlib.vector(row.astype(float).tolist()) for row in vectors], distance(model, threshold)
    )
    order: dict[int, int] = {}
    for label in labels:
        order.setdefault(label, len(order) + 1)
    return [order[label] for label in labels]


def face_rows(detections: Detections) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Each detection's box and five landmarks (None where it has not five)."""
    return [
        (detections.xyxy[i], k[:, :2] if k is not None and len(k) == 5 else None)
        for i, k in enumerate(detections.keypoints)
    ]


DOMINANT = 2.0  # a face this many times the area of every other one in a photo is the one to enroll
CROP_MARGIN = 0.5  # of the face's box on each side: the context an alignment may rotate into the chip


def _xywh(box: np.ndarray) -> str:
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    return f"{x1},{y1},{x2 - x1},{y2 - y1}"


def enrollment_face(found: Detections, box: Sequence[int] | None = None) -> int:
    """Which face of a photo to enroll: the one that overlaps `box` ([x, y, w, h]) most, else the photo's only face
    or a face clearly larger than the others (`DOMINANT` times their area).

    Raises:
        FaceError: no face; no face in the box; several faces of like size and no box (their boxes are listed).
    """
    if not len(found):
        raise FaceError("no face found")
    areas = (found.xyxy[:, 2] - found.xyxy[:, 0]) * (found.xyxy[:, 3] - found.xyxy[:, 1])
    boxes = "; ".join(_xywh(b) for b in found.xyxy[np.argsort(-areas)][:5])
    if box is not None:
        x, y, w, h = box
        overlap_w = np.minimum(found.xyxy[:, 2], x + w) - np.maximum(found.xyxy[:, 0], x)
        overlap_h = np.minimum(found.xyxy[:, 3], y + h) - np.maximum(found.xyxy[:, 1], y)
        inside = np.clip(overlap_w, 0, None) * np.clip(overlap_h, 0, None) / areas
        if inside.max() < 0.5:
            raise FaceError(f"no face in the box {x},{y},{w},{h} (faces at x,y,w,h: {boxes})")
        return int(np.argmax(inside))
    order = np.argsort(-areas)
    if len(found) > 1 and areas[order[0]] < DOMINANT * areas[order[1]]:
        raise FaceError(f"{len(found)} faces found; choose one with --box x,y,w,h (faces at x,y,w,h: {boxes})")
    return int(order[0])


def face_crop(box: np.ndarray, width: int, height: int, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The region [x, y, w, h] of the image that the face's embedding reads: its box grown by `margin` on each
    side, inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    grow_x, grow_y = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, math.floor(x1 - grow_x)), max(0, math.floor(y1 - grow_y))
    right, bottom = min(width, math.ceil(x2 + grow_x)), min(height, math.ceil(y2 + grow_y))
    return left, top, right - left, bottom - top


class FaceIdentities(SecondStage):
    """Who each merged face is: every face with five landmarks aligned from its full-resolution crop and embedded
    (crop batches), then, once, matched one to one against the gallery the job names (`identify`): data columns
    `identity` (a name, or `unknown`) and `similarity`; `None` in both for a face too small to embed.

    Parameters (the face detector's): identify (a gallery's name), identity_threshold (null: the embedder's own),
    identity_repeats (a person may be several faces of one image), embedder, face_model, min_face, embeddings (the
    faces' embeddings as an `embedding` data column: only for a caller that keeps them as biometric data).
    Embeddings travel only through the job's claim-check records, never in messages or, unasked, results.
    """

    name = "identities"
    cost_ms = 30.0  # one face on one core: alignment and dlib's ResNet
    max_batch = 16
    margin = CROP_MARGIN

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.gallery = str(params.get("identify") or "")
        threshold = params.get("identity_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise FaceError(f"identity_threshold must be a number (a similarity) or null, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.repeats = bool(params.get("identity_repeats"))
        self.embedder = (str(params.get("embedder") or "dlib"), str(params.get("face_model") or ""),
                         int(params.get("min_face") or MIN_FACE_PX))  # fmt: skip
        if self.embedder[0] not in EMBEDDERS:
            raise FaceError(f"embedder must be one of {', '.join(EMBEDDERS)}, got {self.embedder[0]!r}")
        self.keep_embeddings = bool(params.get("embeddings"))
        self.resources = ("gallery",) if self.gallery else ()

    def wants(self, detections: Detections) -> np.ndarray:
        """The faces with five landmarks (a detector without them is refused when the job is checked)."""
        return np.array([i for i, (_, points) in enumerate(face_rows(detections)) if points is not None], np.int64)

    def recognize(self, crops: list[Crop]) -> list[dict[str, Any]]:
        embedder = get_embedder(*self.embedder)
        records: list[dict[str, Any]] = []
        for crop in crops:
            box, points = face_rows(crop.detection)[0]
            try:
                vector = embedder.embed(crop.pixels, box, points)
            except FaceError as error:  # too small: the face stays, without an identity
                records.append({"unembedded": str(error)})
            else:
                records.append({"model": embedder.model, "embedding": vector.astype(float).tolist()})
        return records

    def finish(
        self, detections: Detections, records: Sequence[Mapping[str, Any] | None], resources: Mapping[str, Any]
    ) -> StageResult:
        rows = [row for row, record in enumerate(records) if record and "embedding" in record]
        vectors = stack([records[row]["embedding"] for row in rows])
        output: dict[str, Any] = {"faces": len(rows), "too_small": sum(1 for r in records if r and "unembedded" in r)}
        if self.gallery:
            gallery: Gallery = resources["gallery"]
            models = {records[row]["model"] for row in rows}
            if gallery.names and models - {gallery.model}:
                raise FaceError(f"gallery {gallery.name!r} holds {gallery.model} embeddings, the faces were embedded "
                                f"by {', '.join(sorted(models))}: use the gallery's embedder")  # fmt: skip
            model = gallery.model or next(iter(models), None)  # an empty gallery: the faces' own
            threshold = default_threshold(model or DLIB) if self.threshold is None else self.threshold
            found = match_faces(person_similarities(vectors, gallery), gallery.names, threshold, self.repeats)
            matches: list[Match | None] = [None] * len(detections)
            for row, match in zip(rows, found, strict=True):
                matches[row] = match
            detections = with_identities(detections, matches)
            named = sum(1 for match in found if match.identity != UNKNOWN)
            output.update(gallery=gallery.name, model=model, threshold=threshold,
                          identified=named, unknown=len(found) - named)  # fmt: skip
        if self.keep_embeddings:
            kept = dict.fromkeys(range(len(detections)))
            kept.update({row: records[row]["embedding"] for row in rows})
            detections = detections.with_data({"embedding": list(kept.values())})
        return StageResult(detections, output)
