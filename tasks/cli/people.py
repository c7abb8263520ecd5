"""The faces of a run (`tilerec run PHOTOS --identify G --out RUN`): the faces no one in the gallery matched are
grouped into people across the whole run (`unknown-1`, `unknown-2`, … in the order each person first appears), and
`tilerec gallery add NAME --from RUN unknown-3` names such a group.

The jobs of such a run return their faces' embeddings (the `embeddings` parameter), and this process keeps them in
RUN/faces.npz, never in results.jsonl or coco.json: biometric data, in the user's folder, deleted with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.model import Recognition
from pipeline.recognizers.faces import DLIB, default_threshold, stack
from tasks.cli.errors import CliError

if TYPE_CHECKING:  # tasks.client loads the Celery app: imported when a run starts
    from tasks.client import Completed

FACES = "faces.npz"
EMBEDDING = "embedding"  # the data column a job with `embeddings=true` returns


@dataclass(frozen=True)
class RunFace:
    """One embedded face of a run: its image (path), its row among that image's detections, its box [x, y, w, h],
    its identity in the job's result, and its embedding."""

    image: str
    row: int
    box: list[int]
    identity: str
    vector: np.ndarray


def take_faces(recognition: Recognition, image: str) -> tuple[Recognition, list[RunFace]]:
    """A job's recognition without its embeddings, and its embedded faces."""
    detections = recognition.detections
    vectors = detections.data.get(EMBEDDING)
    if vectors is None:
        return recognition, []
    identities = detections.data.get("identity", [None] * len(detections))
    found = []
    for row, vector in enumerate(vectors):
        if vector is not None:
            x1, y1, x2, y2 = (round(float(v)) for v in detections.xyxy[row])
            box = [x1, y1, x2 - x1, y2 - y1]
            found.append(RunFace(image, row, box, str(identities[row]), np.asarray(vector, np.float32)))
    stripped = detections.with_data({EMBEDDING: [None] * len(detections)})  # a None value is never written
    return replace(recognition, detections=stripped), found


def group_unknown(model: str, faces: Sequence[RunFace], threshold: float) -> list[str | None]:
    """Each face's group: `unknown-N` for the faces no one matched, grouped into people (None for the others)."""
    from pipeline.recognizers.faces import UNKNOWN, FaceError, cluster_faces

    unknown = [index for index, face in enumerate(faces) if face.identity == UNKNOWN]
    try:
        labels = cluster_faces(model, np.stack([faces[i].vector for i in unknown]), threshold) if unknown else []
    except FaceError as error:
        raise CliError(f"cannot group the run's unknown faces: {error}") from None
    groups: list[str | None] = [None] * len(faces)
    for index, label in zip(unknown, labels, strict=True):
        groups[index] = f"{UNKNOWN}-{label}"
    return groups


def with_groups(recognition: Recognition, groups: dict[int, str]) -> Recognition:
    """The recognition with each grouped face's identity (`unknown`) replaced by its group, by detection row."""
    detections = recognition.detections
    identities = list(detections.data.get("identity", [None] * len(detections)))
    for row, group in groups.items():
        identities[row] = group
    return replace(recognition, detections=detections.with_data({"identity": identities}))


def label_outcome(outcome: Completed, groups: dict[int, str]) -> Completed:
    """The outcome with its faces labelled by group (the --json, --format and --annotate outputs then name the same
    people as results.jsonl)."""
    if outcome.result is None or not groups:
        return outcome
    return replace(outcome, result=with_groups(outcome.result, groups))


def write_faces(folder: Path, model: str, faces: Sequence[RunFace], groups: Sequence[str | None]) -> Path:
    """RUN/faces.npz, written whole and renamed into place (an interrupted write leaves the previous one)."""
    path = folder / FACES
    partial = folder / (FACES + ".partial.npz")
    np.savez(
        partial,
        model=np.array(model),
        images=np.array([face.image for face in faces], dtype=str),
        rows=np.array([face.row for face in faces], dtype=np.int64),
        boxes=np.array([face.box for face in faces], dtype=np.int64).reshape(-1, 4),
        identities=np.array([face.identity for face in faces], dtype=str),
        groups=np.array(["" if group is None else group for group in groups], dtype=str),
        vectors=stack([face.vector for face in faces]),
    )
    os.replace(partial, path)
    return path


def read_faces(folder: Path) -> tuple[str, list[RunFace], list[str | None]] | None:
    """A run's faces.npz (model, faces, groups); None when the run kept none."""
    path = folder / FACES
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            faces = [
                RunFace(str(image), int(row), [int(v) for v in box], str(identity), vector)
                for image, row, box, identity, vector in zip(stored["images"], stored["rows"], stored["boxes"],
                                                             stored["identities"], stored["vectors"], strict=True)
            ]  # fmt: skip
            return str(stored["model"]), faces, [str(group) or None for group in stored["groups"]]
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot read {path}: {error}") from None


def read_group(run: str, group: str) -> tuple[str, list[Any]]:
    """The model and the faces of one group of a run, as gallery entries (`tasks.gallery.Enrolled`)."""
    from tasks.gallery import Enrolled

    if not Path(run).is_dir():
        raise CliError(f"--from {run!r}: no such run folder (the --out of `tilerec run … --identify G`)")
    kept = read_faces(Path(run))
    if kept is None:
        raise CliError(f"--from {run!r}: the run kept no faces ({FACES}); run it with --identify G --out {run}")
    model, faces, groups = kept
    chosen = [face for face, label in zip(faces, groups, strict=True) if label == group]
    if not chosen:
        known = sorted({label for label in groups if label}, key=lambda label: int(label.rpartition("-")[2]))
        raise CliError(f"--from {run!r}: no group {group!r}; its groups: {', '.join(known) or 'none'}")
    return model, [Enrolled(face.vector, Path(face.image).name, face.box) for face in chosen]


@dataclass
class RunFaces:
    """The embedded faces of a run, taken out of each job's result as it ends (`take`), with the model that made
    them and the threshold the jobs matched at."""

    faces: list[RunFace] = field(default_factory=list)
    model: str = ""
    threshold: float = 0.0

    def take(self, outcome: Completed) -> Completed:
        """The outcome with its recognition's embeddings taken out (kept here)."""
        if outcome.result is None:
            return outcome
        result, found = take_faces(outcome.result, str(outcome.image.path or outcome.image.given))
        self.faces += found
        output = result.second_stage.output if result.second_stage else {}
        self.model = output.get("model") or self.model
        self.threshold = output.get("threshold", self.threshold)
        return replace(outcome, result=result)


@dataclass(frozen=True)
class Grouped:
    """The unknown faces of a run grouped into people: results.jsonl's lines with each grouped face's label, the
    groups by image path and detection row, and the counts of faces and of groups."""

    lines: list[dict[str, Any]]
    by_image: dict[str, dict[int, str]]
    faces: int
    people: int


def group_run(folder: Path, taken: RunFaces, lines: list[dict[str, Any]]) -> Grouped:
    """Group the unknown faces of the whole run (those of images done before a --resume included, from the run's
    faces.npz) into people and keep them in RUN/faces.npz."""
    done = {line["path"] for line in lines if line.get("ok") and line.get("result")}
    fresh = {face.image for face in taken.faces}
    before = read_faces(folder)
    faces = list(taken.faces)
    model = taken.model
    if before is not None:
        model = model or before[0]
        faces += [face for face in before[1] if face.image in done and face.image not in fresh]
    faces.sort(key=lambda face: (face.image, face.row))
    groups = group_unknown(model, faces, taken.threshold or default_threshold(model or DLIB))
    by_image: dict[str, dict[int, str]] = {}
    for face, group in zip(faces, groups, strict=True):
        if group is not None:
            by_image.setdefault(face.image, {})[face.row] = group
    labelled = [
        {**line, "result": with_groups(Recognition.from_json(line["result"]), by_image[line["path"]]).to_json()}
        if line.get("result") and line["path"] in by_image
        else line
        for line in lines
    ]
    write_faces(folder, model, faces, groups)
    return Grouped(labelled, by_image, len(faces), len({group for group in groups if group}))
