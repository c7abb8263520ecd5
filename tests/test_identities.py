"""Who is in the picture: faces-dnn jobs with identify=G on real workers and in process, on the real photos
(../shared/images/people) and on a large composite whose small faces lie across tile seams."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.inference import recognize_image
from pipeline.scenes.codes import iou_xywh, placement_of
from pipeline.scenes.photos import Picture, photo_scene
from tasks import client, gallery
from tests.conftest import IMAGES_ROOT, tilerec_keys
from tests.test_faces import PEOPLE, SAME, only_face, photo
from tests.test_reliability import wait_for
from tests.test_stages import Messages

GALLERY = "identities-tests"
TIMEOUT = 180
FACE_PX = 90  # the faces' width in the composite at scale 1: small, and still above the 32 px an embedding needs
HELD = "tests.faces_held:HELD_FACES"


@pytest.fixture(scope="module")
def folder() -> Path:
    """The people photos where the workers may read them, and the composite scene."""
    path = IMAGES_ROOT / "identities"
    path.mkdir(exist_ok=True)
    for name in ("obama", *SAME, "biden"):
        shutil.copy(PEOPLE / f"{name}.jpg", path / f"{name}.jpg")
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def enrolled(worker, redis_server, folder) -> gallery.faces.Gallery:
    """obama enrolled from obama.jpg alone, biden from biden.jpg; removed (every key) afterwards."""
    client.gallery_add("obama", [folder / "obama.jpg"], GALLERY, timeout=TIMEOUT)
    client.gallery_add("biden", [folder / "biden.jpg"], GALLERY, timeout=TIMEOUT)
    yield gallery.load(redis_server.client(), GALLERY)
    for name in ("obama", "biden"):
        client.gallery_remove(name, GALLERY)
    assert list(redis_server.client().scan_iter(f"tilerec:gallery:{GALLERY}:*")) == []


def portrait(name: str, label: str) -> Picture:
    """A photo cut to its face and some surroundings and scaled so the face is FACE_PX wide, its box known from
    YuNet on the original photo."""
    image = photo(name)
    (x1, y1, x2, y2), _ = only_face(image)
    w, h = x2 - x1, y2 - y1
    left, top = int(max(0, x1 - 0.4 * w)), int(max(0, y1 - 0.4 * h))
    right, bottom = int(min(image.shape[1], x2 + 0.4 * w)), int(min(image.shape[0], y2 + 0.4 * h))
    scale = FACE_PX / w
    cut = cv2.resize(image[top:bottom, left:right], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return Picture(cut, ((x1 - left) * scale, (y1 - top) * scale, w * scale, h * scale), label)


@pytest.fixture(scope="module")
def composite(folder):
    """4000x3000, ten faces of the two people pasted small, half of them across tile seams (photo_scene places
    them from the tiling's own seams)."""
    pictures = [portrait("obama2", "obama"), portrait("biden", "biden"), portrait("obama3", "obama"),
                portrait("obama_partial_face", "obama")]  # fmt: skip
    scene = photo_scene(pictures, 4000, 3000, count=10, scales=(0.7, 1.0), seam_share=0.5, seed=3)
    path = folder / "composite.png"
    cv2.imwrite(str(path), scene.image)
    return scene, str(path)


def document(path: str, **options: object) -> dict:
    """A faces-dnn job's result document, from the workers."""
    return client.submit(path, "faces-dnn", **options).get(timeout=TIMEOUT).to_json()


def identities(result: dict) -> list[tuple[str, float]]:
    return [(d["data"]["identity"], d["data"]["similarity"]) for d in result["detections"]]


def tagged(result: dict, truths) -> list[list[str]]:
    """For each truth face, the identities of the detections on it (IoU at least 0.5)."""
    boxes = [(d["box"], d["data"]["identity"]) for d in result["detections"]]
    return [[identity for box, identity in boxes if iou_xywh(tuple(box), truth.box) >= 0.5] for truth in truths]


@pytest.mark.parametrize(("name", "person"), [*((name, "obama") for name in SAME), ("biden.jpg", "biden")])
def test_a_person_enrolled_from_one_photo_is_named_in_the_others_and_others_are_not(
    enrolled, redis_server, folder, name, person
):
    name = name.removesuffix(".jpg")
    only_obama = gallery.faces.Gallery.of(GALLERY, enrolled.model, {"obama": _vectors(enrolled, "obama")})
    distributed = document(str(folder / f"{name}.jpg"), identify=GALLERY)
    in_process = recognize_image(photo(name), "faces-dnn", identify=GALLERY, resources={"gallery": enrolled})
    assert identities(distributed) == identities(in_process.to_json())
    [(identity, similarity)] = identities(distributed)
    assert identity == person and similarity >= 0.4
    alone = recognize_image(photo(name), "faces-dnn", identify=GALLERY, resources={"gallery": only_obama})
    [(identity, similarity)] = identities(alone.to_json())
    assert identity == ("obama" if person == "obama" else "unknown")
    assert (similarity >= 0.4) == (person == "obama"), "biden is refused: below the threshold"
    assert distributed["second_stage"]["output"]["gallery"] == GALLERY
    assert '"embedding"' not in json.dumps(distributed), "no embedding in a result unless asked"
    assert tilerec_keys(redis_server) == []


def _vectors(enrolled: gallery.faces.Gallery, name: str) -> list[np.ndarray]:
    return list(enrolled.vectors[enrolled.owners == enrolled.names.index(name)])


def test_a_composite_tags_each_small_face_once_even_across_seams(enrolled, redis_server, composite):
    scene, path = composite
    height, width = scene.image.shape[:2]
    assert sum(placement_of(truth, width, height) == "seam" for truth in scene.truths) >= 4
    with Messages(redis_server) as messages:
        distributed = client.submit(path, "faces-dnn", identify=GALLERY, identity_repeats=True,
                                    crop_batch_size=2).get(timeout=TIMEOUT).to_json()  # fmt: skip
        # MONITOR's stream may lag behind a loaded machine: the finish is published after every crop batch
        wait_for(lambda: "tilerec.finish" in messages.names, timeout=60)
    # ten faces, two a crop batch (a message handed back by a lease that lapsed under load is published again)
    assert messages.names.count("tilerec.recognize_crops") >= 5
    assert max(messages.sizes) <= 2048, "references and ranges only: an embedding alone is larger"
    assert tagged(distributed, scene.truths) == [[truth.label] for truth in scene.truths]
    assert len(distributed["detections"]) == len(scene.truths), "no seam duplicates"
    in_process = recognize_image(scene.image, "faces-dnn", identify=GALLERY, identity_repeats=True,
                                 resources={"gallery": enrolled})  # fmt: skip
    assert identities(in_process.to_json()) == identities(distributed)
    # one person once per image unless repeats are allowed: the best face of each is named, the rest unknown
    once = document(path, identify=GALLERY)
    named = [d["data"]["identity"] for d in once["detections"] if d["data"]["identity"] != "unknown"]
    assert sorted(named) == ["biden", "obama"]
    # the whole image shrunk to 1000 px, as photo tools do: its faces are too small to say who they are
    shrunk = cv2.resize(scene.image, (1000, 750), interpolation=cv2.INTER_AREA)
    small = recognize_image(shrunk, "faces-dnn", tile=1000, identify=GALLERY, resources={"gallery": enrolled})
    found = small.to_json()
    assert len(found["detections"]) >= len(scene.truths) // 2, "found, yet"
    assert all(d.get("data", {}).get("identity") is None for d in found["detections"]), "no identity"
    assert found["second_stage"]["output"]["too_small"] == len(found["detections"])
    assert tilerec_keys(redis_server) == []


def test_embeddings_come_back_only_when_asked(enrolled, folder):
    result = document(str(folder / "obama2.jpg"), identify=GALLERY, embeddings=True)
    [face] = result["detections"]
    assert len(face["data"]["embedding"]) == 128 and face["data"]["identity"] == "obama"


def held(flag: Path) -> list[int]:
    return [int(p.suffix[1:]) for p in flag.parent.glob(flag.name + ".*")]


def test_a_process_killed_while_embedding_changes_nothing(enrolled, worker, redis_server, composite):
    _, path = composite
    expected = document(path, identify=GALLERY, identity_repeats=True)
    flag = IMAGES_ROOT / "hold-faces"
    flag.touch()
    try:
        job = client.submit(path, HELD, identify=GALLERY, identity_repeats=True, crop_batch_size=2, hold=str(flag))
        wait_for(lambda: held(flag), timeout=60)
        os.kill(held(flag)[0], signal.SIGKILL)  # mid-embedding: its crop batch goes back to the queue, runs again
    finally:
        flag.unlink(missing_ok=True)
    result = job.get(timeout=TIMEOUT).to_json()
    for marker in IMAGES_ROOT.glob("hold-faces.*"):
        marker.unlink()
    assert identities(result) == identities(expected)
    assert [d["box"] for d in result["detections"]] == [d["box"] for d in expected["detections"]]
    assert result["second_stage"]["failed_crops"] == []
    wait_for(lambda: len(worker.child_pids()) == 2)
    assert tilerec_keys(redis_server) == []
