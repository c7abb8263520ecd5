"""Galleries of people in the tile store's Redis, and the Celery tasks that enroll, list, rename and remove people.

Keys of gallery G (no TTL: a gallery lives until its people are removed; docs/faces.md):
    tilerec:galleries                 set: the names of the galleries that have people
    tilerec:gallery:G:model           the embedder its embeddings come from (`dlib-resnet-v1`, `sface:FILE`)
    tilerec:gallery:G:people          hash: person's name -> person id (a name is a field, so a rename moves no data)
    tilerec:gallery:G:person:ID       hash: embedding id -> JSON {"vector": [...], "image": file name, "box": [x, y,
                                      w, h]}: one per enrolled photo or named face
Removing a person deletes their `person:ID` hash and field; removing a gallery's last person deletes its keys.

Tasks another app can call by name (JSON arguments; results carry names and counts, never embeddings):
    tilerec.gallery_add(name, photos, gallery="default", box=None, embedder="dlib", face_model="")
    tilerec.gallery_list(gallery="default")    tilerec.gallery_rename(old, new, gallery="default")
    tilerec.gallery_remove(name, gallery="default")
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from pipeline.inference import recognize_source
from pipeline.readers import sources
from pipeline.readers.images import ImageError, confine
from pipeline.recognizers import faces
from pipeline.tiling import Window
from tasks.access import resolve
from tasks.celery import app, settings, store_client
from tasks.resources import register
from tasks.store import PREFIX

DEFAULT = "default"
GALLERIES = f"{PREFIX}:galleries"
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_MAX = 100
RESERVED = re.compile(rf"{faces.UNKNOWN}(-\d+)?", re.IGNORECASE)  # what unmatched faces and their groups are called


class GalleryError(ValueError):
    """A gallery or person that does not exist, a name that cannot be one, or a photo that cannot be enrolled."""


@dataclass(frozen=True)
class Enrolled:
    """One embedding to store for a person: the vector, and where it came from (a file name and a box)."""

    vector: np.ndarray
    image: str
    box: list[int]

    def to_json(self) -> str:
        return json.dumps({"vector": self.vector.astype(float).tolist(), "image": self.image, "box": self.box})


def key(gallery: str, part: str) -> str:
    return f"{PREFIX}:gallery:{gallery}:{part}"


def person_key(gallery: str, person_id: str) -> str:
    return key(gallery, f"person:{person_id}")


def check_gallery(gallery: Any) -> str:
    """A gallery's name: letters, digits, `_`, `.` and `-`, at most 64, starting with a letter or digit."""
    if not isinstance(gallery, str) or not GALLERY_NAME.fullmatch(gallery):
        raise GalleryError(
            f"a gallery's name is letters, digits, '_', '.' and '-' (at most 64, starting with a letter or digit), "
            f"got {gallery!r}"
        )
    return gallery


def check_name(name: Any) -> str:
    """A person's name: printable text of at most NAME_MAX characters, not `unknown` or `unknown-N` (what unmatched
    faces are called), surrounding spaces dropped."""
    text = name.strip() if isinstance(name, str) else ""
    if not text or len(text) > NAME_MAX or not text.isprintable():
        raise GalleryError(f"a person's name is printable text of 1 to {NAME_MAX} characters, got {name!r}")
    if RESERVED.fullmatch(text):
        raise GalleryError(f"{text!r} is what tilerec calls faces it cannot name; choose the person's name")
    return text


def _names(client: redis.Redis, gallery: str) -> list[str]:
    return sorted(name.decode() for name in client.hkeys(key(gallery, "people")))


def _missing(client: redis.Redis, gallery: str, name: str) -> GalleryError:
    known = _names(client, gallery)
    if not known:
        return GalleryError(f"gallery {gallery!r} has no people (enroll one: tilerec gallery add NAME PHOTO)")
    return GalleryError(f"gallery {gallery!r} has no {name!r}; it has: {', '.join(known)}")


def add_faces(client: redis.Redis, gallery: str, name: str, model: str, enrolled: Sequence[Enrolled]) -> int:
    """Store a person's new embeddings (the person is created on first use), in one transaction; returns how many
    embeddings the person has now.

    Raises:
        GalleryError: the gallery's embeddings come from another model (they would never compare).
    """
    gallery, name = check_gallery(gallery), check_name(name)
    fields = {uuid.uuid4().hex: entry.to_json() for entry in enrolled}

    def write(pipe: Any) -> None:
        stored = pipe.get(key(gallery, "model"))
        if stored is not None and stored.decode() != model:
            raise GalleryError(
                f"gallery {gallery!r} holds {stored.decode()} embeddings, these are {model}: use that embedder, or "
                "another gallery"
            )
        person = pipe.hget(key(gallery, "people"), name)
        person_id = person.decode() if person else uuid.uuid4().hex
        pipe.multi()
        pipe.set(key(gallery, "model"), model)
        pipe.sadd(GALLERIES, gallery)
        pipe.hset(key(gallery, "people"), name, person_id)
        pipe.hset(person_key(gallery, person_id), mapping=fields)
        pipe.hlen(person_key(gallery, person_id))

    return int(client.transaction(write, key(gallery, "model"), key(gallery, "people"))[-1])


def list_people(client: redis.Redis, gallery: str) -> dict[str, Any]:
    """The gallery's model and people, each with the number of their embeddings and the photos they came from."""
    people = {k.decode(): v.decode() for k, v in client.hgetall(key(check_gallery(gallery), "people")).items()}
    names = sorted(people)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hvals(person_key(gallery, people[name]))
        stored = pipe.execute()
    model = client.get(key(gallery, "model"))
    listed = [
        {"name": name, "embeddings": len(values), "images": sorted({json.loads(v)["image"] for v in values})}
        for name, values in zip(names, stored, strict=True)
    ]
    return {"gallery": gallery, "model": model.decode() if model else None, "people": listed}


def galleries(client: redis.Redis) -> list[str]:
    return sorted(name.decode() for name in client.smembers(GALLERIES))


def rename(client: redis.Redis, gallery: str, old: str, new: str) -> None:
    """Give a person another name (their embeddings stay).

    Raises:
        GalleryError: no such person, or the new name is taken.
    """
    gallery, new = check_gallery(gallery), check_name(new)
    people = key(gallery, "people")

    def write(pipe: Any) -> None:
        person = pipe.hget(people, old)
        if person is None:
            raise _missing(client, gallery, old)
        if new != old and pipe.hexists(people, new):
            raise GalleryError(f"gallery {gallery!r} has a {new!r} already: remove or rename that person first")
        pipe.multi()
        pipe.hdel(people, old)
        pipe.hset(people, new, person)

    client.transaction(write, people)


def remove(client: redis.Redis, gallery: str, name: str) -> int:
    """Delete a person and every embedding of theirs; the gallery's own keys go with its last person. Returns how
    many embeddings were deleted.

    Raises:
        GalleryError: no such person.
    """
    gallery = check_gallery(gallery)
    people = key(gallery, "people")
    deleted = 0

    def write(pipe: Any) -> None:
        nonlocal deleted
        person = pipe.hget(people, name)
        if person is None:
            raise _missing(client, gallery, name)
        last = pipe.hlen(people) == 1
        deleted = pipe.hlen(person_key(gallery, person.decode()))
        pipe.multi()
        pipe.hdel(people, name)
        pipe.delete(person_key(gallery, person.decode()))
        if last:
            pipe.delete(key(gallery, "model"))
            pipe.srem(GALLERIES, gallery)

    client.transaction(write, people)
    return deleted


def load(client: redis.Redis, gallery: str) -> faces.Gallery:
    """The gallery's people and embeddings as one matrix, for matching (none: every face is unknown, and a run's
    unknown faces are grouped into people to name)."""
    people = {k.decode(): v.decode() for k, v in client.hgetall(key(check_gallery(gallery), "people")).items()}
    names = sorted(people)
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hvals(person_key(gallery, people[name]))
        pipe.get(key(gallery, "model"))
        *stored, model = pipe.execute()
    vectors = {
        name: [np.asarray(json.loads(value)["vector"], np.float32) for value in values]
        for name, values in zip(names, stored, strict=True)
    }
    return faces.Gallery.of(gallery, (model or b"").decode(), vectors)


def _photo_name(image: str) -> str:
    """What a gallery keeps of where a photo came from: its file name (an upload's reference is no name)."""
    return "uploaded photo" if image.startswith("redis:") else Path(image).name


def enroll_photo(image: str, box: list[int] | None, embedder: faces.Embedder) -> Enrolled:
    """The face to enroll in one photo (the job's image reference: a confined path, a URL or an upload), embedded
    from its full-resolution crop.

    Raises:
        GalleryError: the photo cannot be read, or has no usable face, with the photo's name and the reason.
    """
    shown = _photo_name(image)
    try:
        with contextlib.closing(sources.open_source(resolve(image), 0, settings().max_pixels)) as source:
            found = recognize_source(source, "faces-dnn").detections
            chosen = faces.enrollment_face(found, box)
            x, y, w, h = faces.face_crop(found.xyxy[chosen], source.width, source.height)
            crop = source.read(Window(0, x, y, w, h))
            if crop is None:
                raise faces.FaceError("the face lies in the image's nodata")
            landmarks = found.keypoints[chosen][:, :2] - [x, y]
            vector = embedder.embed(crop, found.xyxy[chosen] - [x, y, x, y], landmarks)
    except (ImageError, faces.FaceError) as error:
        raise GalleryError(f"photo {shown}: {error}") from None
    x1, y1, x2, y2 = (round(float(v)) for v in found.xyxy[chosen])
    return Enrolled(vector, shown, [x1, y1, x2 - x1, y2 - y1])


def _embedder(embedder: str, face_model: str) -> faces.Embedder:
    """The worker's embedder; a face_model must lie under the model folders, as recognizers' files must."""
    if face_model:
        try:
            face_model = str(confine(face_model, list(settings().model_roots)))
        except ImageError as error:
            raise GalleryError(f"face_model: {error} (workers open models only under TILEREC_MODEL_DIR or "
                               "TILEREC_MODEL_ROOTS)") from None  # fmt: skip
    try:
        return faces.get_embedder(embedder, face_model)
    except faces.FaceError as error:
        raise GalleryError(str(error)) from None


def _box(box: Any) -> list[int] | None:
    if box is None:
        return None
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(isinstance(v, int) and v >= 0 for v in box):
        raise GalleryError(f"box must be [x, y, width, height] in whole pixels, got {box!r}")
    if box[2] < 1 or box[3] < 1:
        raise GalleryError(f"box must have a width and height of at least 1 pixel, got {box!r}")
    return list(box)


@app.task(name="tilerec.gallery_add")
def gallery_add(
    name: str,
    photos: list[str],
    gallery: str = DEFAULT,
    box: list[int] | None = None,
    embedder: str = "dlib",
    face_model: str = "",
) -> dict[str, Any]:
    """Enroll a person from photos (paths under the allowed roots, allowed URLs or uploads' `redis:` references):
    the face in `box`, or each photo's only or clearly largest face, detected and embedded on this worker. Every
    photo is checked before anything is stored: one bad photo enrolls none."""
    gallery, name, chosen = check_gallery(gallery), check_name(name), _box(box)
    if not isinstance(photos, list) or not photos or not all(isinstance(photo, str) for photo in photos):
        raise GalleryError("gallery_add needs one or more photos (a list of paths, URLs or references)")
    model = _embedder(embedder, face_model)
    enrolled = [enroll_photo(photo, chosen, model) for photo in photos]
    total = add_faces(store_client(), gallery, name, model.model, enrolled)
    return {
        "gallery": gallery,
        "name": name,
        "added": len(enrolled),
        "embeddings": total,
        "faces": [{"image": entry.image, "box": entry.box} for entry in enrolled],
    }


@app.task(name="tilerec.gallery_list")
def gallery_list(gallery: str = DEFAULT) -> dict[str, Any]:
    """The gallery's people: names, how many embeddings each, from which photos."""
    return list_people(store_client(), gallery)


@app.task(name="tilerec.gallery_rename")
def gallery_rename(old: str, new: str, gallery: str = DEFAULT) -> dict[str, Any]:
    rename(store_client(), gallery, old, new)
    return {"gallery": gallery, "renamed": old, "to": new.strip()}


@app.task(name="tilerec.gallery_remove")
def gallery_remove(name: str, gallery: str = DEFAULT) -> dict[str, Any]:
    """Delete the person and every embedding of theirs."""
    return {"gallery": gallery, "removed": name, "embeddings": remove(store_client(), gallery, name)}


# the gallery a faces job names (`identify`), loaded for its identities stage's finish on the worker
register("gallery", lambda client, options: load(client, options.params["identify"]))
