"""The faces of a run (`tilerec run PHOTOS --identify G --out RUN`): the faces no one in the gallery matched are
grouped into people across the whole run (`unknown-1`, `unknown-2`, … in the order each person first appears), and
`tilerec gallery add NAME --from RUN unknown-3` names such a group.

The jobs of such a run return their faces' embeddings (the `embeddings` parameter), and this process keeps them in
RUN/faces.npz, never in results.jsonl or coco.json: biometric data, in the user's folder, deleted with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.cli.errors import CliError

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


def take_faces(result: dict[str, Any], image: str) -> tuple[dict[str, Any], list[RunFace]]:
    """A job's result without its embeddings, and its embedded faces."""
    detections, found = [], []
    for row, record in enumerate(result.get("detections", [])):
        data = dict(record.get("data") or {})
        vector = data.pop(EMBEDDING, None)
        if vector is not None:
            x, y, w, h = (round(float(v)) for v in record["box"])
            found.append(RunFace(image, row, [x, y, w, h], str(data.get("identity")), np.asarray(vector, np.float32)))
        detections.append({**record, "data": data} if "data" in record else record)
    return {**result, "detections": detections}, found


def group_unknown(model: str, faces: Sequence[RunFace], threshold: float) -> list[str | None]:
    """Each face's group: `unknown-N` for the faces no one matched, grouped into people (None for the others)."""
    from pipeline.faces import UNKNOWN, FaceError, cluster_faces

    unknown = [index for index, face in enumerate(faces) if face.identity == UNKNOWN]
    try:
        labels = cluster_faces(model, np.stack([faces[i].vector for i in unknown]), threshold) if unknown else []
    except FaceError as error:
        raise CliError(f"cannot group the run's unknown faces: {error}") from None
    groups: list[str | None] = [None] * len(faces)
    for index, label in zip(unknown, labels, strict=True):
        groups[index] = f"{UNKNOWN}-{label}"
    return groups


def label_result(result: dict[str, Any], groups: dict[int, str]) -> dict[str, Any]:
    """The result with each grouped face's identity (`unknown`) replaced by its group, by detection row."""
    detections = [
        {**record, "data": {**record["data"], "identity": groups[row]}} if row in groups else record
        for row, record in enumerate(result.get("detections", []))
    ]
    return {**result, "detections": detections}


def write_faces(folder: Path, model: str, faces: Sequence[RunFace], groups: Sequence[str | None]) -> Path:
    """RUN/faces.npz, written whole and renamed into place (an interrupted write leaves the previous one)."""
    path = folder / FACES
    partial = folder / (FACES + ".partial.npz")
    dimensions = len(faces[0].vector) if faces else 0
    np.savez(
        partial,
        model=np.array(model),
        images=np.array([face.image for face in faces], dtype=str),
        rows=np.array([face.row for face in faces], dtype=np.int64),
        boxes=np.array([face.box for face in faces], dtype=np.int64).reshape(-1, 4),
        identities=np.array([face.identity for face in faces], dtype=str),
        groups=np.array(["" if group is None else group for group in groups], dtype=str),
        vectors=np.array([face.vector for face in faces], dtype=np.float32).reshape(-1, dimensions),
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
